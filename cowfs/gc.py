"""Reclaiming pack space: remove dead packs, compact or punch the rest.

Dead bytes are bytes no chunk entry points at. One pass:

1. every pack with no live chunk is removed (needs no space: works on a
   full disk);
2. every other pack at least `min_dead_fraction` dead (of the disk space it
   takes), or live for less than that fraction of its length, is, deadest
   first,
   * compacted when a copy of its live part fits in the free space (the
     reserve included: compaction writes a little to free a lot): live
     entries are copied to gc's own pack, synced (rule 1), moved in one
     transaction, then the old file is removed;
   * otherwise its dead ranges are punched out (fallocate PUNCH_HOLE):
     their blocks go back to the filesystem at once, without writing
     anything, and the live entries stay where they are. Only whole
     blocks inside a dead range go, so the headers of live entries stay.
   So gc never needs more space than it has, and never leaves the disk
   fuller than it found it.

Safe while volumes are mounted and written:
* A pack that a process appends to is share-locked by it (flock); gc only
  touches packs it can lock exclusively, so it never races an appender. A
  crashed daemon's lock vanishes with it.
* An entry is deleted in the transaction that brings its count to zero
  (rule 4); gc syncs the environment before punching, so that the daemons'
  commits that freed the bytes (made without a meta-page flush) are durable
  first. A dead entry never comes back: the same bytes written again are
  appended anew.
* Only after the compaction's commit is the old file unlinked. A reader
  that located a chunk just before finds the file gone, or a punched
  range, and looks again (`ChunkStore`, `Filesystem.plan_read`).
* A chunk whose bytes no longer match its id is never copied: it stays in
  its pack, which therefore stays, so fsck --verify-data keeps naming it.
* A crash at any step (see the `faults.point` names) leaves either the old
  location or the new one committed; fsck is clean after each.
"""

import contextlib
import errno
import fcntl
import os

from . import faults, packs, schema, space
from .chunks import chunk_id_of
from .errors import StoreIOError, UsageError
from .store import Store

DEFAULT_MIN_DEAD_FRACTION = 0.25


class OutOfSpace(Exception):
    """A compaction could not copy its live chunks (the disk is full); its
    partial copy was cut off again, nothing was committed."""


def _try_lock(path: str):
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _pack_stats(store: Store, pack_id: int) -> tuple[int, int]:
    with store.env.begin() as txn:
        raw = txn.get(schema.pack_key(pack_id), db=store.env.packs)
    return schema.unpack_pack_stats(raw) if raw else (0, 0)


def _live_entries(store: Store, pack_ids: set[int]) -> dict[int, list[tuple[int, int, bytes]]]:
    """pack_id -> sorted (offset, length, chunk_id) of every entry the index
    points at, for `pack_ids`: one pass over the chunk index."""
    live: dict[int, list] = {pack_id: [] for pack_id in pack_ids}
    with store.env.begin() as txn:
        for chunk_id, raw in txn.cursor(db=store.env.chunks):
            pack_id, offset, length, _refcount = schema.unpack_chunk(raw)
            entries = live.get(pack_id)
            if entries is not None:
                entries.append((offset, length, bytes(chunk_id)))
    for entries in live.values():
        entries.sort()
    return live


def _compact(store: Store, pack_id: int, entries: list) -> int:
    """Move the live `entries` out of `pack_id`; returns how many moved.

    Appends are queued and written with few large writes; on ENOSPC the
    copy so far is cut off gc's pack again (nothing refers to it yet), so
    a compaction that does not fit never leaves the disk fuller."""
    env = store.env
    batch = store.chunks.batch()
    moved = []
    writer, start_bytes = None, 0
    try:
        writer = store.chunks._active_writer()
        start_bytes = writer.size_bytes
        for offset, length, chunk_id in entries:
            data = store.packs.read(pack_id, offset, length)
            if chunk_id_of(data) != chunk_id:
                continue         # damaged: leave it (and so its pack) where fsck finds it
            new_offset = writer.append_deferred(chunk_id, data)
            batch._writers.add(writer)
            moved.append((chunk_id, offset, writer.pack_id, new_offset, length))
        batch.sync()                                        # rule 1
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if writer is not None:
            writer.cut_back(start_bytes)
        raise OutOfSpace(str(exc)) from exc
    faults.point("gc.copied")
    with env.begin(write=True) as txn:
        for chunk_id, old_offset, new_pack, new_offset, length in moved:
            raw = txn.get(chunk_id, db=env.chunks)
            if raw is None:
                continue
            loc_pack, loc_offset, _len, refcount = schema.unpack_chunk(raw)
            if (loc_pack, loc_offset) != (pack_id, old_offset):
                continue
            txn.put(chunk_id, schema.pack_chunk(new_pack, new_offset, length, refcount), db=env.chunks)
            _shift_stats(txn, env, pack_id, new_pack, length)
    faults.point("gc.moved")
    return len(moved)


def _shift_stats(txn, env, old_pack: int, new_pack: int, length: int) -> None:
    for pack_id, sign in ((old_pack, -1), (new_pack, 1)):
        key = schema.pack_key(pack_id)
        raw = txn.get(key, db=env.packs)
        live_bytes, live_chunks = schema.unpack_pack_stats(raw) if raw else (0, 0)
        txn.put(key, schema.pack_pack_stats(live_bytes + sign * length, live_chunks + sign), db=env.packs)


def _drop_if_empty(store: Store, pack_id: int) -> int:
    """Remove an empty pack: its stats first (committed), then the file."""
    env = store.env
    path = store.packs.path(pack_id)
    with env.begin(write=True) as txn:
        raw = txn.get(schema.pack_key(pack_id), db=env.packs)
        if raw is not None and schema.unpack_pack_stats(raw)[1] != 0:
            return 0
        txn.delete(schema.pack_key(pack_id), db=env.packs)
    faults.point("gc.dropping")
    size = os.path.getsize(path)
    os.unlink(path)
    return size


def _dead_ranges(entries: list, size_bytes: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of a pack that no live entry covers (each
    live entry is its header and its data)."""
    ranges, cursor = [], schema.PACK_HEADER.size
    for offset, length, _chunk_id in entries:
        header_at = offset - schema.ENTRY_HEADER.size
        if header_at > cursor:
            ranges.append((cursor, header_at))
        cursor = max(cursor, offset + length)
    if size_bytes > cursor:
        ranges.append((cursor, size_bytes))
    return ranges


def _punch(store: Store, pack_id: int, fd: int, entries: list) -> int:
    """Punch the whole blocks of every dead range out of the pack; returns
    the disk bytes given back."""
    try:
        given = packs.punch_ranges(fd, _dead_ranges(entries, os.fstat(fd).st_size))
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        return 0                # a filesystem without holes: compaction only
    faults.point("gc.punched")
    return given


def _fits(store: Store, live_bytes: int, live_chunks: int) -> bool:
    """Is there room (reserve included: gc may use it) for a copy of the live
    chunks, with the reserve's own share left for the metadata commit?"""
    st = os.statvfs(store.packs.packs_dir)
    needed = live_bytes + live_chunks * schema.ENTRY_HEADER.size
    return needed + space.reserve_bytes(st) // 4 <= space.free_bytes(st)


def collect(store: Store, min_dead_fraction: float = DEFAULT_MIN_DEAD_FRACTION,
            progress=None) -> dict:
    """One gc pass over every pack no process is appending to (see the module doc).

    progress(done_bytes, total_bytes), if given, after each pack compacted or
    punched: bytes of the candidate packs handled so far (by their disk usage)."""
    if not 0.0 <= min_dead_fraction <= 1.0:        # also refuses NaN
        raise UsageError(f"--min-dead {min_dead_fraction} is not a fraction between 0 and 1 "
                         "(e.g. 0.25: compact packs at least a quarter dead)")
    result = dict(packs_removed=0, packs_compacted=0, packs_punched=0, chunks_moved=0,
                  bytes_before=0, bytes_after=0, bytes_punched=0, packs_skipped_no_space=0)
    store.packs.space.keep_reserve = False
    try:
        with _gc_lock(store):
            _collect(store, min_dead_fraction, result, progress or (lambda done, total: None))
    except OSError as exc:
        raise StoreIOError(f"gc of {store.path} failed: {exc}; nothing committed was lost, "
                           "run 'cowfs fsck' and gc again") from exc
    finally:
        store.chunks.close_writer()
    result["bytes_after"] = sum(store.packs.disk_bytes(p) for p in store.packs.pack_ids())
    store.packs.space.keep_reserve = True
    result["store_full"] = store.packs.space.low()
    return result


@contextlib.contextmanager
def _gc_lock(store: Store):
    """One gc pass of a store at a time (a person's and a daemon's, see
    space_keeper): the second waits for the first."""
    fd = os.open(os.path.join(store.run_dir, "gc.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _collect(store: Store, min_dead_fraction: float, result: dict, progress) -> None:
    candidates = []
    for pack_id in store.packs.pack_ids():
        disk_bytes = store.packs.disk_bytes(pack_id)
        result["bytes_before"] += disk_bytes
        live_bytes, live_chunks = _pack_stats(store, pack_id)
        if live_chunks == 0:
            if _unless_busy(store, pack_id, lambda fd: _drop_if_empty(store, pack_id)):
                result["packs_removed"] += 1
            continue
        # Dead by disk usage: what gc gives back. A pack whose dead ranges
        # were punched out already counts only if little of it is live: then
        # a copy is cheap and removes a file that is mostly holes.
        dead_bytes = disk_bytes - live_bytes - live_chunks * schema.ENTRY_HEADER.size
        live_fraction = live_bytes / max(store.packs.size(pack_id), 1)
        if disk_bytes and (dead_bytes / disk_bytes >= min_dead_fraction
                           or live_fraction < min_dead_fraction):
            candidates.append((max(dead_bytes / disk_bytes, 1 - live_fraction), pack_id))
    if not candidates:
        return
    live = _live_entries(store, {pack_id for _fraction, pack_id in candidates})
    synced = False
    sizes = {pack_id: store.packs.disk_bytes(pack_id) for _fraction, pack_id in candidates}
    total, done_bytes = sum(sizes.values()), 0
    for _fraction, pack_id in sorted(candidates, reverse=True):
        progress(done_bytes, total)
        done_bytes += sizes[pack_id]
        live_bytes, live_chunks = _pack_stats(store, pack_id)
        if _fits(store, live_bytes, live_chunks):
            done = _unless_busy(store, pack_id, lambda fd: _compact_and_drop(store, pack_id, live[pack_id]))
            if done:
                result["chunks_moved"] += done[0]
                result["packs_compacted"] += 1
                result["packs_removed"] += done[1]
                continue
        if not synced:
            # Rule 4: the commits that freed these bytes are durable before
            # the bytes go (a daemon commits without flushing the meta page).
            store.env.lmdb.sync(True)
            synced = True
        punched = _unless_busy(store, pack_id, lambda fd: _punch(store, pack_id, fd, live[pack_id]))
        if punched:
            result["packs_punched"] += 1
            result["bytes_punched"] += punched
        elif punched is not None and not _fits(store, live_bytes, live_chunks):
            result["packs_skipped_no_space"] += 1
    progress(done_bytes, total)


def _unless_busy(store: Store, pack_id: int, action):
    """`action(fd)` under the pack's exclusive lock; None if a process appends to it."""
    lock_fd = _try_lock(store.packs.path(pack_id))
    if lock_fd is None:
        return None
    try:
        return action(lock_fd)
    finally:
        os.close(lock_fd)


def _compact_and_drop(store: Store, pack_id: int, entries: list):
    """(chunks moved, packs removed), or None when the copy did not fit after all."""
    try:
        moved = _compact(store, pack_id, entries)
    except OutOfSpace:
        return None
    removed = 1 if _pack_stats(store, pack_id)[1] == 0 and _drop_if_empty(store, pack_id) else 0
    return moved, removed
