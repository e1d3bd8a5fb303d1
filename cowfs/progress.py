"""Progress of long commands (scrub, fsck --verify-data; send/receive may use it).

API, all of it::

    with progress.Progress("scrub", total=total_bytes, quiet=args.json) as bar:
        for ...:
            bar.update(done_bytes)             # absolute; or bar.advance(n)
            bar.total = new_total              # if the total grows meanwhile

* On a terminal (the stream is a tty): one live line that redraws itself,
  with done and total bytes, rate and time left (`tqdm`).
* Otherwise (a log, cron, a pipe): a plain line every `PLAIN_EVERY_S`
  seconds and one at the end, each complete with its newline, e.g.
  ``scrub: 45% (1.2 GiB of 2.6 GiB, 35.0 MiB/s, about 40 s left)``.
* ``quiet=True`` (the command's ``--json``): nothing at all.

Nothing is shown before the first update, and no closing line when the
block ends with an exception, so an error stays the command's one line.

It always writes to stderr (or `stream`), never to stdout, so a command's
output stays what it is. `unit` is "B" for bytes (shown as KiB, MiB...), or
any other word counted as is (e.g. "chunks").
"""

import os
import sys
import time
from typing import Optional

from tqdm import tqdm

PLAIN_EVERY_S = 10.0


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def _human(value: float, unit: str) -> str:
    if unit != "B":
        return f"{value:.0f} {unit}"
    for prefix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or prefix == "TiB":
            return f"{value:.0f} B" if prefix == "B" else f"{value:.1f} {prefix}"
        value /= 1024
    return ""


class Progress:
    def __init__(self, label: str, total: Optional[float] = None, unit: str = "B", quiet: bool = False,
                 stream=None, plain_every_s: float = PLAIN_EVERY_S):
        self.label, self.unit = label, unit
        self.done = 0.0
        self._total = total
        self._stream = sys.stderr if stream is None else stream
        self._plain_every_s = plain_every_s
        self._started = self._last_line = time.monotonic()
        self._bar = None
        self._tty = not quiet and self._stream.isatty()
        self._plain = not quiet and not self._tty
        self._started_any = False        # nothing is shown before the first update

    def _open_bar(self) -> None:
        # A terminal that reports no size (a fresh pty, a serial console)
        # gets 80x24: tqdm draws nothing at all on a 0x0 one.
        sized = _columns(self._stream) > 0
        self._bar = tqdm(total=self._total, desc=self.label, unit=self.unit, unit_scale=self.unit == "B",
                         unit_divisor=1024, file=self._stream, mininterval=0.2, leave=True,
                         dynamic_ncols=sized, ncols=None if sized else 80, nrows=None if sized else 24)

    # --- the API ---------------------------------------------------------------------

    @property
    def total(self) -> Optional[float]:
        return self._total

    @total.setter
    def total(self, value: Optional[float]) -> None:
        if value == self._total:
            return
        self._total = value
        if self._bar is not None:
            self._bar.total = value
            self._bar.refresh()

    def update(self, done: float) -> None:
        """Set how much is done (absolute)."""
        self.advance(done - self.done)

    def advance(self, amount: float) -> None:
        self.done += amount
        self._started_any = True
        if self._tty and self._bar is None:
            self._open_bar()
        if self._bar is not None:
            self._bar.update(amount)
        elif self._plain and time.monotonic() - self._last_line >= self._plain_every_s:
            self._line()

    def close(self, completed: bool = True) -> None:
        """End the line; a plain closing line only if the work completed and anything was done."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._plain and completed and self._started_any:
            self._line(final=True)
        self._plain = self._tty = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(completed=exc_type is None)

    # --- plain lines -----------------------------------------------------------------------

    def _line(self, final: bool = False) -> None:
        now = time.monotonic()
        self._last_line = now
        elapsed_s = max(now - self._started, 1e-9)
        rate = self.done / elapsed_s
        parts = [_human(self.done, self.unit)]
        if self._total:
            parts[0] += f" of {_human(self._total, self.unit)}"
        parts.append(f"{_human(rate, self.unit)}/s")
        if final:
            parts.append(f"done in {elapsed_s:.0f} s")
        elif self._total and rate > 0:
            parts.append(f"about {max(self._total - self.done, 0) / rate:.0f} s left")
        percent = f"{min(self.done / self._total, 1):.0%} " if self._total else ""
        self._stream.write(f"{self.label}: {percent}({', '.join(parts)})\n")
        self._stream.flush()
