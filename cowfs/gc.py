"""Reclaiming pack space: drop empty packs, compact packs that are mostly dead.

Safe while volumes are mounted and written:
* A pack that a process appends to is share-locked by it (flock); gc only
  touches packs it can lock exclusively, so it never races an appender. A
  crashed daemon's lock vanishes with it.
* Dead bytes are bytes no chunk entry points at. An entry is deleted in the
  transaction that brings its count to zero (rule 4), so gc never frees
  bytes a committed record still names.
* Compaction copies live entries to gc's own new pack, syncs it (rule 1),
  then in one transaction moves every entry that still points at the old
  place; only after that commit is the old file unlinked. A reader that
  looked a location up just before finds the file gone and looks again
  (`ChunkStore.read`).
* A chunk whose bytes no longer match its id is never copied: it stays in
  its pack, which therefore stays, so fsck --verify-data keeps naming it.
* A crash at any step (see the `faults.point` names) leaves either the old
  location or the new one committed; fsck is clean after each.
"""

import fcntl
import os

from . import faults, schema
from .chunks import chunk_id_of
from .errors import UsageError
from .store import Store

DEFAULT_MIN_DEAD_FRACTION = 0.25


def _try_lock(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _live_entries(store: Store, pack_id: int):
    """(chunk_id, offset, length) of entries in the pack that the index points at."""
    path = store.packs.path(pack_id)
    size = os.path.getsize(path)
    offset = schema.PACK_HEADER.size
    env = store.env
    with env.begin() as txn, open(path, "rb") as f:
        while offset + schema.ENTRY_HEADER.size <= size:
            f.seek(offset)
            magic, length, chunk_id = schema.ENTRY_HEADER.unpack(f.read(schema.ENTRY_HEADER.size))
            if magic != schema.ENTRY_MAGIC:
                break        # torn tail of a crashed writer: nothing committed points there
            data_at = offset + schema.ENTRY_HEADER.size
            raw = txn.get(chunk_id, db=env.chunks)
            if raw is not None:
                loc_pack, loc_offset, _len, _ref = schema.unpack_chunk(raw)
                if loc_pack == pack_id and loc_offset == data_at:
                    yield chunk_id, data_at, length
            offset = data_at + length


def _compact(store: Store, pack_id: int) -> int:
    """Move live chunks out of `pack_id`; returns how many moved."""
    env = store.env
    batch = store.chunks.batch()
    moved = []
    for chunk_id, offset, length in list(_live_entries(store, pack_id)):
        data = store.packs.read(pack_id, offset, length)
        if chunk_id_of(data) != chunk_id:
            continue         # damaged: leave it (and so its pack) where fsck finds it
        writer = store.chunks._active_writer()
        new_offset = writer.append(chunk_id, data)
        batch._writers.add(writer)
        moved.append((chunk_id, offset, writer.pack_id, new_offset, length))
    batch.sync()                                            # rule 1
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


def _live_chunks(store: Store, pack_id: int) -> int:
    with store.env.begin() as txn:
        raw = txn.get(schema.pack_key(pack_id), db=store.env.packs)
    return schema.unpack_pack_stats(raw)[1] if raw else 0


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


def collect(store: Store, min_dead_fraction: float = DEFAULT_MIN_DEAD_FRACTION) -> dict:
    """One gc pass over every pack no process is appending to."""
    if not 0.0 <= min_dead_fraction <= 1.0:        # also refuses NaN
        raise UsageError(f"--min-dead {min_dead_fraction} is not a fraction between 0 and 1 "
                         "(e.g. 0.25: compact packs at least a quarter dead)")
    result = dict(packs_removed=0, packs_compacted=0, chunks_moved=0, bytes_before=0, bytes_after=0)
    # Compaction copies the live part to free the dead part, so it may use
    # the space reserve: it is how a full store gets space back.
    store.packs.keep_reserve = False
    for pack_id in store.packs.pack_ids():
        path = store.packs.path(pack_id)
        size = os.path.getsize(path)
        result["bytes_before"] += size
        lock_fd = _try_lock(path)
        if lock_fd is None:
            result["bytes_after"] += size
            continue
        try:
            with store.env.begin() as txn:
                raw = txn.get(schema.pack_key(pack_id), db=store.env.packs)
            live_bytes, live_chunks = schema.unpack_pack_stats(raw) if raw else (0, 0)
            if live_chunks and size and (size - live_bytes) / size >= min_dead_fraction:
                result["chunks_moved"] += _compact(store, pack_id)
                result["packs_compacted"] += 1
                live_chunks = _live_chunks(store, pack_id)
            if live_chunks == 0:
                freed = _drop_if_empty(store, pack_id)
                result["packs_removed"] += 1 if freed else 0
                size -= freed
        finally:
            os.close(lock_fd)
        result["bytes_after"] += size
    store.chunks.close_writer()
    result["bytes_after"] = sum(os.path.getsize(store.packs.path(p)) for p in store.packs.pack_ids())
    return result
