"""`pg_basebackup` of a primary into a directory, with a progress display of the copy.

    pg_basebackup -d CONNINFO -D DIR -X stream -S SLOT -c fast -P --no-sync

``-X stream`` streams the WAL written during the copy beside it, through
the slot, so the copy is consistent whatever the primary does meanwhile;
``-S`` uses the physical slot `upstream.Upstream.create_slot` made, so the
WAL the standby needs next is kept from the very start. ``--no-sync``:
pg_basebackup would fsync every file one by one; on cowfs the snapshot
that follows the copy makes the whole volume durable in one commit (rules
2 and 5 of docs/design.md), and an interrupted copy is started over, never
used.

Progress: pg_basebackup ``-P`` prints "DONE/TOTAL kB (N%)" about once a
second (TOTAL is its estimate of the data directory, it grows a little by
the WAL streamed meanwhile). `Progress` turns that into bytes copied, rate
and time left, drawn by `cowfs.progress` (tqdm on a terminal, plain lines
otherwise).
"""

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .. import progress
from .server import PgServer

_PROGRESS = re.compile(rb"(\d+)/(\d+) kB")
PLAIN_EVERY_S = 5.0               # a copy takes minutes: a plain line more often than the default
LOG_LINES_KEPT = 40
STOP_TIMEOUT_S = 30.0


@dataclass
class CopyResult:
    ok: bool
    copied_bytes: int = 0
    total_bytes: int = 0
    seconds: float = 0.0
    output: str = ""                  # pg_basebackup's messages (progress lines left out)
    error: str = ""                   # its last error line when it failed

    @property
    def mib_per_s(self) -> float:
        return self.copied_bytes / (1 << 20) / self.seconds if self.seconds else 0.0


def progress_display(label: str, stream=None) -> Callable[..., None]:
    """A function ``show(done_bytes, total_bytes, final, completed)`` for `BaseBackup.show`,
    drawn by cowfs's common progress display (a live line on a terminal,
    plain lines every few seconds otherwise)."""
    bar = progress.Progress(label, stream=stream, plain_every_s=PLAIN_EVERY_S)

    def show(done_bytes: int, total_bytes: int, final: bool, completed: bool = True) -> None:
        bar.total = max(total_bytes, done_bytes)
        bar.update(done_bytes)
        if final:
            bar.close(completed)    # a failed copy: no closing line, the error is the one line
    return show


@dataclass
class BaseBackup:
    """One pg_basebackup run as the owner of the target directory."""

    client: PgServer                 # bin/ of the primary's version; data_dir = the target
    conninfo: str
    slot: str
    fast_checkpoint: bool = True
    show: Optional[Callable[..., None]] = None    # see progress_display
    messages: list = field(default_factory=list)

    def run(self) -> CopyResult:
        args = ["-d", self.conninfo, "-D", self.client.data_dir, "-X", "stream", "-S", self.slot,
                "-c", "fast" if self.fast_checkpoint else "spread", "-P", "-v", "--no-sync"]
        started = time.monotonic()
        proc = self.client.popen("pg_basebackup", *args, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        done = total = 0
        try:
            for piece in _pieces(proc.stderr):
                match = _PROGRESS.search(piece)
                if match:
                    done, total = int(match.group(1)) * 1024, int(match.group(2)) * 1024
                    if self.show:
                        self.show(done, total, False)
                elif piece.strip():
                    self._keep(piece.decode(errors="replace").strip())
            returncode = proc.wait()
        except BaseException:
            proc.terminate()            # Ctrl-C / SIGTERM: pg_basebackup removes what it wrote
            proc.wait()
            if self.show:
                self.show(done, total, True, completed=False)
            raise
        finally:
            proc.stderr.close()
        seconds = time.monotonic() - started
        if self.show:
            self.show(done, total, True, completed=returncode == 0)
        errors = [m for m in self.messages if "error" in m.lower() or "fatal" in m.lower()]
        return CopyResult(ok=returncode == 0, copied_bytes=done, total_bytes=total, seconds=seconds,
                          output="\n".join(self.messages),
                          error=(errors[0] if errors else (self.messages or ["no output"])[-1])
                          if returncode else "")

    def _keep(self, line: str) -> None:
        self.messages.append(line)
        del self.messages[:-LOG_LINES_KEPT]


def _pieces(pipe):
    """Lines of pg_basebackup's stderr, split at \\n and at the \\r of its progress line."""
    pending = b""
    while True:
        chunk = pipe.read1(65536)
        if not chunk:
            break
        pending += chunk
        parts = re.split(rb"[\r\n]", pending)
        pending = parts.pop()
        yield from parts
    if pending:
        yield pending


def stop_stray_copies(data_dir: str) -> list:
    """End pg_basebackup processes still writing into ``data_dir``; their pids.

    pg_basebackup streams WAL from a forked child that outlives its parent
    when the parent is killed (SIGKILL of `cowfs pg follow`, or SIGTERM of
    pg_basebackup itself): it keeps streaming, and keeps the slot on the
    primary in use, so the slot could not be dropped. Only a process whose
    command line is pg_basebackup with ``-D data_dir`` is signalled.
    """
    stopped = []
    for pid in _copies_into(data_dir):
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(os.path.exists(f"/proc/{pid}") for pid in stopped):
        if time.monotonic() > deadline:
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        time.sleep(0.05)
    return stopped


def _copies_into(data_dir: str) -> list:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and argv[0].endswith("pg_basebackup") and _target(argv) == data_dir:
            found.append(int(entry))
    return found


def _target(argv: list) -> str:
    for flag, value in zip(argv, argv[1:]):
        if flag in ("-D", "--pgdata"):
            return value
    return ""
