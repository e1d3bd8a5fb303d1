"""The FUSE adapter with the daemon's operation figures: bytes written, fsync latency.

A subclass of `fuse_ops.FuseOps`, so the adapter itself stays as it is: the
daemon mounts with `CountedOps` and reports `figures()` in its ``stats``
answer (`cowfs status`, `cowfs metrics`).
"""

import time

from .fuse_ops import FuseOps
from .histogram import LatencyHistogram


class CountedOps(FuseOps):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written_bytes = 0
        self.write_requests = 0
        self.fsync_latency = LatencyHistogram()        # fsync, fdatasync and fsyncdir alike

    async def write(self, fh, offset, buf):
        written = await super().write(fh, offset, buf)
        self.written_bytes += written
        self.write_requests += 1
        return written

    async def fsync(self, fh, datasync):
        await self._timed(super().fsync(fh, datasync))

    async def fsyncdir(self, fh, datasync):
        await self._timed(super().fsyncdir(fh, datasync))

    async def _timed(self, call) -> None:
        started = time.monotonic()
        try:
            await call
        finally:
            # Failed fsyncs count too: a slow failure is what an operator hunts.
            self.fsync_latency.observe(time.monotonic() - started)

    def figures(self) -> dict:
        return dict(written_bytes_total=self.written_bytes, write_requests_total=self.write_requests,
                    fsyncs_total=self.fsync_latency.count)
