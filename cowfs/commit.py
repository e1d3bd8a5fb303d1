"""The commit pipeline: the one way a volume's changes reach packs and LMDB.

Every commit of a mounted volume -- a fold of buffered writes (`FlushJob`,
in a worker thread or inline), a namespace change or truncate
(`Filesystem._change`, on the event loop), the replay of an intent log --
goes through `Commit`:

    commit = Commit(env, chunk_store, chain, chunk_size)
    commit.stage(updates)        # chunk bytes appended to a pack, deduplicated
    commit.make_durable()        # rule 1: fdatasync of the pack before any record names them
    txn = env.begin(write=True)
    commit.write(txn)            # chunk maps and inode records of the updates
    ...                          # the caller's own records (namespace change, log state)
    freed = commit.finish(txn)   # reference counts, pack statistics, the commit point (rule 2)

and whatever fails is sorted by one verdict, `is_full_disk`: a full disk
leaves the data buffered and may be retried; anything else stops the
volume (rule 3), in `Filesystem._flush_failed`.

Inode records are *merged* (`merge_attrs`): a commit of buffered data
writes the file's data attributes (size, mode, owner, times) onto the
inode record as committed at that moment, keeping its namespace fields
(link count, parent, symlink target, device). So a namespace change on the
event loop and a fold in a worker thread never undo each other, whichever
commits first; and a file deleted since its buffers were frozen is skipped
(no inode record: its records are gone).
"""

import errno
import os
from dataclasses import dataclass, field
from typing import Optional

import lmdb

from . import catalog, faults, schema
from .chunks import ChunkBatch, ChunkStore, is_zero
from .packs import PackSyncError

FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# LMDB reports a short page write -- what a full filesystem gives -- as EIO.
# Below this much free space, an LMDB write error counts as a full disk.
LMDB_FULL_DISK_SLACK_BYTES = 1 << 20
# What a commit of buffered data writes onto the committed inode record;
# the rest (nlink, parent_ino, rdev, the symlink target) belongs to
# namespace changes.
DATA_FIELDS = ("size", "mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns")


class MetadataSyncError(OSError):
    """Syncing the LMDB environment failed: like a failed pack sync, the
    kernel may have dropped pages of earlier commits, so it never counts as
    a full disk that a retry could honestly fix (rule 3)."""


def sync_environment(env) -> None:
    try:
        env.lmdb.sync(True)
    except lmdb.Error as exc:
        raise MetadataSyncError(errno.EIO, f"syncing the metadata failed: {exc}") from exc


def is_full_disk(exc: BaseException, meta_dir: str) -> bool:
    """Did a commit fail only for lack of space, with nothing acknowledged lost?"""
    if isinstance(exc, (PackSyncError, MetadataSyncError)):
        return False             # rule 3: a failed sync is never retried into a success
    if isinstance(exc, lmdb.MapFullError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in FULL_DISK_ERRNOS
    if isinstance(exc, lmdb.Error):
        try:
            st = os.statvfs(meta_dir)
        except OSError:
            return False
        return st.f_bfree * st.f_frsize < LMDB_FULL_DISK_SLACK_BYTES
    return False


def merge_attrs(committed: dict, data_attrs: dict) -> dict:
    merged = dict(committed)
    for name in DATA_FIELDS:
        merged[name] = data_attrs[name]
    return merged


@dataclass
class FileUpdate:
    """What one commit writes of one file.

    chunks: chunk_index -> full-size buffer (or bytes), stored up to the
    file's size; an all-zero chunk becomes a hole. The buffers must not
    change until `finish` (frozen buffers, or a caller that does not yield).
    data_attrs: written onto the committed inode record (`merge_attrs`);
    None when the caller writes the inode record itself.
    drop_from: chunk maps from this index on are removed (a truncate).
    """

    ino: int
    size: int
    chunks: dict = field(default_factory=dict)
    data_attrs: Optional[dict] = None
    drop_from: Optional[int] = None


class Commit:
    def __init__(self, env: schema.Env, chunk_store: ChunkStore, chain: list, chunk_size: int,
                 use_reserve: bool = False):
        self.env = env
        self.chain = chain
        self.chunk_size = chunk_size
        self.batch: ChunkBatch = chunk_store.batch(use_reserve=use_reserve)
        self._staged: list[tuple[FileUpdate, dict]] = []     # (update, {index: chunk_id | None})

    # --- before the transaction ------------------------------------------------------

    def stage(self, updates) -> None:
        """Append the updates' chunks to the pack (only those the store lacks)."""
        for update in updates:
            self._staged.append((update, self._stage_chunks(update)))

    def _stage_chunks(self, update: FileUpdate) -> dict:
        chunk_ids: dict = {}
        indices, datas = [], []
        for idx, buf in update.chunks.items():
            length = max(min(self.chunk_size, update.size - idx * self.chunk_size), 0)
            data = memoryview(buf)[:length]
            if is_zero(data):
                chunk_ids[idx] = None        # a hole: all-zero chunks are not stored
            else:
                indices.append(idx)
                datas.append(data)
        chunk_ids.update(zip(indices, self.batch.add_many(datas, stable=True)))
        return chunk_ids

    def make_durable(self) -> None:
        """Rule 1: every staged byte is durable before the transaction opens."""
        self.batch.sync()
        self.batch.prepare_commit()

    # --- inside the transaction ------------------------------------------------------

    def write(self, txn) -> None:
        """Chunk maps and merged inode records of the staged updates; a file
        without a committed inode record (deleted meanwhile) is skipped."""
        for update, chunk_ids in self._staged:
            key = schema.inode_key(update.ino)
            raw = catalog.get(txn, self.env, self.chain, schema.KIND_INODE, key)
            if raw is None:
                continue
            if update.drop_from is not None:
                drop_chunks_from(txn, self.env, self.chain, self.batch, update.ino, update.drop_from)
            write_chunk_map(txn, self.env, self.chain, self.batch, update.ino, chunk_ids)
            if update.data_attrs is not None:
                committed, target = schema.unpack_inode(raw)
                catalog.put(txn, self.env, self.chain, schema.KIND_INODE, key,
                            schema.pack_inode(merge_attrs(committed, update.data_attrs), target))

    def finish(self, txn, point: str = "commit") -> list:
        """Reference counts and pack statistics, then the commit point
        (rule 2). Aborts the transaction on failure. Returns the locations
        of the chunk entries this commit freed (see `ChunkStore.reclaim`)."""
        try:
            self.batch.apply(txn)
        except BaseException:
            txn.abort()
            raise
        faults.point(f"{point}.before")
        txn.commit()
        faults.point(f"{point}.after")
        return self.batch.freed_locations


def write_chunk_map(txn, env, chain, batch: ChunkBatch, ino: int, chunk_ids: dict) -> None:
    """Point the chunk map of `ino` at `chunk_ids`, with reference counts."""
    for idx, chunk_id in chunk_ids.items():
        key = schema.chunk_key(ino, idx)
        if chunk_id is None:   # a hole: all-zero chunks are not stored
            old = catalog.delete(txn, env, chain, schema.KIND_CHUNK, key)
        else:
            old = catalog.put(txn, env, chain, schema.KIND_CHUNK, key, chunk_id)
            batch.ref(chunk_id)
        if old is not None:
            batch.unref(old)


def drop_chunks_from(txn, env, chain, batch: ChunkBatch, ino: int, first_index: int) -> None:
    """Remove the chunk maps of `ino` from `first_index` on (a truncate)."""
    start = schema.chunk_key(ino, first_index)
    for record_key, _ in catalog.scan(txn, env, chain, schema.KIND_CHUNK, schema.inode_key(ino),
                                      start_key=start):
        old = catalog.delete(txn, env, chain, schema.KIND_CHUNK, record_key)
        if old is not None:
            batch.unref(old)
