"""A fold: the buffered writes of a volume, frozen on the event loop and
committed through the commit pipeline, usually in a worker thread.

`Filesystem.begin_flush` moves the chosen inodes' chunk buffers out of
`Inode.dirty` into `Inode.flushing` and copies their attributes into the
job. `run` then uses only those frozen copies, the chunk store and LMDB, so
the event loop keeps serving reads, buffered writes (into fresh `dirty`
buffers) and namespace changes while the device flushes: the commit merges
the frozen data attributes onto the inode records as committed when it
runs (`commit.merge_attrs`), so a link or rename committed meanwhile
stands, and a file deleted meanwhile is skipped. Only commits that write
chunks on the loop (truncate, snapshot, `flush_all`) first wait for the
job in flight (`Filesystem._settle_inflight`): one pack appender at a time.
"""

import threading
from typing import Optional

from . import schema
from .commit import Commit, FileUpdate, sync_environment
from .errors import FsError


class FlushJob:
    def __init__(self, env, chunk_store, chunk_size: int, entries: list, chain: list,
                 sync_env: bool, to_reclaim: list, log_cover=None, synced_count: int = 0):
        self.env = env
        self.chunks = chunk_store
        self.chunk_size = chunk_size
        self.entries = entries   # [(inode, frozen buffers, attrs copy)]
        self.chain = chain
        self.sync_env = sync_env
        # Chunk entries freed by earlier commits, given back once this job
        # synced the environment (rule 4); then this job's own.
        self.to_reclaim = to_reclaim
        self.reclaimed = False
        # (vol_id, LogState) when this fold covers every intent-log record
        # reserved before it froze: that state is committed with the fold,
        # so replay starts after them (never applying one twice).
        self.log_cover = log_cover
        self.synced_count = synced_count      # namespace commits its environment sync covers
        self.done = threading.Event()
        self.error: Optional[BaseException] = None      # what `run` raised
        self.outcome: Optional[FsError] = None          # what the fsync callers get
        self.finished = False                           # `Filesystem.finish_flush` ran

    def run(self) -> None:
        """Any thread: commit (rules 1, 2), environment sync, give freed space back."""
        try:
            if self.entries or self.log_cover is not None:
                self._commit()
            if self.sync_env:
                # The daemon's environment skips the meta-page flush at
                # commit (schema.Env metasync=False): sync before answering.
                sync_environment(self.env)
                self.chunks.reclaim(self.to_reclaim, synced=True)
                self.reclaimed = True
        except BaseException as exc:      # handed to the loop by finish_flush
            self.error = exc
        finally:
            self.done.set()

    def _commit(self) -> None:
        commit = Commit(self.env, self.chunks, self.chain, self.chunk_size)
        commit.stage(FileUpdate(inode.ino, attrs["size"], frozen, attrs)
                     for inode, frozen, attrs in self.entries)
        commit.make_durable()                          # rule 1
        txn = self.env.begin(write=True)
        try:
            commit.write(txn)
            if self.log_cover is not None:
                vol_id, state = self.log_cover
                txn.put(schema.log_state_key(vol_id), state.pack(), db=self.env.logs)
        except BaseException:
            txn.abort()
            raise
        self.to_reclaim = self.to_reclaim + commit.finish(txn, "fold")     # the commit point (rule 2)
