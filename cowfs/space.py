"""How much of the store's filesystem chunk writes may use.

The free space of the filesystem that holds the store is shared out in
three levels, from the top down:

* **ordinary** chunk writes stop `grace_bytes + reserve_bytes` short of full;
* the **grace** opens for a mount daemon once one of its flushes failed for
  lack of space, and closes when the free space is back above both levels.
  When PostgreSQL fills a store, its failed WAL fsync makes it PANIC while
  its last writes are still buffered (by cowfs and by the kernel: up to
  twice `filesystem.DIRTY_LIMIT_BYTES` and a few tens of MiB). Its restart
  must write them, plus the pages its redo rewrites, before anyone can
  `DROP TABLE`: the grace is what lets that restart finish. (A plain disk
  allocates blocks at write(2) time and overwrites in place, so there the
  restart needs no new space; a copy-on-write store needs this cushion.)
  The files that were open when it opened fail every fsync while it is
  open (`namespace.fsync_target`): a writer that goes on writing through
  them -- PostgreSQL commits through its WAL file for seconds before its
  checkpointer PANICs -- would otherwise use the grace up before its own
  restart needs it.
* the **reserve** is for the commits that free space -- unlink, destroy,
  gc (LMDB is copy-on-write and needs new pages even to delete) -- and for
  the few chunk writes of operations that free more than they write (gc
  compaction, the cut chunk of a truncate). Like ZFS's slop space.

Everything is measured from `statvfs` at the time of asking: other daemons,
LMDB and other programs use the same filesystem.
"""

import logging
import os

log = logging.getLogger(__name__)

# The reserve: 1% of the filesystem, at least 4 MiB, at most 1 GiB.
RESERVE_FRACTION = 0.01
RESERVE_MIN_BYTES = 4 << 20
RESERVE_MAX_BYTES = 1 << 30
# The grace: what a store's writers may hold buffered when it fills (twice
# the daemon's dirty limit), plus 1% of the filesystem for the writes of a
# crash recovery; at most 1 GiB more.
GRACE_BUFFERED_BYTES = 64 << 20
GRACE_FRACTION = 0.01
GRACE_MAX_EXTRA_BYTES = 1 << 30
# Below this fraction of the filesystem left for ordinary writes, a mount
# daemon runs gc by itself after deletions (space_keeper).
LOW_SPACE_FRACTION = 0.05


def reserve_bytes(st: os.statvfs_result) -> int:
    total = st.f_blocks * st.f_frsize
    return min(RESERVE_MAX_BYTES, max(RESERVE_MIN_BYTES, int(total * RESERVE_FRACTION)))


def grace_bytes(st: os.statvfs_result) -> int:
    total = st.f_blocks * st.f_frsize
    return GRACE_BUFFERED_BYTES + min(GRACE_MAX_EXTRA_BYTES, int(total * GRACE_FRACTION))


def free_bytes(st: os.statvfs_result) -> int:
    return st.f_bavail * st.f_frsize


class SpaceBudget:
    """The levels of one process's chunk writes on one store's filesystem."""

    def __init__(self, path: str):
        self.path = path
        self.grace_open = False
        self.fills = 0            # times the grace opened (`namespace.fsync_target`)
        # gc turns this off: its writes are part of freeing space.
        self.keep_reserve = True

    def available(self, use_reserve: bool = False) -> int:
        """Bytes chunk writes may still take (may be negative).

        `use_reserve`: for writes that free more than they take (gc
        compaction, a truncate's cut chunk): everything but a quarter of the
        reserve, which stays for their own metadata commit."""
        st = os.statvfs(self.path)
        free = free_bytes(st)
        if use_reserve or not self.keep_reserve:
            return free - reserve_bytes(st) // 4
        if self.grace_open and free >= reserve_bytes(st) + 2 * grace_bytes(st):
            self.grace_open = False
            log.info("space is back above the grace on %s; the grace closes", self.path)
        if self.grace_open:
            return free - reserve_bytes(st)
        return free - reserve_bytes(st) - grace_bytes(st)

    def open_grace(self) -> None:
        """A flush failed for space: let the next commits use the grace."""
        if not self.grace_open:
            self.grace_open = True
            self.fills += 1
            log.warning("the store's filesystem (%s) is full: the grace space opens for the "
                        "buffered writes and a crash recovery; delete data to get space back",
                        self.path)

    def full_since(self, fills_then: int) -> bool:
        """Has the grace opened since `fills` read `fills_then`, and is it still
        open? Measures the free space again only then: the grace may close
        without a chunk write to notice it (see `available`)."""
        if not (self.grace_open and self.fills > fills_then):
            return False
        self.available()
        return self.grace_open

    def low(self) -> bool:
        """Is less than LOW_SPACE_FRACTION of the filesystem left for ordinary writes?"""
        st = os.statvfs(self.path)
        ordinary = free_bytes(st) - reserve_bytes(st) - grace_bytes(st)
        return ordinary < LOW_SPACE_FRACTION * st.f_blocks * st.f_frsize

    def figures(self) -> dict:
        """For `cowfs df`: the filesystem and the levels, in bytes."""
        st = os.statvfs(self.path)
        return dict(size_bytes=st.f_blocks * st.f_frsize, free_bytes=free_bytes(st),
                    reserve_bytes=reserve_bytes(st), grace_bytes=grace_bytes(st))
