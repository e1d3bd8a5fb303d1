"""Group commit of a mounted volume: fsync requests share flushes that run
in a worker thread, so the event loop keeps serving while the disk flushes.

Protocol (rule 2 per request): a request waits for a flush that *started
after* it arrived. Flushes are numbered; a request that arrives while flush
k is in flight needs flush k + 1, which starts when k ends and covers every
request that arrived meanwhile -- with N clients committing at once, one
flush (pack fdatasync, LMDB commit, environment sync) answers all of them.
A flush takes the buffered writes of the files its requests named (an
fsync is about one file, like on a local filesystem: PostgreSQL's WAL fsync
does not wait for the data pages it will fsync at the next checkpoint);
the periodic and background flushes, `flush` and unmount take every file.
Namespace changes are committed when they happen, so every flush that has
anything to do also syncs the environment.

A request is answered with the outcome of the flush it needed: success, or
ENOSPC (the writes are buffered again; a later fsync may succeed honestly),
or EIO once the volume stopped (rule 3: never a late success).

Only the device work runs in the thread (`FlushJob.run`); freezing the
buffers and applying the outcome run on the event loop
(`Filesystem.begin_flush`, `Filesystem.finish_flush`).
"""

import errno
import logging
from typing import Optional

import trio

from .errors import FsError
from .filesystem import Filesystem
from .flush_job import FlushJob

log = logging.getLogger(__name__)

# Outcomes kept for requests that wake up late; a request needs one of the
# last few flushes, never one this far back.
KEEP_OUTCOMES = 64


class GroupCommitter:
    def __init__(self, fs: Filesystem):
        self.fs = fs
        self._started = 0                 # number of the newest flush started
        self._finished = 0                # number of the newest flush ended
        self._running: Optional[trio.Event] = None
        self._failures: dict[int, FsError] = {}
        self._background_pending = False
        # Inodes the next flush must take; None: every buffered write.
        self._wanted: Optional[set[int]] = set()
        self.requests = 0                 # sync() calls (for `stats`)
        self.log_syncs = 0                # of them answered by the intent log
        fs.background_flush = self.flush_in_background

    def flush_in_background(self) -> None:
        """Start a flush that nobody waits for (too much is buffered), unless
        one is in flight or about to start. Called on the event loop from a
        synchronous method, so the flush runs as a trio system task."""
        if self._running is None and not self._background_pending:
            self._background_pending = True
            trio.lowlevel.spawn_system_task(self._background)

    async def _background(self) -> None:
        self._background_pending = False
        if self._running is None:
            self._want(None)
            await self._flush()
        # A failure is logged by the filesystem and stays with the volume:
        # ENOSPC leaves the data buffered for the next fsync, anything else
        # stops the volume, so the next fsync fails (rule 3).

    async def sync(self, ino: Optional[int] = None) -> None:
        """Return once the writes to `ino` (None: to every file) acknowledged
        before the call, and every namespace change, are durable.

        With an intent log, an fsync of a file is one record in the log (one
        device flush, shared with the fsyncs that come meanwhile), never
        waiting behind a fold; when the log cannot take it (full, or a very
        large record) a fold of every file covers it instead."""
        self.requests += 1
        if ino is not None and self.fs.log is not None:
            ticket = self.fs.log_sync(ino)
            if ticket is not None:
                self.log_syncs += 1
                await self.fs.log.wait(ticket)
                return
            ino = None
        await self._fold(ino)

    async def _fold(self, ino: Optional[int]) -> None:
        needed = self._started + 1
        self._want(ino)
        while self._finished < needed:
            if self._running is None:
                await self._flush()
            else:
                await self._running.wait()
        failure = self._failures.get(needed)
        if failure is not None:
            if failure.errno == errno.ENOSPC:
                # Told to a caller, who will stop (PostgreSQL PANICs): the
                # writes buffered meanwhile and its crash recovery may now
                # use the grace (`space`). A background flush's failure,
                # which nobody hears of, does not open it.
                self.fs.store.packs.space.open_grace()
            raise FsError(failure.errno, failure.args[1])

    def _want(self, ino: Optional[int]) -> None:
        if self._wanted is not None:
            if ino is None:
                self._wanted = None
            else:
                self._wanted.add(ino)

    async def _flush(self) -> None:
        self._started += 1
        number = self._started
        self._running = done = trio.Event()
        wanted, self._wanted = self._wanted, set()
        outcome_known = False
        try:
            job = self.fs.begin_flush(wanted)
            if job.entries or job.sync_env:
                await _run_in_thread(job)
            else:
                job.run()                 # nothing to flush: no thread hop
            outcome_known = True
            self.fs.finish_flush(job)
        except FsError as exc:
            self._fail(number, exc)
        except Exception as exc:
            # A bug, not a disk error: still never report success for it.
            log.exception("flush %d of volume %d failed", number, self.fs.vol_id)
            self._fail(number, FsError(errno.EIO, f"flush failed: {exc}"))
        finally:
            if not outcome_known and number not in self._failures:
                # Cancelled (unmount) while the job ran: whoever waits for
                # it learns nothing good. The job itself ends in its thread
                # and the final flush at unmount settles it.
                self._fail(number, FsError(errno.EIO, "flush interrupted by unmount"))
            self._finished = number
            self._running = None
            done.set()

    def _fail(self, number: int, exc: FsError) -> None:
        self._failures[number] = exc
        self._failures.pop(number - KEEP_OUTCOMES, None)


async def _run_in_thread(job: FlushJob) -> None:
    """Run `job` in a worker thread that starts *now*, then wait for it.

    Not `trio.to_thread.run_sync`: it yields to the event loop before the
    thread starts, and a task that meanwhile commits on the loop waits
    (blocking the loop) for this job, whose thread could then never start.
    `start_thread_soon` starts the thread before this task yields, so the
    job always ends on its own.
    """
    token = trio.lowlevel.current_trio_token()
    ended = trio.Event()

    def wake(_outcome) -> None:           # in the worker thread
        try:
            token.run_sync_soon(ended.set)
        except trio.RunFinishedError:
            pass                          # the daemon stopped serving; settled at unmount

    try:
        trio.lowlevel.start_thread_soon(job.run, wake, name=f"cowfs flush {id(job):x}")
    except RuntimeError:
        # No thread to be had (resource limits): the job must still end,
        # or the next commit on the loop would wait for it forever.
        log.warning("no worker thread for a flush; running it on the event loop")
        job.run()
        return
    await ended.wait()
