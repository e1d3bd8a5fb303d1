"""Progress of a long transfer, on stderr: a live bar on a terminal, plain lines otherwise.

The bar is tqdm's (bytes, rate, time left). When stderr is not a terminal
(a log, a pipe, a service), a plain line every `interval_s` says the same,
so a log is not filled with carriage returns. Nothing at all with `quiet`
(the commands' --json: their output is the summary alone).
"""

import sys
import time
from typing import Optional, TextIO

from .cli_common import human

PLAIN_INTERVAL_S = 10.0


class Progress:
    """Call `start(total_bytes)` once the size is known (an estimate is fine), then `update`."""

    def __init__(self, what: str, quiet: bool = False, stream: Optional[TextIO] = None,
                 interval_s: float = PLAIN_INTERVAL_S):
        self.what, self.quiet = what, quiet
        self.total_bytes: Optional[int] = None
        self.done_bytes = 0
        self._stream = stream or sys.stderr
        self._bar = None
        self._plain = False
        self._started = self._last_line = time.monotonic()
        self._interval_s = interval_s

    def start(self, total_bytes: Optional[int]) -> None:
        self.total_bytes = total_bytes or None
        if self.quiet:
            return
        if self._stream.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=self.total_bytes, initial=self.done_bytes, desc=self.what, unit="B",
                             unit_scale=True, unit_divisor=1024, file=self._stream, leave=False,
                             dynamic_ncols=True)
        else:
            self._plain = True

    def update(self, size_bytes: int) -> None:
        self.done_bytes += size_bytes
        if self._bar is not None:
            self._bar.update(size_bytes)
        elif self._plain:
            now = time.monotonic()
            if now - self._last_line >= self._interval_s:
                self._last_line = now
                print(self.line(now), file=self._stream, flush=True)

    def line(self, now: float) -> str:
        """'cowfs send: 1.2 GiB of about 4.0 GiB (30 %), 85.0 MiB/s, about 35 s left'."""
        rate = self.done_bytes / max(now - self._started, 1e-6)
        text = f"cowfs {self.what}: {human(self.done_bytes)}"
        if self.total_bytes:
            left = max(self.total_bytes - self.done_bytes, 0)
            text += (f" of about {human(self.total_bytes)} "
                     f"({min(100, 100 * self.done_bytes // self.total_bytes)} %)")
        text += f", {human(int(rate))}/s"
        if self.total_bytes and rate > 0:
            text += f", about {left / rate:.0f} s left"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
