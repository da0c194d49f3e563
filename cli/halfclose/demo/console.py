"""What the demo prints: steps, commands, notes, and a progress line while it waits.

On a terminal the progress line redraws itself in place; elsewhere (CI, a
pipe) it prints one line when the wait starts and one when it ends, so a log
stays readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR = 24


class Console:
    def __init__(self, out: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self._started = time.monotonic()

    def _emit(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def step(self, number: int, total: int, title: str) -> None:
        elapsed = time.monotonic() - self._started
        self._emit()
        self._emit(f"== {number}/{total}  {title}  [t={elapsed:.1f}s]")

    def say(self, text: str) -> None:
        for line in text.splitlines():
            self._emit(f"   {line}" if line else "")

    def command(self, argv: list[str]) -> None:
        self._emit(f"   $ {' '.join(argv)}")

    def block(self, text: str) -> None:
        for line in text.splitlines():
            self._emit(f"     {line}")

    def ok(self, text: str) -> None:
        self._emit(f"   OK: {text}")

    def wait(
        self,
        label: str,
        seconds: float,
        done: Callable[[], bool],
        *,
        status: Callable[[], str] | None = None,
        expected: float | None = None,
        poll: float = 0.2,
    ) -> float:
        """Wait up to ``seconds`` for ``done()``; return the seconds waited.

        The bar fills over ``expected`` seconds (default: ``seconds``), the
        time the wait should take; ``status`` adds a live detail (a countdown).
        """
        scale = expected if expected and expected > 0 else seconds
        start = time.monotonic()
        if not self.tty:
            self._emit(f"   ... {label} (up to {seconds:.0f} s)")
        while True:
            elapsed = time.monotonic() - start
            finished = done()
            if self.tty:
                frac = min(1.0, elapsed / scale) if scale > 0 else 1.0
                filled = int(frac * BAR)
                detail = f"  {status()}" if status else ""
                self.out.write(
                    f"\r   {label} [{'#' * filled}{'.' * (BAR - filled)}] "
                    f"{elapsed:4.1f} s{detail}\033[K"
                )
                self.out.flush()
            if finished or elapsed >= seconds:
                break
            time.sleep(poll)
        if self.tty:
            self.out.write("\n")
        self._emit(f"   ... {'done' if finished else 'gave up'} after {elapsed:.1f} s")
        return elapsed
