"""Access: only the store's owner controls it; modes hold through the mount; snapshots are read-only.

The other users are the system users `postgres` and `nobody`; their
commands run as those users (subprocess user=...), with the system Python
for plain socket and file access.
"""

import errno
import json
import os
import pwd
import stat
import subprocess

import pytest

from helpers import Mount, cowfs, fsck_clean

SYSTEM_PYTHON = "/usr/bin/python3"

CONNECT = """
import json, os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps(dict(connect_errno=exc.errno)))
    sys.exit(0)
try:
    sock.sendall(json.dumps(dict(op="snapshot", name="intruder")).encode() + b"\\n")
except BrokenPipeError:
    pass        # a refused peer is answered and dropped before its request is read
print(sock.recv(65536).decode().strip())
"""

TRY_READ = """
import json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        (os.listdir if os.path.isdir(path) else (lambda p: open(p, "rb").read()))(path)
        out[path] = 0
    except OSError as exc:
        out[path] = exc.errno
print(json.dumps(out))
"""


def as_user(user: str, code: str, *args: str) -> dict:
    result = subprocess.run([SYSTEM_PYTHON, "-c", code, *args], capture_output=True, text=True,
                            user=user, cwd="/", timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_run_dir_and_control_socket_are_usable_only_by_the_owner(mounted):
    run_dir = os.path.join(mounted.store, "run")
    sock = os.path.join(run_dir, "vol-1.sock")
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert as_user("postgres", CONNECT, sock) == dict(connect_errno=errno.EACCES)
    assert "intruder" not in cowfs("list", mounted.store).stdout


def test_control_socket_checks_peer_credentials_even_if_modes_were_loosened(mounted):
    store = mounted.store
    run_dir, sock = os.path.join(store, "run"), os.path.join(store, "run", "vol-1.sock")
    modes = {path: stat.S_IMODE(os.stat(path).st_mode) for path in (store, run_dir, sock)}
    try:
        os.chmod(store, 0o711)
        os.chmod(run_dir, 0o711)
        os.chmod(sock, 0o666)
        answer = as_user("postgres", CONNECT, sock)
    finally:
        for path, mode in modes.items():
            os.chmod(path, mode)
    assert answer["ok"] is False and "permission denied" in answer["error"], answer
    assert "intruder" not in cowfs("list", store).stdout


def test_another_user_cannot_read_a_0700_directory_through_the_mount(mounted):
    root_dir, pg_dir = f"{mounted.path}/root-only", f"{mounted.path}/pg-only"
    pg_user = pwd.getpwnam("postgres")
    for path, owner in ((root_dir, None), (pg_dir, pg_user)):
        os.mkdir(path, 0o700)
        with open(f"{path}/secret", "wb") as f:
            f.write(b"secret")
        if owner is not None:
            os.chown(f"{path}/secret", owner.pw_uid, owner.pw_gid)
            os.chown(path, owner.pw_uid, owner.pw_gid)
        os.chmod(path, 0o700)
    denied = errno.EACCES
    assert as_user("postgres", TRY_READ, root_dir, f"{root_dir}/secret") == {
        root_dir: denied, f"{root_dir}/secret": denied}
    assert as_user("nobody", TRY_READ, pg_dir, f"{pg_dir}/secret") == {
        pg_dir: denied, f"{pg_dir}/secret": denied}
    assert as_user("postgres", TRY_READ, pg_dir, f"{pg_dir}/secret") == {
        pg_dir: 0, f"{pg_dir}/secret": 0}


WRITES = {
    "open for writing": lambda m: open(f"{m}/file", "r+b"),
    "create": lambda m: open(f"{m}/new", "wb"),
    "truncate": lambda m: os.truncate(f"{m}/file", 0),
    "mkdir": lambda m: os.mkdir(f"{m}/newdir"),
    "rmdir": lambda m: os.rmdir(f"{m}/dir"),
    "unlink": lambda m: os.unlink(f"{m}/file"),
    "rename": lambda m: os.rename(f"{m}/file", f"{m}/moved"),
    "link": lambda m: os.link(f"{m}/file", f"{m}/hard"),
    "symlink": lambda m: os.symlink("file", f"{m}/sym"),
    "mkfifo": lambda m: os.mkfifo(f"{m}/fifo"),
    "chmod": lambda m: os.chmod(f"{m}/file", 0o600),
    "chown": lambda m: os.chown(f"{m}/file", 1, 1),
    "utime": lambda m: os.utime(f"{m}/file", (1, 1)),
    "setxattr": lambda m: os.setxattr(f"{m}/file", "user.k", b"v"),
    "removexattr": lambda m: os.removexattr(f"{m}/file", "user.k"),
}


@pytest.fixture
def snapshot_mount(store, workdir):
    live = Mount(store, os.path.join(workdir, "mnt")).mount()
    try:
        os.mkdir(f"{live.path}/dir")
        with open(f"{live.path}/file", "wb") as f:
            f.write(b"frozen")
        os.setxattr(f"{live.path}/file", "user.k", b"v")
    finally:
        live.close()
    cowfs("snapshot", store, "main@frozen")
    snap = Mount(store, os.path.join(workdir, "snap"), volume="main@frozen").mount()
    try:
        yield snap
    finally:
        snap.close()
    fsck_clean(store)


def test_snapshot_mount_rejects_every_kind_of_write_with_erofs(snapshot_mount):
    got = {}
    for name, write in WRITES.items():
        try:
            write(snapshot_mount.path)
            got[name] = "succeeded"
        except OSError as exc:
            got[name] = errno.errorcode.get(exc.errno, exc.errno)
    assert got == {name: "EROFS" for name in WRITES}
    with open(f"{snapshot_mount.path}/file", "rb") as f:
        assert f.read() == b"frozen"
    assert os.getxattr(f"{snapshot_mount.path}/file", "user.k") == b"v"
