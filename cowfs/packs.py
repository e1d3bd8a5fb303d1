"""Append-only pack files holding chunk bytes.

This is the storage interface a remote object-store backend could implement
later: create a pack, append entries, make them durable, read a byte range.
It knows nothing of LMDB, chunk ids beyond writing them into entry headers,
or reference counts.

What holds after a crash (kill -9 or power loss):
* A pack file exists on disk once `PackStore.create` returned (the file and
  its directory entry were fsynced), so a committed record can never name a
  pack that vanished.
* Bytes appended are durable once `PackWriter.sync` returned (rule 1).
  Bytes appended but not synced may be missing or torn after a crash (or,
  if still queued in the writer, never written at all); no committed record
  refers to them, because callers sync before they commit.
"""

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import threading

from . import schema
from .space import SpaceBudget

log = logging.getLogger(__name__)

PACK_TARGET_BYTES = 64 << 20     # start a new pack beyond this size
# One coalesced pwritev writes at most this many entries (two iovecs each:
# IOV_MAX is 1024) or about this many bytes, so a commit of a large write
# costs one system call per ~4 MiB instead of one per chunk.
MAX_FLUSH_ENTRIES = 512
MAX_FLUSH_BYTES = 4 << 20

_ENTRY_HEADER_SIZE = schema.ENTRY_HEADER.size
_pack_entry_header = schema.ENTRY_HEADER.pack
_ENTRY_MAGIC = schema.ENTRY_MAGIC


class PackSyncError(OSError):
    """fdatasync of a pack failed: its unsynced bytes may be gone (rule 3).

    Distinct from a failed write: after a failed write nothing was
    acknowledged and the caller still holds the bytes; after a failed sync
    the kernel may have dropped dirty pages and a retry could "succeed"
    without them (PostgreSQL's fsyncgate), so callers treat it as fatal.
    """


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give the blocks of [offset, offset + length) back to the filesystem;
    the range then reads as zeros and the file keeps its size."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"punching a hole in a pack: {os.strerror(code)}")


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for start, end in ranges:
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(start, end) for start, end in out]


def punch_ranges(fd: int, ranges: list[tuple[int, int]]) -> int:
    """Punch the whole blocks inside each [start, end); returns bytes given back."""
    st = os.fstat(fd)
    block = st.st_blksize or 4096
    for start, end in ranges:
        first, last = -(-start // block) * block, end // block * block
        if last > first:
            punch_hole(fd, first, last - first)
    return max(st.st_blocks * 512 - os.fstat(fd).st_blocks * 512, 0)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PackStore:
    """The directory of pack files of one store."""

    writer_class: type = None     # PackWriter, set below (a test-only subclass in `faults`)

    def __init__(self, packs_dir: str):
        self.packs_dir = packs_dir
        # Read handles, shared by the event loop and the threads that serve
        # large reads: `_lock` guards opening one and closing them, and
        # `_readers` counts reads in progress, during which none is closed.
        self._read_fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._readers = 0
        # How much chunk writes may take (the reserve and grace levels).
        self.space = SpaceBudget(packs_dir)

    def path(self, pack_id: int) -> str:
        return os.path.join(self.packs_dir, f"{pack_id:08x}.pack")

    def create(self, pack_id: int) -> "PackWriter":
        """Create an empty pack and make its existence durable."""
        path = self.path(pack_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Held while we append: gc leaves share-locked packs alone.
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.write(fd, schema.PACK_HEADER.pack(schema.PACK_MAGIC, pack_id)) != schema.PACK_HEADER.size:
                raise OSError(errno.ENOSPC, f"short write creating pack {path}")
            os.fsync(fd)
            fsync_dir(self.packs_dir)
        except BaseException:
            os.close(fd)
            # Nothing refers to the new pack yet; on a full disk do not leave
            # one empty file per retry behind.
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return self.writer_class(pack_id, fd, schema.PACK_HEADER.size, self.space.available)

    @contextlib.contextmanager
    def reading(self):
        """Around every `read`: no handle is closed while a read may use it."""
        with self._lock:
            self._readers += 1
        try:
            yield
        finally:
            with self._lock:
                self._readers -= 1

    def read(self, pack_id: int, offset: int, length: int) -> bytes:
        """Bytes of a pack. Threads other than the event loop call it inside
        `reading()`; pack writers never touch the read handles."""
        fd = self._read_fds.get(pack_id)
        if fd is None:
            with self._lock:        # two reader threads must not both open it (one fd would leak)
                fd = self._read_fds.get(pack_id)
                if fd is None:
                    fd = os.open(self.path(pack_id), os.O_RDONLY)
                    self._read_fds[pack_id] = fd
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"pack {pack_id:08x} is shorter than the catalog says "
                                     f"(wanted {length} bytes at {offset})")
        return data

    def punch_entries(self, locations) -> int:
        """Punch out the whole blocks of dead entries, given as (pack_id,
        offset of the data, length); entries back to back in a pack are
        punched as one range. Best effort: a pack gc removed meanwhile, or a
        filesystem without holes, leaves the space to gc. Returns the bytes
        given back."""
        given = 0
        by_pack: dict[int, list[tuple[int, int]]] = {}
        for pack_id, offset, length in locations:
            by_pack.setdefault(pack_id, []).append((offset - _ENTRY_HEADER_SIZE, offset + length))
        for pack_id, ranges in by_pack.items():
            try:
                fd = os.open(self.path(pack_id), os.O_WRONLY)
            except FileNotFoundError:
                continue
            try:
                given += punch_ranges(fd, _merged(sorted(ranges)))
            except OSError as exc:
                log.info("space of freed chunks in pack %08x left to gc (%s)", pack_id, exc)
            finally:
                os.close(fd)
        return given

    def drop_unlinked(self) -> None:
        """Close read handles of packs gc removed, so their space is freed.
        Skipped while reads are in progress; the periodic commit tries again."""
        with self._lock:
            if self._readers:
                return
            for pack_id, fd in list(self._read_fds.items()):
                if os.fstat(fd).st_nlink == 0:
                    os.close(fd)
                    del self._read_fds[pack_id]

    def size(self, pack_id: int) -> int:
        return os.stat(self.path(pack_id)).st_size

    def disk_bytes(self, pack_id: int) -> int:
        """Space the pack takes on disk (less than its size once gc punched it)."""
        return os.stat(self.path(pack_id)).st_blocks * 512

    def pack_ids(self) -> list[int]:
        ids = []
        for name in os.listdir(self.packs_dir):
            stem, dot, ext = name.partition(".")
            if ext == "pack" and len(stem) == 8:
                try:
                    ids.append(int(stem, 16))
                except ValueError:
                    pass
        return sorted(ids)

    def close(self) -> None:
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()


class PackWriter:
    """The one pack a process appends to. Not shared between processes, and
    never used by two threads at once (the caller guarantees it).

    Appends are coalesced: `append_deferred` reserves an entry (space and
    offset) and queues its buffers; `flush` writes the queue with one
    pwritev (at most MAX_FLUSH_ENTRIES entries or about MAX_FLUSH_BYTES);
    `sync` flushes, then fdatasyncs. `size_bytes` is the logical end of the
    pack, queued entries included, so offsets and `full` do not depend on
    when the queue is written.
    """

    def __init__(self, pack_id: int, fd: int, size_bytes: int, space_for_chunks=None):
        self.pack_id = pack_id
        self._fd = fd
        self.size_bytes = size_bytes           # logical end: written + queued
        self._written_bytes = size_bytes       # end of what reached the file
        self._synced_bytes = size_bytes        # end of what fdatasync made durable
        self._queue: list = []                 # header, data, header, data... not yet written
        self.broken = False
        self._space_for_chunks = space_for_chunks
        self._budget_bytes = 0         # may append this much before asking statvfs again

    def append(self, chunk_id: bytes, data: bytes) -> int:
        """Append one entry and write it now; return the offset of its data bytes."""
        offset = self.append_deferred(chunk_id, data)
        self.flush()
        return offset

    def append_deferred(self, chunk_id: bytes, data: bytes, use_reserve: bool = False) -> int:
        """Queue one entry; return the offset its data bytes will have.

        ENOSPC (reserve reached; with `use_reserve`, the disk itself full)
        is raised here, before anything is queued.
        `data` must not change until the entry is written (`flush`/`sync`):
        the queue holds it, not a copy. A write error of the queue surfaces
        from whichever call writes it (this one, `flush` or `sync`).
        """
        if self.broken:
            raise OSError(errno.EIO, f"pack {self.pack_id:08x} had a write error; use a new pack")
        length = len(data)
        self._take_space(_ENTRY_HEADER_SIZE + length, use_reserve)
        queue = self._queue
        queue.append(_pack_entry_header(_ENTRY_MAGIC, length, chunk_id))
        queue.append(data)
        offset = self.size_bytes + _ENTRY_HEADER_SIZE
        self.size_bytes = offset + length
        if (len(queue) >= 2 * MAX_FLUSH_ENTRIES
                or self.size_bytes - self._written_bytes >= MAX_FLUSH_BYTES):
            self.flush()
        return offset

    def flush(self) -> None:
        """Write the queued entries with one pwritev.

        On failure the pack is cut back to its last written entry (so the
        next append starts clean), the queue is dropped (nothing in it was
        acknowledged; the caller still holds the bytes) and the error raised.
        """
        if not self._queue:
            return
        start = self._written_bytes
        expected = self.size_bytes - start
        try:
            written = self._pwritev(self._queue, start)
            if written != expected:
                raise OSError(errno.ENOSPC, "short write to pack file")
        except OSError:
            self.size_bytes = start
            self._queue = []
            self._undo_to(start)
            raise
        self._queue = []
        self._written_bytes = self.size_bytes

    def discard_queued(self) -> None:
        """Forget queued, unwritten entries (their batch was abandoned); the
        space they had taken from the budget is given back."""
        self._budget_bytes += self.size_bytes - self._written_bytes
        self.size_bytes = self._written_bytes
        self._queue = []

    @property
    def dirty(self) -> bool:
        """True while some appended bytes are not yet durable."""
        return self.size_bytes != self._synced_bytes

    def _take_space(self, length: int, use_reserve: bool = False) -> None:
        """ENOSPC before the levels kept free are touched (see `space`)."""
        if self._space_for_chunks is None or self._budget_bytes >= length:
            self._budget_bytes -= length
            return
        if use_reserve:
            # Rare and small (the cut chunk of a truncate): ask every time,
            # and leave the budget of ordinary writes as it is.
            if self._space_for_chunks(use_reserve=True) < length:
                raise OSError(errno.ENOSPC, "the store's filesystem is full, even its reserve")
            return
        # Half of what is left: other writers (LMDB, other daemons) share it.
        self._budget_bytes = self._space_for_chunks() // 2
        if self._budget_bytes < length:
            self._budget_bytes = 0
            raise OSError(errno.ENOSPC, "the store's filesystem is full (the rest is reserved for "
                                        "deleting)")
        self._budget_bytes -= length

    def cut_back(self, size_bytes: int) -> None:
        """Forget every entry from `size_bytes` on, written or queued, and
        cut the file there. Only for appends no commit refers to (gc's copy
        of a compaction that did not fit)."""
        self._queue = []
        self._undo_to(size_bytes)
        self.size_bytes = self._written_bytes = min(self._written_bytes, size_bytes)
        self._synced_bytes = min(self._synced_bytes, size_bytes)

    def _undo_to(self, size_bytes: int) -> None:
        """Drop a partial entry so that the next append starts clean."""
        try:
            os.ftruncate(self._fd, size_bytes)
        except OSError:
            self.broken = True

    def sync(self) -> None:
        """Make every appended byte durable (rule 1: before any commit naming it).

        Writes the queue first; a failure there is a plain write error
        (nothing acknowledged, the pack cut back, see `flush`), not a
        `PackSyncError`.
        """
        self.flush()
        try:
            self._fdatasync()
        except OSError as exc:
            # After a failed fdatasync the kernel may have dropped the dirty
            # pages; nothing in this file written since the last good sync
            # can be trusted, so never append to it again (rule 3).
            self.broken = True
            raise PackSyncError(exc.errno, f"syncing pack {self.pack_id:08x} failed: "
                                           f"{exc.strerror or exc}") from exc
        self._synced_bytes = self._written_bytes

    # The two operating-system calls, separate so that the test-only fakes
    # in `faults` can fail them without replacing any logic above.
    def _pwritev(self, buffers: list, offset: int) -> int:
        return os.pwritev(self._fd, buffers, offset)

    def _fdatasync(self) -> None:
        os.fdatasync(self._fd)

    @property
    def full(self) -> bool:
        return self.size_bytes >= PACK_TARGET_BYTES

    def close(self) -> None:
        """Close the pack; queued entries are dropped (never synced, so no
        committed record names them)."""
        self._queue = []
        os.close(self._fd)


PackStore.writer_class = PackWriter
