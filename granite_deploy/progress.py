"""Progress for long steps: shown on a terminal (stderr), silent when stderr is not a TTY."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

_forced: bool | None = None


def set_enabled(enabled: bool | None) -> None:
    """Force progress on/off (None: on exactly when stderr is a TTY)."""
    global _forced
    _forced = enabled


def enabled() -> bool:
    if _forced is not None:
        return _forced
    return sys.stderr.isatty()


@contextmanager
def step(label: str):
    """`label ... done (1.2 s)` around a block."""
    start = time.perf_counter()
    if enabled():
        sys.stderr.write(f"{label} ...")
        sys.stderr.flush()
    try:
        yield
    except BaseException:
        if enabled():
            sys.stderr.write(" failed\n")
        raise
    if enabled():
        sys.stderr.write(f" done ({time.perf_counter() - start:.1f} s)\n")


class Bar:
    """A one-line counter bar, redrawn at most ten times a second."""

    def __init__(self, label: str, total: float, unit: str = ""):
        self.label, self.total, self.unit = label, max(total, 1), unit
        self.done = 0.0
        self._last = 0.0
        self._start = time.perf_counter()

    def _fmt(self, n: float) -> str:
        if self.unit == "B":
            return f"{n / 2**20:.0f} MiB"
        return f"{n:.0f}{self.unit}"

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if enabled() and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            pct = 100.0 * self.done / self.total
            sys.stderr.write(f"\r{self.label}: {pct:5.1f}% ({self._fmt(self.done)}/{self._fmt(self.total)})")
            sys.stderr.flush()

    def close(self) -> None:
        if enabled():
            sys.stderr.write(f"\r{self.label}: done ({time.perf_counter() - self._start:.1f} s)" + " " * 20 + "\n")


@contextmanager
def bar(label: str, total: float, unit: str = ""):
    b = Bar(label, total, unit)
    try:
        yield b
    finally:
        b.close()
