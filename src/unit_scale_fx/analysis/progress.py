"""A small progress bar on stderr that stays quiet when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO


class Progress:
    """``with Progress(total, "what") as bar: ... bar.update()``.

    Draws ``what [#####.....] 12/40`` at most ten times a second, and only when
    ``enabled`` is True, or when it is None and the stream is a TTY.
    """

    def __init__(self, total: int, desc: str = "", enabled: Optional[bool] = None,
                 stream: Optional[TextIO] = None, width: int = 30) -> None:
        self.total = max(int(total), 1)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) if enabled is None else enabled
        self.width = width
        self.n = 0
        self._last = 0.0

    def __enter__(self) -> "Progress":
        self._draw(force=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.n = min(self.n, self.total) if exc[0] is not None else self.total
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def update(self, k: int = 1) -> None:
        self.n += k
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        n = min(self.n, self.total)
        fill = int(self.width * n / self.total)
        self.stream.write(f"\r{self.desc} [{'#' * fill}{'.' * (self.width - fill)}] {n}/{self.total}")
        self.stream.flush()
