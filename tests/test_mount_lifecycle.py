"""Ready means everything is up; a failed start leaves nothing mounted; systemd's
notify protocol (READY=1, STOPPING=1) against a real datagram socket.

The daemon runs for real (`cowfs mount`, `cowfs mount --foreground`), as the
systemd unit runs it; the notify socket is one this test binds, playing the
part of systemd's.
"""

import os
import signal
import socket
import subprocess
import sys

import pytest

from cowfs import errors, mounting
from helpers import REPO, Mount, cowfs, fsck_clean, mount_entry
from test_cli_errors import assert_one_line_error

NOTIFY_TIMEOUT_S = 120          # only against a hang; nothing here measures time


def _notify_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(NOTIFY_TIMEOUT_S)
    return sock


def _messages(sock: socket.socket) -> dict:
    """One datagram as a dict of its KEY=VALUE lines."""
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)


def _start_foreground(store: str, mnt: str, notify_path: str) -> subprocess.Popen:
    """The command line of the systemd unit (`service.exec_start`), with our notify socket."""
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    return subprocess.Popen([sys.executable, "-m", "cowfs", "mount", store, mnt, "--volume", "main",
                             "--foreground"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop(proc: subprocess.Popen, mnt: str) -> None:
    """Teardown, also after failures."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if mount_entry(mnt) is not None:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)


def _break_socket_path(store: str) -> None:
    """A directory where the control socket must go: binding it fails (EISDIR).

    Stands in for a store on a filesystem that cannot hold Unix sockets: the
    failure comes after the FUSE mount, as it did there."""
    os.makedirs(os.path.join(store, "run", "vol-1.sock", "keep"))


def test_failure_after_fuse_mount_unmounts_and_says_why(store, workdir):
    mnt = os.path.join(workdir, "mnt")
    os.mkdir(mnt)
    _break_socket_path(store)
    result = cowfs("mount", store, mnt, check=False)
    assert_one_line_error(result, errors.EXIT_IO, "cannot create the control socket", "Unix sockets")
    assert mount_entry(mnt) is None, "a failed start left a mount behind"
    assert not [m for m in mounting.cowfs_mounts() if m["mountpoint"] == mnt]
    with open(os.path.join(store, "run", "main.log")) as f:
        assert "cannot create the control socket" in f.read()
    # Nothing is left locked or registered: once the cause is gone, it mounts.
    os.rmdir(os.path.join(store, "run", "vol-1.sock", "keep"))
    os.rmdir(os.path.join(store, "run", "vol-1.sock"))
    mount = Mount(store, mnt).mount()
    try:
        cowfs("snapshot", store, "main@after")
    finally:
        mount.close()
    fsck_clean(store)


def test_ready_comes_after_the_control_socket_and_stopping_before_the_final_commit(store, workdir):
    mnt = os.path.join(workdir, "mnt")
    os.mkdir(mnt)
    notify_path = os.path.join(workdir, "notify.sock")
    sock = _notify_socket(notify_path)
    proc = _start_foreground(store, mnt, notify_path)
    try:
        ready = _messages(sock)
        assert ready.get("READY") == "1", ready
        assert mnt in ready["STATUS"]
        # Everything is up when READY arrives: the mount, the registry, the control socket.
        entry = mount_entry(mnt)
        assert entry is not None and entry["fstype"] == mounting.FUSE_TYPE
        assert mounting.read_registry(entry["dev"])["pid"] == proc.pid
        assert os.path.exists(os.path.join(store, "run", "vol-1.sock"))
        cowfs("snapshot", store, "main@at-ready")                   # answered by the daemon
        with open(os.path.join(mnt, "buffered"), "wb") as f:
            f.write(b"q" * 300_000)                                  # not fsynced
        proc.send_signal(signal.SIGTERM)                            # what systemd's stop sends
        stopping = _messages(sock)
        assert stopping.get("STOPPING") == "1", stopping
        assert proc.wait(timeout=NOTIFY_TIMEOUT_S) == 0, proc.stderr.read()
    finally:
        _stop(proc, mnt)
        sock.close()
    assert mount_entry(mnt) is None
    fsck_clean(store)
    mount = Mount(store, mnt).mount()
    try:
        with open(os.path.join(mnt, "buffered"), "rb") as f:
            assert f.read() == b"q" * 300_000, "the stop did not commit every buffered write"
    finally:
        mount.close()


def test_a_failed_start_never_says_ready(store, workdir):
    mnt = os.path.join(workdir, "mnt")
    os.mkdir(mnt)
    _break_socket_path(store)
    notify_path = os.path.join(workdir, "notify.sock")
    sock = _notify_socket(notify_path)
    proc = _start_foreground(store, mnt, notify_path)
    try:
        status = _messages(sock)
        assert "READY" not in status and "mount failed" in status["STATUS"], status
        assert proc.wait(timeout=NOTIFY_TIMEOUT_S) == errors.EXIT_IO
        stderr = proc.stderr.read().decode()
        assert "Traceback" not in stderr and "cannot create the control socket" in stderr
    finally:
        _stop(proc, mnt)
        sock.close()
    assert mount_entry(mnt) is None


def test_sd_notify_reaches_an_abstract_socket_and_is_silent_without_a_manager():
    name = f"cowfs-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(NOTIFY_TIMEOUT_S)
        assert mounting.sd_notify("READY=1\nSTATUS=up", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    assert mounting.sd_notify("READY=1", environ={}) is False


@pytest.mark.parametrize("path", ["/proc/cowfs-store", "/sys/cowfs-store"])
def test_init_where_nothing_can_be_created_is_one_line(path):
    assert_one_line_error(cowfs("init", path, check=False), errors.EXIT_IO, "cannot create a store", path)
    assert not os.path.exists(path)
