"""Replaying a volume's intent log: what every holder of a volume does first.

The mount daemon replays before it serves; a command that reads or changes
an unmounted volume (snapshot, clone, rollback, destroy, diff, df, list,
fsck, gc, scrub) replays it under the volume lock first (`replay_unmounted`),
so that a snapshot includes every acknowledged write (rule 5) whatever was
still only in the log, and what a command shows is what applications were
told is durable. A volume another process holds is left to it (a mounted
volume's daemon replayed when it mounted).

Replay reads the valid records from the state's start (`intent_log.scan`),
merges them per file (`intent_log.coalesce`), skips a file whose fence
covers its records or which no longer exists, and commits the files'
chunks and data attributes through the commit pipeline together with a
new log state -- a new epoch, so no record of this incarnation of the file
is ever valid again -- in one transaction: a crash before that commit
replays again from the same state; after it, nothing is replayed twice.
"""

import logging
import os

from . import catalog, faults, intent_log, schema
from .commit import Commit, FileUpdate, sync_environment
from .errors import BusyError
from .intent_log import DATA_START, LogState
from .store import Store

log = logging.getLogger(__name__)


def new_epoch() -> int:
    return int.from_bytes(os.urandom(8), "little") or 1


def replay(store: Store, vol_id: int) -> dict:
    """Apply the log of `vol_id` (its lock held by the caller); returns
    figures: records, files, bytes applied."""
    env = store.env
    with env.begin() as txn:
        state = intent_log.read_state(txn, env, vol_id)
        chain = catalog.volume_chain(txn, env, vol_id)
        fences = _fences(txn, env, vol_id)
    path = intent_log.log_path(store.logs_dir, vol_id)
    records = [] if state is None else list(intent_log.scan(path, state))
    merged = intent_log.coalesce(records)
    updates = [_file_update(update, store.chunk_size) for ino, (seq, update) in merged.items()
               if seq > fences.get(ino, 0)]
    next_seq = max([state.next_seq if state else 1, *(seq + 1 for seq, *_ in records),
                    *(fence + 1 for fence in fences.values())])
    commit = Commit(env, store.chunks, chain, store.chunk_size)
    commit.stage(updates)
    commit.make_durable()                            # rule 1
    faults.point("replay.middle")
    txn = env.begin(write=True)
    try:
        commit.write(txn)
        fresh = LogState(new_epoch(), next_seq, DATA_START, next_seq)
        txn.put(schema.log_state_key(vol_id), fresh.pack(), db=env.logs)
    except BaseException:
        txn.abort()
        raise
    freed = commit.finish(txn, "replay")
    sync_environment(env)          # the mount daemon's environment skips the meta-page flush
    store.chunks.reclaim(freed, synced=True)
    figures = dict(records=len(records), files=len(updates),
                   bytes=sum(len(data) for u in updates for data in u.chunks.values()))
    if records:
        log.info("volume id %d: replayed %d intent-log records (%d files, %d bytes)",
                 vol_id, figures["records"], figures["files"], figures["bytes"])
    return figures


def _fences(txn, env, vol_id: int) -> dict[int, int]:
    prefix = schema.log_prefix(vol_id)
    fences = {}
    cursor = txn.cursor(db=env.logs)
    if cursor.set_range(prefix):
        for key, value in cursor:
            key = bytes(key)
            if not key.startswith(prefix):
                break
            if schema.is_log_fence_key(key):
                fences[schema.read_u64(key, 8)] = schema.unpack_le_u64(value)
    return fences


def _file_update(update: intent_log.InodeUpdate, chunk_size: int) -> FileUpdate:
    """The record's chunks padded to what the file's final size covers: a
    chunk logged when the file ended inside it reads zeros past that end."""
    size = update.attrs["size"]
    chunks = {}
    for idx, data in update.chunks.items():
        length = max(min(chunk_size, size - idx * chunk_size), 0)
        chunks[idx] = data[:length].ljust(length, b"\0")
    return FileUpdate(update.ino, size, chunks, update.attrs)


def needs_replay(store: Store, vol_id: int) -> bool:
    """Does the log of `vol_id` hold a valid record past its state's start?"""
    with store.env.begin() as txn:
        state = intent_log.read_state(txn, store.env, vol_id)
    if state is None:
        return False
    path = intent_log.log_path(store.logs_dir, vol_id)
    return next(intent_log.scan(path, state), None) is not None


def replay_unmounted(store: Store, vol_ids=None) -> int:
    """Replay the logs of the volumes nobody holds (all, or `vol_ids`);
    returns how many were replayed. One another process holds -- mounted,
    or being changed -- is its business."""
    if vol_ids is None:
        with store.env.begin() as txn:
            vol_ids = [schema.read_u64(bytes(k)) for k, _ in txn.cursor(db=store.env.volumes)]
    replayed = 0
    for vol_id in vol_ids:
        if not needs_replay(store, vol_id):
            continue
        try:
            lock = store.lock_volume(vol_id, f"id {vol_id}", "cowfs (replaying its intent log)")
        except BusyError:
            continue
        with lock:
            replay(store, vol_id)
            replayed += 1
    return replayed
