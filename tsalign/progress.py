"""What a stage tells the user: its lines (`say`) and the progress of a long step (a tqdm bar on a terminal,
plain rate-limited lines everywhere else). Under `accelerate launch` every process runs the same stage: only
the main process speaks, so a line shows once, not once per GPU.

    with progress(len(prompts), "generate", "prompt") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk), tok_s=95.2)

On a terminal this is tqdm's bar. When stderr is not a terminal (CI logs, the child processes of
`stage=loop` writing into a pipe or a file) a bar would print carriage returns into the log, so one
plain line is printed instead: at the start, then at most every `every_s` seconds or when another
10% is done, and at the end:

    [generate] 24/64 prompt (38%) | 1.20 prompt/s | elapsed 00:20 | ETA 00:33 | tok_s=95.2

TSALIGN_PROGRESS=bars|lines|off overrides the choice (off: nothing is printed).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from tqdm.auto import tqdm

LINE_EVERY_S = 10.0  # at most one plain line per this many seconds ...
LINE_EVERY_FRACTION = 0.1  # ... besides one each time another tenth of the total is done


def say(message: str, every_process: bool = False) -> None:
    """A stage's line on stdout, flushed; from the main process only unless `every_process` (a wait, a warning
    that is one process's own)."""
    from tsalign.distributed import is_main

    if every_process or is_main():
        print(message, flush=True)


def _postfix(values: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def speed(rate: float | None, unit: str) -> str:
    """Units per second, or seconds per unit when slower than one a second (DPO steps, 70B judging)."""
    if not rate:
        return f"? {unit}/s"
    if rate < 1:
        return f"{1 / rate:.3g} s/{unit}"
    return f"{rate:.0f} {unit}/s" if rate >= 100 else f"{rate:.3g} {unit}/s"


class LineProgress:
    """Plain progress lines for logs, rate-limited. `clock` is injectable so tests need not wait."""

    def __init__(self, total: int | None, desc: str, unit: str, stream: TextIO, initial: int = 0,
                 clock: Callable[[], float] = time.monotonic, every_s: float = LINE_EVERY_S,
                 every_fraction: float = LINE_EVERY_FRACTION):
        self.total, self.desc, self.unit, self.stream, self.clock = total, desc, unit, stream, clock
        self.every_s, self.every_fraction = every_s, every_fraction
        self.n = self.initial = initial  # resumed work counts as done but not toward the rate
        self.started = self.last_line = clock()
        self.last_tenth = self._tenth()
        self.postfix: dict = {}
        self._print()

    def _tenth(self) -> int:
        return int(self.n / self.total / self.every_fraction) if self.total else 0

    def line(self) -> str:
        """The current line: done/total (percent), rate, elapsed, ETA, postfix; formatted by tqdm."""
        elapsed = self.clock() - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 and self.n > self.initial else None
        remaining = "?" if not (rate and self.total) else tqdm.format_interval((self.total - self.n) / rate)
        total = f"/{self.total}" if self.total is not None else ""
        percent = f" ({self.n / self.total:.0%})" if self.total else ""
        text = (f"[{self.desc}] {self.n}{total} {self.unit}{percent} | {speed(rate, self.unit)} | elapsed "
                f"{tqdm.format_interval(elapsed)} | ETA {remaining}")
        return text + (f" | {_postfix(self.postfix)}" if self.postfix else "")

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_line, self.printed_n = self.clock(), self.n

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        self.postfix.update(postfix)
        tenth = self._tenth()
        if tenth > self.last_tenth or self.clock() - self.last_line >= self.every_s:
            self.last_tenth = tenth
            self._print()

    def close(self) -> None:
        if self.n != self.printed_n:
            self._print()  # the final count, unless the last line already showed it


class BarProgress:
    """tqdm's bar, with postfix values shown beside it."""

    def __init__(self, total: int | None, desc: str, unit: str, stream: TextIO, initial: int = 0):
        self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        if postfix:
            self.bar.set_postfix_str(_postfix(postfix), refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class NoProgress:
    def update(self, n: int = 1, **postfix) -> None:
        pass

    def close(self) -> None:
        pass


def mode(stream: TextIO) -> str:
    """bars on a terminal, lines otherwise, nothing on the other processes of `accelerate launch`;
    TSALIGN_PROGRESS=bars|lines|off decides when set."""
    from tsalign.distributed import is_main

    chosen = os.environ.get("TSALIGN_PROGRESS", "").strip().lower()
    if chosen in ("bars", "lines", "off"):
        return chosen
    if not is_main():
        return "off"
    return "bars" if hasattr(stream, "isatty") and stream.isatty() else "lines"


@contextlib.contextmanager
def progress(total: int | None, desc: str, unit: str = "it", initial: int = 0, stream: TextIO | None = None,
             clock: Callable[[], float] = time.monotonic) -> Iterator[LineProgress | BarProgress | NoProgress]:
    """A progress reporter with .update(n, **postfix); closed (final line printed) on exit.
    `initial`: work already done before this run (resumed chunks): counted, but not in the rate."""
    stream = stream or sys.stderr
    how = mode(stream)
    if how == "off":
        reporter = NoProgress()
    elif how == "bars":
        reporter = BarProgress(total, desc, unit, stream, initial)
    else:
        reporter = LineProgress(total, desc, unit, stream, initial, clock)
    try:
        yield reporter
    finally:
        reporter.close()
