"""The one plain-text table formatter (reports, summaries, the CLI)."""

from __future__ import annotations

from typing import Optional, Sequence


def format_table(rows: Sequence[Sequence[str]], left: Optional[int] = None, rule: bool = True) -> str:
    """Columns separated by two spaces, trailing spaces stripped.

    Args:
        rows: the header first, then the rows; every row has the same number of cells.
        left: how many leading columns are left-aligned; the rest (numbers) are right-aligned.
            ``None``: all of them.
        rule: a line of dashes under the header.
    """
    if not rows:
        return ""
    n_left = len(rows[0]) if left is None else left
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if k < n_left else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
