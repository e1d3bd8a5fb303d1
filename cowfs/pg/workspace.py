"""Where a workflow keeps its clone mounts, server sockets and pg_upgrade's files.

A workspace is a directory under /tmp (mode 0755, so the data directory's
owner can reach what is inside) holding:

    mnt-<volume>/   mount points of the clones the workflow mounts
    run/            Unix sockets and server logs of the servers it starts
    upgrade/        pg_upgrade's working directory (its logs, delete_old_cluster.sh)

It also remembers what it mounted and which servers it started, so that
`close` can stop and unmount them in reverse order, also after a failure.
Servers are stopped before any unmount: a running server keeps its mount busy.
"""

import glob
import logging
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Optional

from .. import mounting
from ..errors import BusyError, CowfsError, NotFoundError
from .server import PgError, PgServer

log = logging.getLogger(__name__)

UNMOUNT_ATTEMPTS = 5


def mount(store_path: str, volume: str, mountpoint: str) -> None:
    """``cowfs mount STORE MNT --volume VOL``; returns once the mount is usable."""
    os.makedirs(mountpoint, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "cowfs", "mount", store_path, mountpoint,
                             "--volume", volume], capture_output=True, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip().removeprefix("cowfs: ") or f"exit {result.returncode}"
        raise CowfsError(f"mounting volume {volume} at {mountpoint} failed: {detail}")


def unmount(mountpoint: str) -> None:
    """Flush and unmount; retries while the kernel still sees a just-stopped server's files."""
    for attempt in range(UNMOUNT_ATTEMPTS):
        try:
            mounting.unmount(mountpoint)
            return
        except BusyError:
            if attempt == UNMOUNT_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def is_mounted(mountpoint: str) -> bool:
    return mounting.find_mount(os.path.abspath(mountpoint)) is not None


def mounted_volume(mountpoint: str) -> Optional[dict]:
    """{'store', 'volume', 'pid'} of the cowfs daemon serving a mount point, or None."""
    entry = mounting.find_mount(os.path.abspath(mountpoint))
    if entry is None or entry["fstype"] != mounting.FUSE_TYPE:
        return None
    return mounting.read_registry(entry["dev"])


def volume_mountpoint(store_path: str, volume: str) -> Optional[str]:
    """Where a cowfs daemon serves ``volume`` of the store at ``store_path``, or None."""
    for name in sorted(os.listdir(mounting.registry_dir())):
        if not name.endswith(".json"):
            continue
        info = mounting.read_registry(name[:-len(".json")].replace("_", ":"))
        if not info or info.get("store") != store_path or info.get("volume") != volume:
            continue
        mnt = info.get("mountpoint")
        if mnt and mounted_volume(mnt) == info:
            return mnt
    return None


class Workspace:
    def __init__(self, keep: bool = False):
        self.path = tempfile.mkdtemp(prefix="cowfs-pg-", dir="/tmp")
        os.chmod(self.path, 0o755)
        self.run_dir = os.path.join(self.path, "run")
        self.keep = keep
        self.mounts: list = []          # mount points, in mount order
        self.servers: list = []         # PgServer objects this workflow started

    def mountpoint(self, volume: str) -> str:
        return os.path.join(self.path, f"mnt-{volume}")

    def mount(self, store_path: str, volume: str) -> str:
        mnt = self.mountpoint(volume)
        mount(store_path, volume, mnt)
        self.mounts.append(mnt)
        return mnt

    def unmount(self, mnt: str) -> None:
        unmount(mnt)
        if mnt in self.mounts:
            self.mounts.remove(mnt)

    def upgrade_dir(self, owner_ids: Optional[tuple]) -> str:
        """pg_upgrade's cwd; it must be writable by the user pg_upgrade runs as."""
        path = os.path.join(self.path, "upgrade")
        os.makedirs(path, 0o700, exist_ok=True)
        if owner_ids is not None:
            os.chown(path, *owner_ids)
        return path

    def started(self, server: PgServer) -> PgServer:
        self.servers.append(server)
        return server

    def stop_servers(self) -> list:
        """Stop every server we started; returns one line per problem."""
        problems = []
        for server in reversed(self.servers):
            problems += stop_quietly(server)
        self.servers.clear()
        return problems

    def close(self, keep_mounted: bool = False, keep_logs: bool = False) -> list:
        """Stop our servers, unmount our clones (unless kept); one line per problem.

        The directory goes away unless something is still mounted in it or
        ``keep_logs`` (after a failure, the server logs in run/ explain it).
        """
        problems = self.stop_servers()
        if not keep_mounted:
            for mnt in reversed(list(self.mounts)):
                problems += stop_stray_servers(mnt)
                try:
                    self.unmount(mnt)
                except CowfsError as exc:
                    problems.append(f"could not unmount {mnt}: {exc}")
        if not self.mounts and not keep_logs:
            shutil.rmtree(self.path, ignore_errors=True)
        return problems


def stop_stray_servers(mnt: str, timeout_s: float = 60.0) -> list:
    """Stop servers on a clone that nobody will stop otherwise; one line per problem.

    pg_upgrade starts servers of its own; when it is killed (Ctrl-C, a
    timeout) they stay and keep the clone's mount busy. Only a postmaster
    whose command line names a data directory on this mount is signalled
    (SIGQUIT: immediate shutdown; the clone is ours and crash-safe anyway).
    """
    problems = []
    for pid_file in glob.glob(os.path.join(mnt, "*", "postmaster.pid")) + \
            glob.glob(os.path.join(mnt, "postmaster.pid")):
        data_dir = os.path.dirname(pid_file)
        try:
            with open(pid_file) as f:
                pid = int(f.readline())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except (OSError, ValueError):
            continue                      # no such process: a stale file, nothing runs
        if data_dir not in cmdline:
            continue
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + timeout_s
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        if os.path.exists(f"/proc/{pid}"):
            problems.append(f"the server on {data_dir} (pid {pid}) did not stop")
    return problems


def stop_quietly(server: PgServer) -> list:
    """Stop a server fast, else immediately; never raises (used while cleaning up)."""
    if not os.path.exists(os.path.join(server.data_dir, "postmaster.pid")):
        return []          # stopped already, or its data directory has moved (install-new)
    for mode in ("fast", "immediate"):
        try:
            server.stop(mode, timeout_s=120)
            return []
        except (PgError, NotFoundError, OSError) as exc:
            last = f"could not stop the server of {server.data_dir} ({mode}): {exc}"
            log.warning("%s", last)
    return [last]


class Terminated(CowfsError):
    """SIGTERM arrived; raised inside the workflow so that its cleanup runs."""

    exit_code = 143


@contextmanager
def terminate_cleanly():
    """Turn SIGTERM into an exception for the duration of a workflow.

    Without it a service manager stopping us mid-cutover would leave the
    live server stopped; with it the workflow's own failure handling runs.
    """
    def _raise(signum, frame):
        raise Terminated("terminated by SIGTERM; the report says what was undone")
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
