"""Fault injection for tests only: failing pack I/O and crashes at named points.

Nothing here is active unless the environment variable ``COWFS_FAULTS`` is
set, which only the test suite does (tests/test_reliability_*.py). A
production process never sets it; with it unset, `pack_store` returns the
real `PackStore` and `point` is a dictionary lookup that finds nothing.

``COWFS_FAULTS`` is a comma-separated list of items:

``pack_write=ERRNO@N``
    The N-th pack write fails with ERRNO (e.g. ``EIO``, ``ENOSPC``) as if
    the disk had refused it; the real `PackWriter` error handling runs. A
    write is one ``pwritev`` of up to 512 queued chunk entries (a batch's
    appends are coalesced), not one per chunk.
``pack_sync=ERRNO@N``
    The N-th pack fdatasync fails with ERRNO (the fsyncgate case).
``log_write=ERRNO@N``, ``log_sync=ERRNO@N``
    The same for the N-th write or fdatasync of a volume's intent log.
``pack_sync_delay=MS``, ``log_sync_delay=MS``
    Every pack (intent log) fdatasync takes MS milliseconds longer (a slow
    disk), so a test can act while a flush is in flight.
``crash=POINT@N``
    The N-th time the process reaches POINT it ends at once with
    ``os._exit(CRASH_EXIT_STATUS)``, like a power cut of that process (no
    cleanup, no flush, locks released by the kernel). POINT is one of `POINTS`.
``armed_by=PATH``
    Count calls only while the file PATH exists, so a test can mount and set
    up first, then arm the fault by creating the file.

The fakes wrap the *operating-system call* (`PackWriter._pwritev` and
`PackWriter._fdatasync`, `LogWriter._pwritev` and `LogWriter._fdatasync`
through `os_call`), never the logic under test.
"""

import errno
import os
import time
from typing import Optional

from .packs import PackStore, PackWriter

ENV_VAR = "COWFS_FAULTS"
CRASH_EXIT_STATUS = 86

POINTS = {
    "pack.written": "chunk entries were written to the pack, not yet synced",
    "pack.synced": "the pack was synced, nothing committed yet",
    "fold.before": "a fold's LMDB write transaction is complete but not committed",
    "fold.after": "a fold's LMDB transaction committed, its fsyncs not yet answered",
    "commit.before": "a change's (namespace, truncate, snapshot) transaction is complete, not committed",
    "commit.after": "a change's transaction committed, not yet answered",
    "log.written": "a batch of intent-log records was written, not yet synced",
    "log.synced": "the intent log was synced, the fsyncs not yet answered",
    "replay.middle": "a replay staged the logged chunks, its commit not yet made",
    "gc.copied": "gc copied live chunks to a new pack and synced it, nothing committed",
    "gc.moved": "gc committed the new chunk locations, the old pack still exists",
    "gc.dropping": "gc committed the removal of an empty pack's statistics, file not unlinked",
    "gc.punched": "gc punched the dead ranges of a pack it does not compact",
    "receive.staged": "a receive appended the chunks of one more chunk frame; nothing synced or committed",
    "receive.synced": "a receive made every chunk it wrote durable; nothing committed",
    "receive.committing": "a receive's transaction is complete (snapshot, digest checked), not committed",
    "receive.committed": "a receive committed; its temporary state is not cleaned up yet",
}


class Plan:
    """The parsed ``COWFS_FAULTS`` value and its call counters."""

    def __init__(self, spec: str):
        self.io: dict[str, tuple[int, int]] = {}       # "pack_write"/"pack_sync" -> (errno, nth)
        self.crashes: dict[str, int] = {}               # point -> nth
        self.armed_by: Optional[str] = None
        self.sync_delay_s = 0.0
        self.log_sync_delay_s = 0.0
        self.calls: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            self._parse(item)

    def _parse(self, item: str) -> None:
        key, _, value = item.partition("=")
        if key == "armed_by":
            self.armed_by = value
            return
        if key == "pack_sync_delay":
            self.sync_delay_s = int(value) / 1000
            return
        if key == "log_sync_delay":
            self.log_sync_delay_s = int(value) / 1000
            return
        what, _, nth = value.partition("@")
        nth_call = int(nth or "1")
        if key in ("pack_write", "pack_sync", "log_write", "log_sync"):
            self.io[key] = (getattr(errno, what), nth_call)
        elif key == "crash" and what in POINTS:
            self.crashes[what] = nth_call
        else:
            raise ValueError(f"{ENV_VAR}: cannot parse {item!r}")

    def _count(self, name: str) -> int:
        if self.armed_by is not None and not os.path.exists(self.armed_by):
            return 0
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.calls[name]

    def io_call(self, name: str) -> None:
        """Raise the planned error if this is the planned call of `name`."""
        if name in self.io and self._count(name) == self.io[name][1]:
            code = self.io[name][0]
            raise OSError(code, f"injected fault: {os.strerror(code)} ({name})")

    def reach(self, point_name: str) -> None:
        if point_name in self.crashes and self._count(point_name) == self.crashes[point_name]:
            os._exit(CRASH_EXIT_STATUS)


_plan: Optional[Plan] = None


def install_from_env() -> None:
    """Read ``COWFS_FAULTS`` (tests only); called once by `Store` when it opens."""
    global _plan
    spec = os.environ.get(ENV_VAR)
    _plan = Plan(spec) if spec else None


def point(point_name: str) -> None:
    """A named step of a write path where a test may crash the process."""
    if _plan is not None:
        _plan.reach(point_name)


def os_call(name: str) -> None:
    """Before a real operating-system call named `name` ("log_write",
    "log_sync"): fails it, or delays a sync, as planned."""
    if _plan is not None:
        _plan.io_call(name)
        if (name == "log_sync" and _plan.log_sync_delay_s
                and (_plan.armed_by is None or os.path.exists(_plan.armed_by))):
            time.sleep(_plan.log_sync_delay_s)


def pack_store(packs_dir: str) -> PackStore:
    """The real pack store, or one whose writers fail as planned."""
    return PackStore(packs_dir) if _plan is None else FaultyPackStore(packs_dir)


class FaultyPackWriter(PackWriter):
    """A `PackWriter` whose operating-system calls fail or crash as planned."""

    def _pwritev(self, buffers: list, offset: int) -> int:
        _plan.io_call("pack_write")
        written = super()._pwritev(buffers, offset)
        point("pack.written")
        return written

    def _fdatasync(self) -> None:
        _plan.io_call("pack_sync")
        if _plan.sync_delay_s and (_plan.armed_by is None or os.path.exists(_plan.armed_by)):
            time.sleep(_plan.sync_delay_s)
        super()._fdatasync()
        point("pack.synced")


class FaultyPackStore(PackStore):
    writer_class = FaultyPackWriter
