"""A store on disk: its directories, its LMDB environment, format checks, locks.

``Store.create`` and ``Store.open`` are the only ways in; both refuse what
they cannot handle with a `CowfsError` whose message says what to do.
"""

import fcntl
import os
import time
import uuid

import lmdb

from . import faults, lmdb_check, schema
from .chunks import ChunkStore
from .errors import BusyError, ExistsError, NotFoundError, StoreError, UsageError
from .packs import fsync_dir


def _check_chunk_size(chunk_size: int) -> None:
    if (chunk_size < schema.MIN_CHUNK_SIZE or chunk_size > schema.MAX_CHUNK_SIZE
            or chunk_size & (chunk_size - 1)):
        raise UsageError(f"chunk size {chunk_size} is not a power of two between "
                         f"{schema.MIN_CHUNK_SIZE} and {schema.MAX_CHUNK_SIZE} bytes")


class Store:
    def __init__(self, path: str, env: schema.Env):
        self.path = path
        self.env = env
        faults.install_from_env()      # test-only; does nothing unless COWFS_FAULTS is set
        self.packs = faults.pack_store(os.path.join(path, "packs"))
        self.chunks = ChunkStore(env, self.packs)
        with env.begin() as txn:
            self.chunk_size = schema.unpack_le_u64(txn.get(b"chunk_size", db=env.meta))

    @property
    def run_dir(self) -> str:
        return os.path.join(self.path, "run")

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.path, "logs")

    def prepare_for_logs(self) -> None:
        """Before a volume's intent log is first used: STORE/logs/ exists, and
        a format-1 store becomes format 2, durably, so that an older cowfs
        (which would not replay a log) refuses it from now on."""
        if not os.path.isdir(self.logs_dir):
            os.makedirs(self.logs_dir, mode=0o700, exist_ok=True)
            fsync_dir(self.path)
        with self.env.begin() as txn:
            version = txn.get(b"format_version", db=self.env.meta)
        if version != str(schema.FORMAT_VERSION).encode():
            with self.env.begin(write=True) as txn:
                txn.put(b"format_version", str(schema.FORMAT_VERSION).encode(), db=self.env.meta)
            self.env.lmdb.sync(True)

    @property
    def uuid(self) -> bytes:
        with self.env.begin() as txn:
            return bytes(txn.get(b"store_uuid", db=self.env.meta) or bytes(16))

    # --- creating and opening ----------------------------------------------------

    @classmethod
    def create(cls, path: str, chunk_size: int = schema.DEFAULT_CHUNK_SIZE) -> "Store":
        """Create a store in a missing or empty directory (volumes are made by the caller)."""
        _check_chunk_size(chunk_size)
        path = os.path.abspath(path)
        if os.path.exists(os.path.join(path, "meta")):
            raise ExistsError(f"{path} already holds a cowfs store; pick another directory")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise ExistsError(f"{path} exists and is not an empty directory; "
                              "give a new or empty directory")
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise NotFoundError(f"parent directory {parent} does not exist; create it first")
        os.makedirs(path, mode=0o700, exist_ok=True)
        for sub in ("meta", "packs", "run", "logs"):
            os.mkdir(os.path.join(path, sub), 0o700)
        env = schema.Env(os.path.join(path, "meta"), create=True)
        with env.begin(write=True) as txn:
            meta = env.meta
            txn.put(b"chunk_size", schema.pack_le_u64(chunk_size), db=meta)
            txn.put(b"next_vol_id", schema.pack_le_u64(1), db=meta)
            txn.put(b"next_pack_id", schema.pack_le_u64(1), db=meta)
            txn.put(b"created_ns", schema.pack_le_u64(time.time_ns()), db=meta)
            txn.put(b"store_uuid", uuid.uuid4().bytes, db=meta)
            # Written last: a store without it is an interrupted init.
            txn.put(b"format_version", str(schema.FORMAT_VERSION).encode(), db=meta)
        fsync_dir(path)
        return cls(path, env)

    @classmethod
    def open(cls, path: str, metasync: bool = True) -> "Store":
        """Open an existing store; `metasync` False only for the mount daemon (see `schema.Env`)."""
        path = os.path.abspath(path)
        meta_dir = os.path.join(path, "meta")
        if os.path.exists(path) and not os.path.isdir(path):
            raise StoreError(f"{path} is a file, not a cowfs store (a store is a directory made by "
                             "'cowfs init')")
        if not os.path.isdir(path):
            raise NotFoundError(f"store {path} does not exist; create it with 'cowfs init {path}'")
        if not os.path.isfile(os.path.join(meta_dir, "data.mdb")):
            raise StoreError(f"{path} is not a cowfs store (no meta/data.mdb); "
                             f"create one with 'cowfs init'")
        problem = lmdb_check.file_problem(os.path.join(meta_dir, "data.mdb"))
        if problem is not None:
            raise StoreError(f"metadata of store {path} is damaged: {problem}; restore meta/ from a copy")
        try:
            env = schema.Env(meta_dir, metasync=metasync)
        except lmdb.Error as exc:
            raise StoreError(f"metadata of store {path} cannot be opened ({exc}); "
                             "restore meta/ from a copy") from exc
        try:
            with env.begin() as txn:
                version = txn.get(b"format_version", db=env.meta)
        except lmdb.Error as exc:
            env.close()
            raise StoreError(f"metadata of store {path} is damaged ({exc}); "
                             "restore meta/ from a copy") from exc
        if version is None:
            env.close()
            raise StoreError(f"store {path} has no format version (interrupted init?); "
                             "remove it and run 'cowfs init' again")
        if version not in [str(v).encode() for v in schema.READABLE_FORMAT_VERSIONS]:
            env.close()
            raise StoreError(f"store {path} has format version {version.decode(errors='replace')}, "
                             f"this cowfs reads version {schema.FORMAT_VERSION}; "
                             "use the cowfs release that wrote it")
        return cls(path, env)

    def close(self) -> None:
        self.chunks.close()
        self.env.close()

    # --- volume locks ------------------------------------------------------------

    def lock_path(self, vol_id: int) -> str:
        return os.path.join(self.run_dir, f"vol-{vol_id}.lock")

    def lock_volume(self, vol_id: int, name: str, holder: str) -> "VolumeLock":
        """Take the exclusive lock that one read-write user of a volume holds."""
        return _flock(self.lock_path(vol_id), fcntl.LOCK_EX, holder,
                      f"volume {name} is in use ({{held_by}}); unmount it first")

    def snapshot_lock_path(self, vol_id: int, gen: int) -> str:
        return os.path.join(self.run_dir, f"snap-{vol_id}-{gen}.lock")

    def lock_snapshot(self, vol_id: int, gen: int, what: str, exclusive: bool, holder: str) -> "VolumeLock":
        """Shared: a read-only mount of the snapshot; exclusive: freeing its data."""
        return _flock(self.snapshot_lock_path(vol_id, gen), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, holder,
                      f"snapshot {what} is in use ({{held_by}}); unmount it first")


def _flock(path: str, mode: int, holder: str, busy_message: str) -> "VolumeLock":
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        held_by = _read_small(fd) or "by another process"
        os.close(fd)
        raise BusyError(busy_message.format(held_by=held_by)) from None
    if mode == fcntl.LOCK_EX:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}, pid {os.getpid()}".encode(), 0)
    return VolumeLock(fd, truncate=mode == fcntl.LOCK_EX)


def _read_small(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


class VolumeLock:
    def __init__(self, fd: int, truncate: bool = True):
        self._fd = fd
        self._truncate = truncate

    def release(self) -> None:
        if self._fd >= 0:
            if self._truncate:
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
