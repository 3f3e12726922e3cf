"""The one exception type users see from unit_scale_fx."""

from __future__ import annotations


class UnitScaleError(RuntimeError):
    """Raised for input the transform cannot handle.

    The message always says *what* went wrong, *where* (module, node or pass)
    and *how* to get past it.
    """

    def __init__(self, what: str, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        parts = [what]
        if where:
            parts.append(f"  where: {where}")
        if fix:
            parts.append(f"  fix:   {fix}")
        super().__init__("\n".join(parts))
