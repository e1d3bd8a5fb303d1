"""The mount lifecycle seen from outside the daemon: start, ready, find, unmount.

One module for both ends of every conversation about a mount, used by the
CLI (`cowfs mount`, `umount`, `status`), the PostgreSQL workflows and the
systemd service:

* **Ready.** The daemon says how mounting went exactly once, after every
  step (FUSE mount, registry entry, control socket) succeeded or one of them
  failed: ``OK`` or ``ERR <exit code> <message>`` on a pipe to the
  ``cowfs mount`` that started it (`Readiness`, written by the daemon;
  `spawn`, read by the CLI), and ``READY=1`` to systemd when it runs as a
  ``Type=notify`` service (`sd_notify`). ``STOPPING=1`` follows when the
  mount goes away and the final commit starts.
* **Registry.** ``/run/cowfs/<dev>.json``, one per mount, keyed by the
  mount's device number in /proc/self/mountinfo, lets `umount MOUNTPOINT`
  and `status` find the daemon without knowing the store. A daemon whose
  final flush failed leaves ``final-<pid>.json`` for `umount` to report
  (keyed by pid: the kernel hands the device number to the next mount as
  soon as this one is gone). Reading mountinfo never sends a request to a
  FUSE daemon, so a hung daemon cannot hang `umount` or `status`.

Nothing here imports the daemon: the daemon imports this module.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Iterator, Optional

from .errors import EXIT_FAILURE, BusyError, CowfsError, NotFoundError, StoreIOError, UsageError

log = logging.getLogger(__name__)

FUSE_TYPE = "fuse.cowfs"


# --- mount table ---------------------------------------------------------------------------

def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mountinfo() -> Iterator[dict]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            yield dict(dev=fields[2], mountpoint=_unescape(fields[4]), fstype=rfields[0],
                       source=_unescape(rfields[1]))


def find_mount(mountpoint: str) -> Optional[dict]:
    """The mountinfo entry of a mount point (the last one, if stacked), or None."""
    found = None
    for entry in _mountinfo():
        if entry["mountpoint"] == mountpoint:
            found = entry
    return found


def cowfs_mounts() -> list[dict]:
    """Every cowfs mount of this mount namespace, with its registry entry (or None)."""
    return [dict(entry, registry=read_registry(entry["dev"]))
            for entry in _mountinfo() if entry["fstype"] == FUSE_TYPE]


# --- registry ------------------------------------------------------------------------------

def registry_dir() -> str:
    base = "/run" if os.access("/run", os.W_OK) else (os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
    path = os.path.join(base, "cowfs" if base == "/run" else f"cowfs-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def registry_path(dev: str) -> str:
    return os.path.join(registry_dir(), dev.replace(":", "_") + ".json")


def read_registry(dev: str) -> Optional[dict]:
    try:
        with open(registry_path(dev)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_registry(dev: str, info: dict) -> None:
    write_json(registry_path(dev), info)


def write_json(path: str, info: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def final_status_path(pid: int) -> str:
    """Where a daemon that ends with an error leaves it for `cowfs umount`."""
    return os.path.join(registry_dir(), f"final-{pid}.json")


def forget_registry(dev: str) -> None:
    """Remove the registry entry of `dev` if it is still ours (the number may
    belong to a newer mount already)."""
    info = read_registry(dev)
    if info is not None and info.get("pid") == os.getpid():
        try:
            os.unlink(registry_path(dev))
        except OSError:
            pass


# --- ready: the daemon's side ------------------------------------------------------------------

def sd_notify(state: str, environ=os.environ) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager, if one asked for it.

    systemd's notify protocol: one datagram to the AF_UNIX socket named by
    $NOTIFY_SOCKET (a leading '@' names an abstract socket). Returns whether a
    manager was told; a failure to tell is logged, never raised, because the
    mount itself is fine (systemd's start timeout then says what happened).
    """
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("could not notify the service manager at %s (%s): %s",
                    environ.get("NOTIFY_SOCKET"), exc, state.replace("\n", " "))
        return False


class Readiness:
    """How the daemon reports its start: exactly one `ok` or `failed`, then `stopping`.

    Goes to the `cowfs mount` that started us (a pipe, `ready_fd`) and to
    systemd (`sd_notify`), whichever is there.
    """

    def __init__(self, ready_fd: Optional[int]):
        self._fd = ready_fd
        self._stopping_sent = False

    def _send_pipe(self, text: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, text.encode() + b"\n")
            os.close(self._fd)
        except OSError:
            pass
        self._fd = None

    def ok(self, status: str) -> None:
        self._send_pipe("OK")
        sd_notify(f"READY=1\nSTATUS={status}")
        log.info("%s", status)

    def failed(self, exc: CowfsError) -> int:
        """Report a failed start in one line; returns the exit code."""
        message = " ".join(str(exc).split())          # one line, whatever the cause said
        self._send_pipe(f"ERR {exc.exit_code} {message}")
        sd_notify(f"STATUS=mount failed: {message}\nERRNO={exc.exit_code}")
        log.error("%s", message)
        return exc.exit_code

    def stopping(self, status: str) -> None:
        if not self._stopping_sent:
            self._stopping_sent = True
            sd_notify(f"STOPPING=1\nSTATUS={status}")


# --- ready: the starter's side -----------------------------------------------------------------

def spawn(store: str, mountpoint: str, volume: str, commit_interval_s: float,
          extra_args=()) -> int:
    """Start `cowfs mount --foreground` detached; return its pid once the mount is usable.

    extra_args: more `cowfs mount` arguments for the daemon (--log-size, --no-xattrs).

    Raises the daemon's own error (its message and exit code) if mounting
    failed at any step; then nothing is left mounted.
    """
    run_dir = os.path.join(os.path.abspath(store), "run")
    log_path = os.path.join(run_dir, f"{volume}.log") if os.path.isdir(run_dir) else None
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "cowfs", "mount", store, mountpoint, "--volume", volume,
           "--foreground", "--ready-fd", str(write_fd), "--commit-interval", str(commit_interval_s)]
    cmd += list(extra_args)
    if log_path is not None:
        cmd += ["--log-file", log_path]
    # Its stdout/stderr go to the log as well, so that even output from
    # before its logging is set up (a crash at import) is kept.
    with open(log_path or os.devnull, "ab") as log_file:
        proc = subprocess.Popen(cmd, pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=log_file, start_new_session=True)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.read().decode(errors="replace").strip()
    if answer == "OK":
        return proc.pid
    if answer.startswith("ERR "):
        code, _, message = answer[4:].partition(" ")
        error = CowfsError(message)
        error.exit_code = int(code)
        raise error
    proc.wait()
    error = CowfsError(f"the mount daemon exited with status {proc.returncode} before the mount "
                       f"was ready; see {log_path or 'its log in STORE/run/'}")
    error.exit_code = EXIT_FAILURE
    raise error


# --- unmounting ------------------------------------------------------------------------------

def unmount(mountpoint: str, timeout_s: float = 600.0) -> None:
    """Unmount, wait for the daemon to commit and exit; raise if its final commit failed."""
    mnt = os.path.abspath(mountpoint)
    entry = find_mount(mnt)
    if entry is None:
        raise NotFoundError(f"{mnt} is not mounted")
    if entry["fstype"] != FUSE_TYPE:
        raise UsageError(f"{mnt} is not a cowfs mount (it is {entry['fstype']})")
    info = read_registry(entry["dev"])
    result = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip()
        if "busy" in detail.lower():
            raise BusyError(f"{mnt} is busy; stop the processes using it (see 'fuser -vm {mnt}') "
                            "and try again")
        raise CowfsError(f"unmounting {mnt} failed: {detail}")
    if info is not None:
        wait_for_exit(info["pid"], timeout_s, mnt)
        try:
            with open(final_status_path(info["pid"])) as f:
                final = json.load(f)
        except (OSError, ValueError):
            return
        os.unlink(final_status_path(info["pid"]))
        raise StoreIOError(f"{mnt}: {final.get('error')}")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def wait_for_exit(pid: int, timeout_s: float, mnt: str) -> None:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise BusyError(f"the daemon of {mnt} (pid {pid}) is still flushing after {timeout_s:.0f} s; "
                            "it keeps going, check its log")
        time.sleep(0.02)
