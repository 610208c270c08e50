"""Progress of long commands on a terminal; nothing at all anywhere else.

``Progress`` writes to a command's ``stderr`` (its results stay alone on
stdout) only when that stream is a terminal and the verbosity is 1 or more.
With a known total it keeps one line up to date with ``\\r`` (done/total,
percent, rate, ETA), at most ``interval`` seconds apart; without one it
writes a line every ``every`` seconds. Leaving the ``with`` block ends the
line: a final line on success, a bare newline on an exception (so the error
starts a line of its own). An update costs a clock read when nothing is
written, so it may be called per row.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from django.core.management.base import OutputWrapper


def now() -> float:
    """The default clock (tests replace it)."""
    return time.monotonic()


def plural(n: int, noun: str) -> str:
    """``1 run``, ``2 runs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def clock_time(seconds: float) -> str:
    """``0:05``, ``12:30``, ``1:02:03``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


class Progress:
    def __init__(
        self,
        stream: Any,
        label: str,
        *,
        total: int | None = None,
        unit: str = "",
        verbosity: int = 1,
        interval: float = 0.1,
        every: float = 5.0,
        clock: Callable[[], float] | None = None,
        width: int | None = None,
    ) -> None:
        self.stream = stream
        self.label = label
        self.total = total
        self.unit = f" {unit}" if unit else ""
        self.enabled = verbosity > 0 and bool(getattr(stream, "isatty", lambda: False)())
        self.interval = interval
        self.every = every
        self.clock = clock or now
        self.width = width or shutil.get_terminal_size().columns
        self.started = self.clock()
        self.written_at: float | None = None
        self.done = 0
        self.detail = ""
        self._open = 0  # length of the line \r rewrites; 0: the cursor is at a line's start

    def due(self, at: float | None = None) -> bool:
        """Whether an update now would be written (to skip the work of counting if not)."""
        if not self.enabled:
            return False
        at = self.clock() if at is None else at
        if self.written_at is None:
            return self.total is not None or at - self.started >= self.every
        wait = self.interval if self.total is not None else self.every
        return at - self.written_at >= wait

    def update(self, done: int, detail: str = "", *, total: int | None = None) -> None:
        """``done`` so far (``detail``: more counts, as ``"3 kills"``); written when due."""
        self.done, self.detail = done, detail
        if total is not None:
            self.total = total
        if not self.enabled:
            return
        at = self.clock()
        if self.due(at):
            self.written_at = at
            self._show(at, final=False)

    def finish(self) -> None:
        """The final line, with the counts of the last update."""
        if self.enabled:
            self._show(self.clock(), final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.finish()
        elif self._open:
            self._write("\n")
            self._open = 0

    def line(self, at: float, *, final: bool) -> str:
        elapsed = at - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total is None:
            counts = f"{self.done}{self.unit}"
        else:
            percent = 100 * self.done // self.total if self.total else 100
            counts = f"{self.done}/{self.total}{self.unit} ({min(percent, 100)}%)"
        if final:
            when = f"took {clock_time(elapsed)}"
        elif self.total is None:
            when = f"{clock_time(elapsed)} elapsed"
        else:
            left = (self.total - self.done) / rate if rate else None
            when = f"ETA {clock_time(max(left, 0)) if left is not None else '?'}"
        detail = f", {self.detail}" if self.detail else ""
        return f"{self.label}: {counts}{detail}; {rate:.1f}/s, {when}"

    def _show(self, at: float, *, final: bool) -> None:
        text = self.line(at, final=final)
        if self.total is None:  # a line each time
            self._write(text + "\n")
            return
        text = text[: self.width - 1]  # a wrapped line cannot be rewritten
        self._write("\r" + text.ljust(self._open) + ("\n" if final else ""))
        self._open = 0 if final else len(text)

    def _write(self, text: str) -> None:
        if isinstance(self.stream, OutputWrapper):  # as it is: no colour, no added ending
            self.stream.write(text, style_func=str, ending="")
        else:
            self.stream.write(text)
        self.stream.flush()
