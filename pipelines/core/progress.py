"""Progress of long steps (encode, sample, training) that a person can read, on a terminal or in a log.

On a terminal (the stream's isatty()) it is tqdm's one line, redrawn in place: done/total, rate,
elapsed and ETA. Anywhere else (a log file, a Ray Job's log, `kubectl logs`) redrawing would leave a
screen of repeated lines, so it writes one plain line every `interval_s` seconds and a final line:

    sample: 1200/50000 images (2.4%), 41.3 images/s, ETA 19m40s
    sample: 50000/50000 images in 20m12s, 41.2 images/s

The rate counts what was done since the Progress began (not what an earlier, resumed launch did).

    with Progress(total=len(missing), what="images", desc="sample") as p:
        for batch in batches:
            p.update(len(batch))

Writes to `stream` only (default stderr), and `write(text)` lines to stdout; reads nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

REDRAW_S = 0.2  # a terminal line is redrawn at most this often


def format_duration(seconds: float) -> str:
    """1h02m, 19m40s, 42s."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _rate(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


class Progress:
    """done/total of one long step; `update(n)` or `set(done)`, then `close()` (or use `with`)."""

    def __init__(self, total: int | None, what: str = "items", desc: str = "", interval_s: float = 30.0,
                 stream: TextIO | None = None, initial: int = 0, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.what, self.desc, self.interval_s = total, what, desc, interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.initial = initial
        self.clock = clock
        self.start = self.last_line = clock()
        self.closed = False
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty()) if tty is None else tty
        self._bar = self._tqdm() if self.tty else None

    def _tqdm(self):
        try:
            from tqdm import tqdm
        except ImportError:  # a plain redrawn line does the same job
            return None
        return tqdm(total=self.total, initial=self.initial, unit=f" {self.what}" if self.what else "it",
                    desc=self.desc or None, file=self.stream, dynamic_ncols=True, leave=True, smoothing=0.1)

    # Progress.
    def update(self, n: int = 1) -> None:
        """`n` more done."""
        self.set(self.done + n)

    def set(self, done: int) -> None:
        """`done` in all (a training loop's step)."""
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        if self._bar is None:
            now = self.clock()
            if self.tty:
                if now - self.last_line >= REDRAW_S:
                    self._write("\r" + self.line(now), end="")
                    self.last_line = now
            elif now - self.last_line >= self.interval_s:
                self._write(self.line(now))
                self.last_line = now

    def write(self, text: str, stream: TextIO | None = None) -> None:
        """A line of other output (a training loop's metrics row) to `stream` (default stdout), leaving
        the progress line whole: on a terminal it is cleared, the text written, then redrawn."""
        out = stream if stream is not None else sys.stdout
        if self._bar is not None:
            self._bar.write(text, file=out)  # tqdm clears its bar, writes, redraws
            return
        redraw = self.tty and not self.closed
        if redraw:
            self._write("\r\033[K", end="")
        out.write(text + "\n")
        out.flush()
        if redraw:
            self._write(self.line(self.clock()), end="")

    def close(self) -> None:
        """The final line (done, elapsed, rate); further calls do nothing."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
            return
        now = self.clock()
        self._write(("\r" if self.tty else "") + self.final_line(now))

    # Text.
    def rate(self, now: float) -> float:
        """Items per second since this Progress began."""
        elapsed = now - self.start
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float) -> str:
        """`desc: done/total what (pct), rate what/s, ETA t`."""
        rate = self.rate(now)
        head = f"{self.desc}: " if self.desc else ""
        if not self.total:
            return f"{head}{self.done} {self.what}, {_rate(rate)} {self.what}/s"
        pct = 100.0 * self.done / self.total
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        return f"{head}{self.done}/{self.total} {self.what} ({pct:.1f}%), {_rate(rate)} {self.what}/s, ETA {eta}"

    def final_line(self, now: float) -> str:
        head = f"{self.desc}: " if self.desc else ""
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        took = format_duration(now - self.start)
        return f"{head}{count} {self.what} in {took}, {_rate(self.rate(now))} {self.what}/s"

    def _write(self, text: str, end: str = "\n") -> None:
        self.stream.write(text + end)
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
