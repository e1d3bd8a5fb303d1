"""Control socket of a mounted volume: how commands reach its daemon.

``STORE/run/vol-<vol_id>.sock``, a Unix stream socket in the 0700 run
directory, mode 0600; the daemon also checks the peer's credentials
(SO_PEERCRED) and answers only root and the store's owner.

Protocol: one JSON object per line each way. Request ``{"op": ...}``;
answer ``{"ok": true, ...}`` or ``{"ok": false, "error": msg, "exit_code": n}``.
Ops: ``snapshot`` (name), ``flush``, ``stats``, ``release-pack`` (close the
pack the daemon appends to, so that gc can reclaim its dead bytes).

Unix socket paths are limited to 107 bytes, store paths are not: both sides
address the socket through a descriptor of the run directory,
``/proc/self/fd/<fd>/vol-<id>.sock``. (Not by chdir: the working directory
is the whole process's, and two threads doing it at once could leave the
process in a directory that is later deleted.)
"""

import json
import logging
import os
import socket
import stat
import struct
from typing import Awaitable, Callable

import trio

from .errors import EXIT_IO, BusyError, CowfsError, FsError, StoreIOError

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")
MAX_REQUEST_BYTES = 64 * 1024


def socket_name(vol_id: int) -> str:
    return f"vol-{vol_id}.sock"


def _in_dir(run_dir: str, func):
    """func(path of the socket name inside run_dir), with a short path at any depth."""
    dir_fd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        return func(f"/proc/self/fd/{dir_fd}/")
    finally:
        os.close(dir_fd)


def _protect_run_dir(run_dir: str) -> None:
    """run/ is the first barrier: only its owner may reach the sockets in it."""
    st = os.stat(run_dir)
    if stat.S_IMODE(st.st_mode) != 0o700:
        log.warning("%s had mode %o; setting it back to 0700", run_dir, stat.S_IMODE(st.st_mode))
        os.chmod(run_dir, 0o700)


def listen(run_dir: str, vol_id: int) -> socket.socket:
    """The listening socket; a `StoreIOError` saying what to do if it cannot be made."""
    name = socket_name(vol_id)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def bind(dir_path: str):
        try:
            os.unlink(dir_path + name)  # a stale socket of a crashed daemon; we hold the volume lock
        except FileNotFoundError:
            pass
        sock.bind(dir_path + name)
        os.chmod(dir_path + name, 0o600)
    try:
        _protect_run_dir(run_dir)
        _in_dir(run_dir, bind)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise StoreIOError(f"cannot create the control socket {os.path.join(run_dir, name)} ({exc}); "
                           "the store's run/ directory must be on a local filesystem that can hold "
                           "Unix sockets") from exc
    return sock


def remove(run_dir: str, vol_id: int) -> None:
    try:
        os.unlink(os.path.join(run_dir, socket_name(vol_id)))
    except FileNotFoundError:
        pass


def _peer_allowed(sock) -> bool:
    """The second barrier (if modes were loosened): the kernel-checked peer uid.

    The daemon runs as the store's owner (or root), so its own uid is the owner's.
    """
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    allowed = uid in (0, os.getuid())
    if not allowed:
        log.warning("control request from uid %d refused (only root and uid %d)", uid, os.getuid())
    return allowed


async def serve(listener: socket.socket, handle: Callable[[dict], Awaitable[dict]]) -> None:
    tsock = trio.socket.from_stdlib_socket(listener)
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await tsock.accept()
            nursery.start_soon(_serve_one, conn, handle)


async def _serve_one(conn, handle) -> None:
    """One request; nothing that goes wrong here may take the mount down."""
    stream = trio.SocketStream(conn)
    try:
        async with stream:
            answer = await _answer(conn, stream, handle)
            if answer is not None:
                await stream.send_all(json.dumps(answer).encode() + b"\n")
    except Exception:
        log.exception("control connection failed")


async def _answer(conn, stream, handle):
    if not _peer_allowed(conn):
        return dict(ok=False, error="permission denied: only root and the store owner may "
                                    "control a mount", exit_code=1)
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST_BYTES:
        part = await stream.receive_some(4096)
        if not part:
            return None
        data += part
    try:
        return await handle(json.loads(data))
    except CowfsError as exc:
        return dict(ok=False, error=str(exc), exit_code=exc.exit_code)
    except FsError as exc:
        # A failed flush (EIO, ENOSPC): what `cowfs umount` and a snapshot
        # report the same way -- an I/O error or a full disk, exit code 7.
        return dict(ok=False, error=f"flushing the volume failed: {exc}", exit_code=EXIT_IO)
    except Exception as exc:
        log.exception("control request failed")
        return dict(ok=False, error=f"daemon error: {exc}", exit_code=1)


def request(run_dir: str, vol_id: int, payload: dict, timeout_s: float = 600.0) -> dict:
    """Send one request to the daemon of a mounted volume; raise on its error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        _in_dir(run_dir, lambda dir_path: sock.connect(dir_path + socket_name(vol_id)))
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            part = sock.recv(65536)
            if not part:
                break
            data += part
    except OSError as exc:
        raise BusyError(f"the volume is mounted but its daemon does not answer ({exc}); "
                        "check its log in STORE/run/") from exc
    finally:
        sock.close()
    answer = json.loads(data) if data else dict(ok=False, error="daemon closed the connection", exit_code=1)
    if not answer.get("ok"):
        error = CowfsError(answer.get("error", "unknown daemon error"))
        error.exit_code = answer.get("exit_code", 1)
        raise error
    return answer
