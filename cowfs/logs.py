"""Daemon logs: one line per event with a UTC timestamp, rotated by size.

A detached daemon logs to ``STORE/run/<volume>.log`` (`cowfs mount` starts
it with ``--log-file``); a daemon in the foreground (a systemd service) logs
to stderr, which the journal keeps. The log is rotated at `MAX_BYTES` and
`BACKUPS` older files are kept (``<volume>.log.1`` ...), so months of
scheduled snapshots cannot fill the disk; the logs of a volume or snapshot
go with it (`remove`, called by `cowfs destroy`).

A traceback is folded into its event's line (``| ``-separated), so that
`grep` and line-based collectors see one event per line.
"""

import glob
import logging
import logging.handlers
import os
import time

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 3
FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """UTC ISO timestamps; multi-line messages and tracebacks folded into one line."""

    converter = time.gmtime

    def formatTime(self, record, datefmt=None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + \
            f".{int(record.msecs):03d}Z"

    def format(self, record) -> str:
        return " | ".join(line for line in super().format(record).splitlines() if line.strip())


class _RotatingLog(logging.handlers.RotatingFileHandler):
    """Also points the process's stdout and stderr at the current file, so that
    stray output (a crash in C code, a warning printed by a library) lands in
    the live log, not in a rotated one or nowhere."""

    def _point_std_streams(self) -> None:
        if self.stream is not None:
            for fd in (1, 2):
                os.dup2(self.stream.fileno(), fd)

    def doRollover(self) -> None:
        super().doRollover()
        self._point_std_streams()


class ErrorCount(logging.Handler):
    """Counts the ERROR events of this process and keeps the last one, for `cowfs status`."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.count = 0
        self.last: str = ""
        self.last_ns = 0

    def emit(self, record) -> None:
        self.count += 1
        self.last = record.getMessage().splitlines()[0] if record.getMessage() else record.levelname
        self.last_ns = int(record.created * 1e9)


errors = ErrorCount()        # of this process; the daemon reports it in `stats`


def log_path(run_dir: str, volume: str) -> str:
    """The log of a mounted volume (or VOL@SNAP for a snapshot mount)."""
    return os.path.join(run_dir, f"{volume}.log")


def configure(log_file=None, debug: bool = False, max_bytes: int = MAX_BYTES) -> None:
    """Log to `log_file` (rotated at `max_bytes`) or, without one, to stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if log_file is None:
        handler = logging.StreamHandler()
    else:
        handler = _RotatingLog(log_file, maxBytes=max_bytes, backupCount=BACKUPS)
        handler._point_std_streams()
    handler.setFormatter(OneLineFormatter(FORMAT))
    root.addHandler(handler)
    root.addHandler(errors)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def remove(run_dir: str, target: str) -> int:
    """Remove the logs of VOL (with those of its snapshot mounts, VOL@*) or of
    VOL@SNAP, rotated ones included; returns how many files went."""
    removed = 0
    base = glob.escape(log_path(run_dir, target))
    paths = glob.glob(base) + glob.glob(base + ".[0-9]*")
    if "@" not in target:
        paths += glob.glob(glob.escape(os.path.join(run_dir, target + "@")) + "*.log*")
    for path in paths:
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed
