"""cowfs on a power-cut disk: the store on a `PowerCutDisk`, a volume mounted on top.

`Stack.power_cut` is what a machine's power loss does to a mounted cowfs:
the disk drops what was not made durable and every process writing to it
dies (the daemon, and the writers the test names). `Stack.power_back` mounts
a fresh disk on the same backing directory and checks the store with
`cowfs fsck`, as an operator would before mounting again.
"""

import contextlib
import os
from typing import Optional

from helpers import Mount, cowfs, fsck_clean, wait_for_log, wait_gone
from powercut import PowerCutDisk, is_mounted, kill_and_reap, lazy_unmount

# Long enough that no periodic commit runs during a test: every commit is one
# the test asked for, so counts and crash points are deterministic.
COMMIT_INTERVAL_S = "3600"
# A small intent log: its zeros are written through the (slow) power-cut disk
# at a volume's first mount.
LOG_SIZE = "4M"


class Stack:
    def __init__(self, disk: PowerCutDisk, workdir: str):
        self.disk = disk
        self.workdir = workdir
        self.store = os.path.join(disk.path, "store")
        self.mounts: dict[str, Mount] = {}

    def init(self) -> "Stack":
        cowfs("init", self.store)
        return self

    def mount(self, volume: str = "main", faults: Optional[str] = None) -> Mount:
        """Mount `volume` (or VOL@SNAP, read-only) at <workdir>/mnt-<volume>, with a
        fault plan for its daemon if given (see cowfs/faults.py)."""
        mount = Mount(self.store, os.path.join(self.workdir, f"mnt-{volume.replace('@', '-at-')}"), volume)
        os.makedirs(mount.path, exist_ok=True)
        self.mounts[volume] = mount                 # registered first: teardown must find it
        env = {**os.environ, "COWFS_FAULTS": faults} if faults else None
        read_write = "@" not in volume
        cowfs("mount", self.store, mount.path, "--volume", volume,
              *(["--commit-interval", COMMIT_INTERVAL_S, "--log-size", LOG_SIZE] if read_write else []),
              env=env)
        mount.pid = daemon_pid(mount.path)
        assert mount.pid is not None, f"no daemon serves {mount.path} after cowfs mount"
        if read_write:
            wait_for_log(self.store, volume)      # fsyncs go to the intent log from now on
        return mount

    def umount(self, volume: str = "main") -> None:
        """`cowfs umount`, then wait for the daemon itself (see `daemon_pid` for why)."""
        mount = self.mounts[volume]
        pid = mount.pid
        mount.umount()
        wait_gone(pid)
        del self.mounts[volume]

    def power_cut(self, writers: tuple = (), **cut) -> dict:
        """Cut the disk's power (`cut` as for `PowerCutDisk.cut`); every daemon and
        the `writers` (pids) die, their mounts are detached. Returns the cut report."""
        daemons = [m.pid for m in self.mounts.values() if m.pid]
        report = self.disk.cut(kill=[*writers, *daemons], **cut)
        for mount in self.mounts.values():
            lazy_unmount(mount.path)
            mount.pid = None
        self.mounts.clear()
        return report

    def power_back(self, fsck: bool = True) -> None:
        """A fresh disk on the same backing directory; the store must be consistent.

        `cowfs fsck` replays the intent logs of unmounted volumes, as an
        operator's first command would; fsck=False leaves that to the next
        mount (the daemon replays before it serves)."""
        self.disk.remount()
        if fsck:
            fsck_clean(self.store)

    def close(self) -> None:
        """Teardown, also after failures: every cowfs mount first, then (by the caller) the disk."""
        for mount in self.mounts.values():
            with contextlib.suppress(Exception):
                mount.close()
            if is_mounted(mount.path):
                lazy_unmount(mount.path)
            pid = mount.pid or daemon_pid(mount.path)
            if pid:
                kill_and_reap(pid)
        self.mounts.clear()


def daemon_pid(mountpoint: str) -> Optional[int]:
    """The pid of the `cowfs mount --foreground` process serving `mountpoint`, or None.

    Found in /proc, not in cowfs's registry (/run/cowfs/<dev>.json): that file
    is keyed by a device number the kernel reuses as soon as a mount goes, so a
    daemon still flushing after its unmount can remove the entry of the next
    mount that got the same number (other test runs share /run/cowfs)."""
    wanted = os.path.abspath(mountpoint).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"--foreground" in argv and b"mount" in argv and wanted in argv and b"cowfs" in argv:
            return int(entry)
    return None


@contextlib.contextmanager
def stack_on_disk(workdir: str):
    """A store on a fresh power-cut disk; unmounts everything on the way out."""
    with PowerCutDisk(workdir) as disk:
        stack = Stack(disk, workdir).init()
        try:
            yield stack
        finally:
            stack.close()


def fsck_verify_data(store: str) -> None:
    result = cowfs("fsck", store, "--verify-data", check=False)
    assert result.returncode == 0, f"fsck --verify-data of {store}:\n{result.stdout}{result.stderr}"


__all__ = ["Stack", "stack_on_disk", "fsck_clean", "fsck_verify_data", "COMMIT_INTERVAL_S"]
