"""What every benchmark needs: sides (a plain directory or a cowfs mount), cleanup, probes.

A *side* is the place where one copy of a workload runs: a plain directory
on the disk that holds the store, or a cowfs mount of a store in the same
directory. The suite runs each workload on both sides, interleaved, and
reports the ratio cowfs / plain.

Everything started here (mounts, PostgreSQL servers, helper processes) is
registered with the `Harness` and taken down by `Harness.close`, which the
suite calls in a ``finally``: servers are stopped, mounts unmounted with
``cowfs umount`` (lazily with ``fusermount3 -u -z`` if that fails), helper
processes ended by their pid, loop disks unmounted and detached. Nothing
is ended by name.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cowfs import mounting  # noqa: E402
from cowfs.pg import PgServer, free_port  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cowfs_cli(*args, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "cowfs", *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise RuntimeError(f"cowfs {' '.join(map(str, args))} exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()}")
    return result


def pg_bin_dir(major: str = "14") -> str:
    result = subprocess.run(["bash", os.path.join(REPO, "tools", "pgbin"), major],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"PostgreSQL {major} binaries missing: {result.stderr.strip()} "
                           "(run tools/setup.sh)")
    return result.stdout.strip()


def drop_caches() -> bool:
    """sync + drop the page cache (root only); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_bytes(path: str) -> int:
    """Bytes allocated on disk under ``path`` (like ``du -s --block-size=1``)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def proc_status(pid: int) -> dict:
    """VmRSS / VmHWM / RssAnon / RssFile of a process in bytes ({} when it is gone).

    RssFile is mostly the LMDB map (page cache, shared and reclaimable);
    RssAnon is the daemon's own heap: buffers, caches, Python objects.
    """
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def proc_cpu_s(pid: int) -> Optional[float]:
    """utime + stime of a process in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Extra `cowfs mount` arguments for every mount of a run (suite.py --mount-arg).
MOUNT_ARGS: list = []


@dataclass
class Mount:
    """One mounted volume of a store (the daemon is ours: we started it)."""

    store: str
    path: str
    volume: str = "main"
    pid: Optional[int] = None

    def mount(self) -> "Mount":
        os.makedirs(self.path, exist_ok=True)
        extra = MOUNT_ARGS if "@" not in self.volume else []
        cowfs_cli("mount", self.store, self.path, "--volume", self.volume, *extra)
        entry = mounting.find_mount(os.path.abspath(self.path))
        info = mounting.read_registry(entry["dev"]) if entry else None
        if not info:
            raise RuntimeError(f"{self.path} is not mounted after cowfs mount")
        self.pid = info["pid"]
        return self

    def close(self) -> None:
        if mounting.find_mount(os.path.abspath(self.path)) is None:
            return
        result = cowfs_cli("umount", self.path, check=False, timeout=300)
        if result.returncode != 0:
            log(f"cowfs umount {self.path} failed ({result.stderr.strip()}); detaching lazily")
            subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)
            if self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGTERM)


class LoopDisk:
    """An ext4 image attached to a loop device and mounted: a block device of its own.

    Its ``/sys/block/<dev>/stat`` counts the I/O of what runs on it and of
    nothing else, so a benchmark can count device flushes (field 16) of one
    workload. The loop device passes a flush on as an fsync of the image file;
    it has no FUA (like this machine's virtio disk), so a journal commit
    counts two flushes (before and after the commit block).
    """

    def __init__(self, image: str, mountpoint: str):
        self.image, self.mountpoint = image, mountpoint
        self.device: Optional[str] = None
        self.mounted = False

    def create(self, size_bytes: int) -> None:
        with open(self.image, "wb") as f:
            f.truncate(size_bytes)                     # sparse: costs what is written
        subprocess.run(["mkfs.ext4", "-q", "-F", self.image], check=True, capture_output=True)
        self.device = subprocess.run(["losetup", "--find", "--show", self.image], check=True,
                                     capture_output=True, text=True).stdout.strip()
        os.makedirs(self.mountpoint, exist_ok=True)
        subprocess.run(["mount", self.device, self.mountpoint], check=True, capture_output=True)
        self.mounted = True
        os.chmod(self.mountpoint, 0o755)               # the postgres user must traverse it

    @property
    def name(self) -> str:
        return os.path.basename(self.device)

    def stat(self) -> dict:
        """Counters of /sys/block/<dev>/stat (Documentation/block/stat.rst)."""
        with open(f"/sys/block/{self.name}/stat") as f:
            fields = [int(x) for x in f.read().split()]
        return dict(write_ios=fields[4], write_bytes=fields[6] * 512, flush_ios=fields[15])

    def close(self) -> None:
        if self.mounted:
            if subprocess.run(["umount", self.mountpoint], capture_output=True).returncode != 0:
                log(f"umount {self.mountpoint} failed; detaching lazily")
                subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
            self.mounted = False
        if self.device:
            subprocess.run(["losetup", "-d", self.device], capture_output=True)
            self.device = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.image)


@dataclass
class Side:
    """Where one copy of a workload runs."""

    kind: str                      # "plain" or "cowfs"
    label: str                     # e.g. "cowfs-16k"
    root: str                      # directory to work in
    mount: Optional[Mount] = None
    store: Optional[str] = None
    chunk_size: Optional[int] = None

    @property
    def daemon_pid(self) -> Optional[int]:
        return self.mount.pid if self.mount else None


@dataclass
class Cluster:
    """A PostgreSQL cluster on a side, started by us."""

    side: Side
    server: PgServer
    extra: dict = field(default_factory=dict)


class RssMonitor:
    """Samples VmHWM of every daemon we started, so the peak survives the unmount."""

    def __init__(self, interval_s: float = 0.5):
        self.peaks: dict = {}            # pid -> dict(label, hwm, rss)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._interval_s = interval_s
        self._thread.start()

    def watch(self, pid: int, label: str) -> None:
        with self._lock:
            self.peaks.setdefault(pid, dict(label=label, hwm=0, rss=0, anon=0, file=0))
        self.sample(pid)

    def sample(self, pid: int) -> None:
        status = proc_status(pid)
        with self._lock:
            entry = self.peaks.get(pid)
            if entry is None or not status:
                return
            entry["hwm"] = max(entry["hwm"], status.get("VmHWM", 0))
            entry["rss"] = max(entry["rss"], status.get("VmRSS", 0))
            entry["anon"] = max(entry["anon"], status.get("RssAnon", 0))
            entry["file"] = max(entry["file"], status.get("RssFile", 0))

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            for pid in list(self.peaks):
                self.sample(pid)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def peak_bytes(self, label_prefix: str = "") -> int:
        with self._lock:
            return max((e["hwm"] for e in self.peaks.values() if e["label"].startswith(label_prefix)),
                       default=0)


class Harness:
    """Owns the work directory and everything started in it; `close` undoes it all."""

    def __init__(self, base_dir: str, pg_major: str = "14", profile_dir: Optional[str] = None,
                 store_dir: Optional[str] = None):
        self.work = tempfile.mkdtemp(prefix="cowfs-bench-", dir=base_dir)
        os.chmod(self.work, 0o755)      # the postgres user must traverse it
        # Stores elsewhere (e.g. tmpfs) only for experiments: the figures are
        # then no longer "the same disk" and the report says so.
        self.store_work = tempfile.mkdtemp(prefix="cowfs-bench-stores-", dir=store_dir) if store_dir else self.work
        self.pg_bin = pg_bin_dir(pg_major)
        self.rss = RssMonitor()
        self.profile_dir = profile_dir
        self.profiles: dict = {}
        self._mounts: list = []
        self._loops: list = []
        self._servers: list = []
        self._procs: list = []
        self._ports: set = set()
        self._names: dict = {}

    # --- sides -------------------------------------------------------------------------------

    def _unique(self, label: str) -> str:
        n = self._names.get(label, 0)
        self._names[label] = n + 1
        return label if n == 0 else f"{label}-{n}"

    def plain_side(self, label: str = "plain", base: Optional[str] = None) -> Side:
        """A plain directory in the work directory, or in `base` (e.g. a `LoopDisk`)."""
        label = self._unique(label)
        root = os.path.join(base or self.work, label)
        os.makedirs(root, mode=0o755)
        return Side("plain", label, root)

    def cowfs_side(self, label: str = "cowfs", chunk_size: Optional[int] = None,
                   base: Optional[str] = None) -> Side:
        """A fresh store (in `base` if given) with its volume main mounted."""
        label = self._unique(label)
        store = os.path.join(base or self.store_work, f"{label}-store")
        args = ["init", store] + (["--chunk-size", str(chunk_size)] if chunk_size else [])
        cowfs_cli(*args)
        mount = self.mount(store, os.path.join(self.work, f"{label}-mnt"), "main", label)
        return Side("cowfs", label, mount.path, mount, store, chunk_size)

    def mount(self, store: str, path: str, volume: str, label: str) -> Mount:
        mount = Mount(store, path, volume)
        self._mounts.append(mount)
        mount.mount()
        self.rss.watch(mount.pid, label)
        return mount

    def unmount(self, mount: Mount) -> None:
        if mount.pid:
            self.rss.sample(mount.pid)
        mount.close()
        if mount in self._mounts:
            self._mounts.remove(mount)

    def loop_disk(self, label: str, size_bytes: int) -> "LoopDisk":
        """An ext4 image of its own on a loop device, mounted in the work directory."""
        disk = LoopDisk(os.path.join(self.work, f"{label}.img"), os.path.join(self.work, label))
        self._loops.append(disk)
        disk.create(size_bytes)
        return disk

    def close_loop(self, disk: "LoopDisk") -> None:
        disk.close()
        if disk in self._loops:
            self._loops.remove(disk)

    # --- PostgreSQL ---------------------------------------------------------------------------

    def cluster(self, side: Side, name: str = "pgdata", settings: Optional[dict] = None,
                initdb: bool = True) -> Cluster:
        # The server log goes to its socket directory (owned by the server's user).
        server = PgServer(self.pg_bin, os.path.join(side.root, name))
        if initdb:
            server.initdb()
        self.start(server, settings)
        return Cluster(side, server)

    def start(self, server: PgServer, settings: Optional[dict] = None) -> None:
        port = free_port(exclude=self._ports)
        self._ports.add(port)
        self._servers.append(server)
        server.start(port, os.path.join(self.work, f"run-{port}"), settings=settings)

    def stop(self, server: PgServer) -> None:
        try:
            server.stop("fast")
        except Exception as exc:          # noqa: BLE001 -- still try the hard way
            log(f"fast stop of {server.data_dir} failed ({exc}); immediate")
            with contextlib.suppress(Exception):
                server.stop("immediate")
        if server in self._servers:
            self._servers.remove(server)

    # --- helper processes ----------------------------------------------------------------------

    def popen(self, argv, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, **kwargs)
        self._procs.append(proc)
        return proc

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        self._procs.append(proc)
        return proc

    def end(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)

    # --- measurement helpers --------------------------------------------------------------------

    @contextlib.contextmanager
    def observe(self, side: Side, result: dict, profile_key: Optional[str] = None):
        """Adds daemon CPU use (and a py-spy profile when asked) to a cowfs measurement."""
        pid = side.daemon_pid
        if pid is None:
            yield
            return
        cpu0, t0 = proc_cpu_s(pid), time.perf_counter()
        spy = self._start_profile(pid, profile_key)
        try:
            yield
        finally:
            wall = time.perf_counter() - t0
            cpu1 = proc_cpu_s(pid)
            if spy is not None:
                self._finish_profile(spy, profile_key)
            self.rss.sample(pid)
            if cpu0 is not None and cpu1 is not None and wall > 0:
                result["daemon_cpu_s"] = round(cpu1 - cpu0, 3)
                result["daemon_cpu_util"] = round((cpu1 - cpu0) / wall, 3)
            status = proc_status(pid)
            if status:
                result["daemon_hwm_bytes"] = status.get("VmHWM")

    def _start_profile(self, pid: int, key: Optional[str]):
        if not self.profile_dir or key is None or key in self.profiles:
            return None
        spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
        if spy is None:
            log("py-spy not found; no profile (pip install py-spy)")
            return None
        os.makedirs(self.profile_dir, exist_ok=True)
        out = os.path.join(self.profile_dir, f"profile-{key}.txt")
        self.profiles[key] = out
        proc = self.popen([spy, "record", "-p", str(pid), "-f", "raw", "-o", out, "-r", "97",
                           "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)                   # let it attach before the work starts
        return proc

    def _finish_profile(self, proc: subprocess.Popen, key: str) -> None:
        self.end(proc, signal.SIGINT, timeout_s=60)

    # --- teardown -------------------------------------------------------------------------------

    def release(self) -> None:
        """End, stop and unmount everything started so far (after a failed group, and at the end)."""
        for proc in list(self._procs):
            with contextlib.suppress(Exception):
                self.end(proc)
        for server in list(self._servers):
            with contextlib.suppress(Exception):
                self.stop(server)
        for mount in list(reversed(self._mounts)):
            with contextlib.suppress(Exception):
                self.unmount(mount)
        for disk in list(reversed(self._loops)):       # after the mounts whose stores are on them
            with contextlib.suppress(Exception):
                self.close_loop(disk)

    def close(self, keep: bool = False) -> None:
        self.release()
        self.rss.stop()
        if not keep:
            shutil.rmtree(self.work, ignore_errors=True)
            shutil.rmtree(self.store_work, ignore_errors=True)
