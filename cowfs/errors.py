"""Error classes of cowfs.

Two families:

* `CowfsError` and its subclasses are *user-facing* errors of commands: each
  carries a one-line message that says what failed and what to do, and the
  process exit code the CLI returns for it. The CLI prints ``cowfs: <message>``
  on stderr, never a traceback.
* `FsError` is raised by the filesystem logic with an errno; the FUSE adapter
  (`fuse_ops`) is the single gate that turns it into ``pyfuse3.FUSEError``.

Exit codes are part of the interface (scripts test them) and are pinned by
``tests/test_cli_errors.py``.
"""

import errno as _errno

EXIT_OK = 0
EXIT_FAILURE = 1        # generic failure, e.g. fsck found problems
EXIT_USAGE = 2          # bad command line (argparse uses 2 as well)
EXIT_NOT_FOUND = 3      # store, volume, snapshot or mountpoint does not exist
EXIT_EXISTS = 4         # the thing to create exists already
EXIT_BUSY = 5           # volume mounted / locked by another process
EXIT_STORE = 6          # store unusable: unknown format, damaged metadata
EXIT_IO = 7             # I/O error, disk full
EXIT_STREAM = 8         # a send stream is damaged, truncated or not a cowfs stream


class CowfsError(Exception):
    """A failure a person can act on; `str(err)` is the one-line message."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(CowfsError):
    exit_code = EXIT_USAGE


class NotFoundError(CowfsError):
    exit_code = EXIT_NOT_FOUND


class ExistsError(CowfsError):
    exit_code = EXIT_EXISTS


class BusyError(CowfsError):
    exit_code = EXIT_BUSY


class StoreError(CowfsError):
    exit_code = EXIT_STORE


class StoreIOError(CowfsError):
    exit_code = EXIT_IO


class StreamError(CowfsError):
    """The input of `cowfs receive` is not a whole, intact cowfs stream: send it again."""

    exit_code = EXIT_STREAM


class FsError(Exception):
    """A POSIX error of a filesystem operation, carrying its errno."""

    def __init__(self, errno: int, detail: str = ""):
        super().__init__(errno, detail or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno

    def __str__(self) -> str:
        return f"[{_errno.errorcode.get(self.errno, self.errno)}] {self.args[1]}"


class ChunkDamagedError(FsError):
    """Bytes read from a pack do not hash to the chunk id that names them."""

    def __init__(self, detail: str):
        super().__init__(_errno.EIO, detail)


class ChunkGoneError(ChunkDamagedError):
    """A chunk located for a read was freed (and its bytes reclaimed by gc)
    before the read got to it: the file changed meanwhile. Not damage: the
    reader plans the read again and gets the newer bytes."""


class VolumeStoppedError(FsError, CowfsError):
    """A flush of the volume failed for a reason other than a full disk.

    Rule 3: the fsync covering the data failed, and no later fsync may report
    success for it, so the mounted volume stops: every later fsync, write and
    change fails with EIO until it is unmounted and mounted again (like ext4's
    errors=remount-ro). Committed data is untouched; reads keep working.
    Raised by the filesystem (the FUSE gate sees an `FsError` with EIO) and
    by control requests (the CLI sees a `CowfsError` with EXIT_IO).
    """

    exit_code = EXIT_IO

    def __init__(self, detail: str):
        Exception.__init__(self, _errno.EIO, detail)     # both bases' state, set directly
        self.errno = _errno.EIO
        self.message = (f"{detail}; the volume stopped accepting writes: unmount it, fix the "
                        "disk, mount again (writes after the last successful fsync are lost)")

    def __str__(self) -> str:
        return self.message
