"""Test helpers: run the real CLI, mount for real, always clean up.

Everything here drives the product the way a user does (the `cowfs`
command, a FUSE mount, PostgreSQL binaries); nothing is mocked.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cowfs(*args, check=True, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """Run `cowfs ARGS` in a subprocess, as a user would."""
    result = subprocess.run([sys.executable, "-m", "cowfs", *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, cwd=REPO, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"cowfs {' '.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout}{result.stderr}")
    return result


def fsck_clean(store: str) -> str:
    result = cowfs("fsck", store, check=False)
    assert result.returncode == 0, f"fsck of {store} is not clean:\n{result.stdout}{result.stderr}"
    return result.stdout


def mount_entry(mountpoint: str):
    sys.path.insert(0, REPO)
    from cowfs import mounting
    return mounting.find_mount(os.path.abspath(mountpoint))


def daemon_pid(mountpoint: str) -> int:
    from cowfs import mounting
    entry = mount_entry(mountpoint)
    assert entry is not None, f"{mountpoint} is not mounted"
    info = mounting.read_registry(entry["dev"])
    assert info is not None, f"no registry entry for {mountpoint}"
    return info["pid"]


def daemon_stats(store: str, volume: str = "main") -> dict:
    """The `stats` answer of the daemon that mounts `volume`, its `figures`
    merged in (log_records_total...), and the volume's vol_id."""
    sys.path.insert(0, REPO)
    from cowfs import control, volumes
    from cowfs.store import Store
    s = Store.open(store)
    try:
        with s.env.begin() as txn:
            vol_id = volumes.volume_id(txn, s.env, volume)
        answer = control.request(s.run_dir, vol_id, {"op": "stats"})
        return dict(answer, **answer.get("figures", {}), vol_id=vol_id)
    finally:
        s.close()


def wait_for_log(store: str, volume: str = "main", timeout_s: float = 60) -> None:
    """A daemon writes its intent log's zeros in the background at a volume's
    first mount; until then fsyncs fold. Tests of the log wait for it."""
    deadline = time.monotonic() + timeout_s
    while not daemon_stats(store, volume)["log_enabled"]:
        assert time.monotonic() < deadline, "the intent log never came up"
        time.sleep(0.02)


def wait_gone(pid: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return
        except OSError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not exit within {timeout_s} s")


class Mount:
    """A volume mounted through `cowfs mount`; `close` always leaves nothing mounted."""

    def __init__(self, store: str, mountpoint: str, volume: str = "main"):
        self.store, self.path, self.volume = store, mountpoint, volume
        self.pid = None

    def mount(self) -> "Mount":
        os.makedirs(self.path, exist_ok=True)
        cowfs("mount", self.store, self.path, "--volume", self.volume)
        self.pid = daemon_pid(self.path)
        return self

    def umount(self) -> None:
        cowfs("umount", self.path)
        self.pid = None

    def kill9(self) -> None:
        """Crash the daemon (SIGKILL) and detach the dead mount lazily."""
        os.kill(self.pid, signal.SIGKILL)
        wait_gone(self.pid)
        subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)
        self.pid = None

    def close(self) -> None:
        """Teardown, also after failures: unmount, or force it."""
        if mount_entry(self.path) is None:
            return
        result = cowfs("umount", self.path, check=False, timeout=120)
        if result.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)
            if self.pid:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def make_workdir(prefix: str = "cowfs-test-") -> str:
    """A directory under /tmp that the postgres user can traverse (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o755)
    return path


def remove_workdir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def tree_snapshot(root: str) -> dict:
    """Names, types, modes, sizes, link counts, symlink targets and bytes of a tree."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            entry = dict(mode=oct(st.st_mode), size=st.st_size if not os.path.isdir(path) else None,
                         nlink=st.st_nlink)
            if os.path.islink(path):
                entry["target"] = os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    entry["sha"] = __import__("hashlib").sha256(f.read()).hexdigest()
            out[rel] = entry
    return out


def dump(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
