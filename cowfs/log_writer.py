"""A mounted volume's intent log, as its daemon writes it (format: `intent_log`).

On the event loop, `reserve` hands out the next seq and a place in the
file -- a circular region from `tail` (the oldest record a durable fold has
not covered yet) to `head` -- and `submit` queues the record. One
persistent writer thread (a thread per flush costs 170-790 us to start,
a queue hand-off ~70 us) writes everything queued with `pwritev` and
makes it durable with one `fdatasync`: records submitted while the disk
flushes share the next flush (group commit), and an fsync waits only for
the batch holding its record, never for a fold. A batch whose records need
earlier namespace commits durable first syncs the LMDB environment before
writing (see `intent_log`: the inode a record names must exist after a
power cut).

A failed write or sync stops the volume (rule 3): the kernel may have
dropped the pages, and no later fsync may report success for them.
"""

import errno
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import trio

from . import faults, intent_log
from .commit import sync_environment
from .intent_log import BLOCK, DATA_START, KIND_WRAP, LogState, RECORD_HEADER, padded

log = logging.getLogger(__name__)

MAX_IOVECS = 1000


@dataclass
class Batch:
    """What one `submit` queues: records at their offsets, and what must be
    durable before them."""

    writes: list = field(default_factory=list)          # (offset, [buffers])
    last_seq: int = 0
    ticket: int = 0                                     # order of submission, from 1
    sync_env: bool = False
    to_reclaim: list = field(default_factory=list)     # freed chunks to punch after that sync
    synced_count: int = 0                               # namespace commits that sync covers


class LogWriter:
    def __init__(self, path: str, state: LogState, env, chunk_store,
                 on_failure: Callable[[BaseException], BaseException]):
        self.path = path
        self.env = env
        self.chunks = chunk_store
        self.on_failure = on_failure
        # Buffered writes and fdatasync of a zero-filled file: O_DIRECT |
        # O_DSYNC measured no better here (single-stream 8 KiB fsyncs, 3
        # alternating rounds: 1302/1624/827 against 1234/1092/823 per second).
        self._fd = os.open(path, os.O_WRONLY)
        self.size_bytes = os.fstat(self._fd).st_size // BLOCK * BLOCK
        self.epoch = state.epoch
        self.next_seq = state.next_seq
        self.head = self.tail = state.start_offset
        self.durable_seq = state.next_seq - 1
        self._tickets = 0                                   # batches submitted
        self.done_ticket = 0                                # every batch up to it is durable
        self.failed: Optional[BaseException] = None
        self.on_synced_count: Optional[Callable[[int], None]] = None
        self._progress = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"cowfs log {os.path.basename(path)}",
                                        daemon=True)
        self._thread.start()
        # Figures for `stats`.
        self.records = 0
        self.batches = 0
        self.bytes_written = 0

    # --- on the event loop ----------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        if self.head >= self.tail:
            return self.head - self.tail
        return (self.size_bytes - self.tail) + (self.head - DATA_START)

    @property
    def capacity_bytes(self) -> int:
        return self.size_bytes - DATA_START

    def reserve(self, record_bytes: int) -> Optional[tuple[int, int, list]]:
        """(seq, offset, wrap writes) for a record of `record_bytes`, or None
        when the log is full (a fold must cover records first). Wrapping to
        the start writes a wrap record (or relies on the file's end) so that
        replay follows."""
        length = padded(record_bytes)
        if self.head >= self.tail:              # in use: [tail, head); empty when equal
            if self.head + length <= self.size_bytes:
                return self._take(self.head, length), self.head - length, []
            # Wrap: the rest of the file up to its end stays in use (the
            # wrap record) until a fold moves the tail past it, so the
            # start must stay clear of the tail.
            if DATA_START + length < self.tail:
                wrap = self._wrap_record()
                self.head = DATA_START
                return self._take(self.head, length), DATA_START, wrap
            return None
        if self.head + length < self.tail:      # wrapped: in use [tail, end) and [start, head)
            return self._take(self.head, length), self.head - length, []
        return None

    def _take(self, offset: int, length: int) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self.head = offset + length
        return seq

    def _wrap_record(self) -> list:
        """A wrap record at `head`, if a block fits before the end."""
        if self.head + BLOCK > self.size_bytes:
            return []                          # the reader wraps at the end of the file
        seq = self.next_seq
        self.next_seq += 1
        return [(self.head, intent_log.encode(KIND_WRAP, self.epoch, seq, []))]

    def submit(self, batch: Batch) -> int:
        """Queue a batch; returns its ticket for `wait`."""
        self._tickets += 1
        batch.ticket = self._tickets
        self.records += len(batch.writes)
        self._queue.put(batch)
        return batch.ticket

    async def wait(self, ticket: int) -> None:
        """Return once the batch `ticket` (and every one before) is durable;
        raise the log's failure otherwise (rule 3)."""
        while self.done_ticket < ticket:
            if self.failed is not None:
                raise self.failed
            await self._progress.wait()

    def folded(self, offset: int) -> None:
        """A durable fold covered every record before `offset`: its space is free."""
        self.tail = offset

    def close(self) -> None:
        """Stop the writer thread (after what is queued) and close the file."""
        self._queue.put(None)
        self._thread.join()
        os.close(self._fd)

    def _batch_done(self, batch_list: list, error: Optional[BaseException]) -> None:
        if error is None:
            self.done_ticket = max(self.done_ticket, max(b.ticket for b in batch_list))
            self.durable_seq = max(self.durable_seq, max(b.last_seq for b in batch_list))
            synced = [b.synced_count for b in batch_list if b.sync_env]
            if synced and self.on_synced_count is not None:
                self.on_synced_count(max(synced))
        elif self.failed is None:
            self.failed = self.on_failure(error)
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    # --- in the writer thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            batches = [batch]
            stop = False
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batches.append(more)
            error = self._write(batches)
            try:
                self._token.run_sync_soon(self._batch_done, batches, error)
            except trio.RunFinishedError:
                pass                         # unmounting: the final fold covers everything
            if stop:
                return

    def _write(self, batches: list) -> Optional[BaseException]:
        try:
            if any(b.sync_env for b in batches):
                sync_environment(self.env)
                self.chunks.reclaim([loc for b in batches for loc in b.to_reclaim], synced=True)
            for offset, buffers in _runs(w for batch in batches for w in batch.writes):
                self._pwritev(buffers, offset)
            faults.point("log.written")
            self._fdatasync()
            faults.point("log.synced")
            self.batches += 1
            return None
        except BaseException as exc:          # handed to the loop: the volume stops
            return exc

    # The two operating-system calls, apart so that tests can fail them (`faults`).
    def _pwritev(self, buffers: list, offset: int) -> None:
        faults.os_call("log_write")
        buffers = [b for b in buffers if len(b)]
        for first in range(0, len(buffers), MAX_IOVECS):     # IOV_MAX is 1024
            group = buffers[first:first + MAX_IOVECS]
            expected = sum(len(b) for b in group)
            if os.pwritev(self._fd, group, offset) != expected:
                raise OSError(errno.EIO, f"short write to the intent log {self.path}")
            offset += expected
            self.bytes_written += expected

    def _fdatasync(self) -> None:
        faults.os_call("log_sync")
        os.fdatasync(self._fd)


def _runs(writes) -> list:
    """(offset, buffers) of writes, back-to-back ones joined (one write each run)."""
    runs: list = []
    for offset, buffers in writes:
        if runs and runs[-1][0] + sum(len(b) for b in runs[-1][1]) == offset:
            runs[-1][1].extend(buffers)
        else:
            runs.append((offset, list(buffers)))
    return runs


def record_bytes(payload_bytes: int) -> int:
    return RECORD_HEADER.size + payload_bytes
