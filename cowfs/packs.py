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
  Bytes appended but not synced may be missing or torn after a crash; no
  committed record refers to them, because callers sync before they commit.
"""

import contextlib
import errno
import fcntl
import os

from . import schema

PACK_TARGET_BYTES = 64 << 20     # start a new pack beyond this size
# Space that chunk writes leave free on the store's filesystem, so that the
# metadata commits which free space (unlink, destroy, gc) still fit when the
# disk is "full" -- LMDB is copy-on-write and needs new pages even to delete.
# Like ZFS's slop space: 1% of the filesystem, at least 4 MiB, at most 1 GiB.
RESERVE_FRACTION = 0.01
RESERVE_MIN_BYTES = 4 << 20
RESERVE_MAX_BYTES = 1 << 30


class PackSyncError(OSError):
    """fdatasync of a pack failed: its unsynced bytes may be gone (rule 3).

    Distinct from a failed write: after a failed write nothing was
    acknowledged and the caller still holds the bytes; after a failed sync
    the kernel may have dropped dirty pages and a retry could "succeed"
    without them (PostgreSQL's fsyncgate), so callers treat it as fatal.
    """


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
        self._read_fds: dict[int, int] = {}
        # gc turns this off: compaction writes a little to free a lot.
        self.keep_reserve = True

    def space_for_chunks(self) -> int:
        """Bytes chunk writes may still use before reaching the reserve."""
        st = os.statvfs(self.packs_dir)
        reserve = 0
        if self.keep_reserve:
            total = st.f_blocks * st.f_frsize
            reserve = min(RESERVE_MAX_BYTES, max(RESERVE_MIN_BYTES, int(total * RESERVE_FRACTION)))
        return st.f_bavail * st.f_frsize - reserve

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
        return self.writer_class(pack_id, fd, schema.PACK_HEADER.size, self.space_for_chunks)

    def read(self, pack_id: int, offset: int, length: int) -> bytes:
        fd = self._read_fds.get(pack_id)
        if fd is None:
            fd = os.open(self.path(pack_id), os.O_RDONLY)
            self._read_fds[pack_id] = fd
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"pack {pack_id:08x} is shorter than the catalog says "
                                     f"(wanted {length} bytes at {offset})")
        return data

    def drop_unlinked(self) -> None:
        """Close read handles of packs gc removed, so their space is freed."""
        for pack_id, fd in list(self._read_fds.items()):
            if os.fstat(fd).st_nlink == 0:
                os.close(fd)
                del self._read_fds[pack_id]

    def size(self, pack_id: int) -> int:
        return os.stat(self.path(pack_id)).st_size

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
    """The one pack a process appends to. Not shared between processes."""

    def __init__(self, pack_id: int, fd: int, size_bytes: int, space_for_chunks=None):
        self.pack_id = pack_id
        self._fd = fd
        self.size_bytes = size_bytes
        self.broken = False
        self._space_for_chunks = space_for_chunks
        self._budget_bytes = 0         # may append this much before asking statvfs again

    def append(self, chunk_id: bytes, data: bytes) -> int:
        """Append one entry; return the offset of its data bytes."""
        if self.broken:
            raise OSError(errno.EIO, f"pack {self.pack_id:08x} had a write error; use a new pack")
        header = schema.ENTRY_HEADER.pack(schema.ENTRY_MAGIC, len(data), chunk_id)
        self._take_space(len(header) + len(data))
        start = self.size_bytes
        try:
            written = self._pwritev([header, data], start)
            if written != len(header) + len(data):
                raise OSError(errno.ENOSPC, "short write to pack file")
        except OSError:
            self._undo_to(start)
            raise
        self.size_bytes = start + written
        return start + len(header)

    def _take_space(self, length: int) -> None:
        """ENOSPC before the reserve is touched (see RESERVE_FRACTION)."""
        if self._space_for_chunks is None or self._budget_bytes >= length:
            self._budget_bytes -= length
            return
        # Half of what is left: other writers (LMDB, other daemons) share it.
        self._budget_bytes = self._space_for_chunks() // 2
        if self._budget_bytes < length:
            self._budget_bytes = 0
            raise OSError(errno.ENOSPC, "the store's filesystem is full (the rest is reserved for "
                                        "metadata); free space with 'cowfs destroy' and 'cowfs gc'")
        self._budget_bytes -= length

    def _undo_to(self, size_bytes: int) -> None:
        """Drop a partial entry so that the next append starts clean."""
        try:
            os.ftruncate(self._fd, size_bytes)
        except OSError:
            self.broken = True

    def sync(self) -> None:
        """Make every appended byte durable (rule 1: before any commit naming it)."""
        try:
            self._fdatasync()
        except OSError as exc:
            # After a failed fdatasync the kernel may have dropped the dirty
            # pages; nothing in this file written since the last good sync
            # can be trusted, so never append to it again (rule 3).
            self.broken = True
            raise PackSyncError(exc.errno, f"syncing pack {self.pack_id:08x} failed: "
                                           f"{exc.strerror or exc}") from exc

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
        os.close(self._fd)


PackStore.writer_class = PackWriter
