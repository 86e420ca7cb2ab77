"""A one-line progress bar on stderr for long measurements (compare, benchmarks).

Drawn only when stderr is a terminal, so logs and CI output stay clean; written here
rather than pulled in as a dependency because it is twenty lines.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str = "", stream: TextIO = sys.stderr, width: int = 30):
        self.total = max(1, total)
        self.done = 0
        self.label = label
        self.stream = stream
        self.width = width
        self.start = time.monotonic()
        self.enabled = stream.isatty()

    def tick(self, steps: int = 1) -> None:
        self.done = min(self.total, self.done + steps)
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        elapsed = time.monotonic() - self.start
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                          f"{elapsed:5.0f}s {self.label[:60]:<60}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
