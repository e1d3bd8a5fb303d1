"""The on-disk format: every LMDB sub-database, its key and value layout.

This module is *the* documentation of the metadata format (docs/design.md
repeats it for readers who do not read code). Nothing else in cowfs builds or
parses LMDB keys by hand. All integers in keys are big-endian so that LMDB's
bytewise order is numeric order; values use little-endian structs.

Store layout on disk::

    STORE/meta/     LMDB environment (data.mdb, lock.mdb)
    STORE/packs/    append-only pack files  <pack_id:08x>.pack
    STORE/logs/     intent logs, one per volume mounted read-write  vol-<vol_id>.log
    STORE/run/      per-volume lock files, daemon info, logs (mode 0700)

Sub-databases (name: key -> value):

``meta``        b"format_version" -> ascii int (FORMAT_VERSION)
                b"chunk_size"     -> u32 bytes per chunk (power of two)
                b"next_vol_id", b"next_pack_id" -> u64 allocators (never reused)
                b"created_ns"     -> i64 store creation time
``volumes``     vol_id u64 -> VolumeRecord (see `pack_volume`)
``volnames``    utf-8 name -> vol_id u64
``snapshots``   vol_id u64 | gen u64 -> SnapshotRecord; gen is the generation the
                snapshot froze (reads as of gen). Name b"" = unnamed but kept
                because a clone depends on it. After the name, if the volume
                had orphans when the snapshot was taken: b"\0" and their inode
                numbers (u64 each), so that a clone or a rollback of it knows
                them (see ``orphans``).
``snapnames``   vol_id u64 | utf-8 name -> gen u64
``records``     vol_id u64 | kind u8 | record key | inv_gen u64 -> tag u8 + payload
                The versioned catalog. inv_gen = 2**64-1-gen, so for one record
                key the newest version sorts first and a single ``set_range``
                to (key, inv(G)) lands on the newest version with gen <= G.
                tag 0 = tombstone (deleted at gen), tag 1 = live payload.
                Kinds and record keys:
                  KIND_INODE  b"I": ino u64                -> inode attributes
                  KIND_DENTRY b"D": parent_ino u64 | name | 0x00 -> child ino u64
                  KIND_CHUNK  b"C": ino u64 | chunk_index u64 -> chunk_id (16 bytes)
                  KIND_XATTR  b"X": ino u64 | name | 0x00 -> value bytes
                Names never contain NUL, so the 0x00 terminator makes one name's
                keys never a prefix of another name's keys.
``born``        vol_id u64 | gen u64 | kind u8 | record key -> b""
                Change log: the record versions born at each generation. Diff
                and snapshot deletion walk it, so they cost O(changes).
``chunks``      chunk_id (xxh3-128 digest, 16 bytes) -> pack_id u32, offset u64,
                length u32, refcount u64. offset points at the chunk bytes (after
                the entry header). refcount = number of KIND_CHUNK record
                *versions* naming the chunk; an entry is deleted in the same
                transaction that brings its count to 0 (rule 4).
``packs``       pack_id u32 -> live_bytes u64, live_chunks u64
``orphans``     vol_id u64 | ino u64 -> b""  inodes unlinked while open; freed
                at last close or at the next mount of the volume.
``holds``       vol_id u64 | gen u64 -> created_ns i64 LE | utf-8 reason
                A held snapshot (keyed by generation, so a rename keeps the
                hold) cannot be destroyed, pruned, or lose its volume.
``policies``    vol_id u64 -> PolicyRecord (see `pack_policy`): every_s u64,
                keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly
                u32 each (0 = rule not used). The daemon mounting the volume
                re-reads it every tick, so a change needs no remount.
``logs``        The intent log of each volume (see `intent_log`):
                vol_id u64               -> LogState: epoch u64, next_seq u64,
                    start_offset u64, start_seq u64 (LE): replay reads the
                    volume's log file from start_offset, expecting records of
                    this epoch numbered start_seq, start_seq + 1, ...
                vol_id u64 | ino u64     -> fence u64 LE: the newest seq whose
                    changes to this inode are in LMDB already (a truncate
                    committed past the log); replay skips records at or below.
                Deleted with the volume.
``paths``       Reverse path index of volume heads, kept by `diff` (a cache:
                dropping it loses nothing, the next diff rebuilds it).
                vol_id u64 | b"G"                                -> gen u64
                    the index reflects the head as of this generation; the
                    ``born`` log after it is replayed on the next use.
                vol_id u64 | b"F" | parent_ino u64 | name | 0x00 -> ino u64
                    the dentries as indexed (to know what a change replaced).
                vol_id u64 | b"R" | ino u64 | parent_ino u64 | name | 0x00 -> b""
                    every name of an inode: ino -> path in O(depth).
``digests``     vol_id u64 | gen u64 -> algorithm u8 (DIGEST_ALGORITHM) | digest (16 bytes)
                Content digest of the snapshot (vol_id, gen), a cache kept by
                `digest`: computed on first use from the nearest older cached
                point plus the ``born`` log in between, O(changes). Snapshots
                are immutable, so an entry never goes stale; it is deleted
                with its snapshot record. Dropping it loses nothing.

Snapshot record flags (``snapshots`` value): SNAP_FLAG_AUTO marks a snapshot
taken by a schedule; only those are ever pruned.

Pack file format (``packs/<pack_id:08x>.pack``)::

    header  : PACK_MAGIC (8 bytes) | pack_id u32 LE | 4 bytes zero
    entries : ENTRY_MAGIC (4 bytes) | length u32 LE | chunk_id (16) | bytes
"""

import struct

import lmdb

# 2: the intent log (``logs``, STORE/logs/). A format-1 store is read as it
# is and becomes format 2 when a volume of it is first mounted read-write,
# so that an older cowfs, which would not replay a log, refuses it.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
DEFAULT_CHUNK_SIZE = 8192
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 1 << 20
LMDB_MAP_SIZE = 1 << 40          # address space only; the file grows as needed
LMDB_MAX_DBS = 16
LMDB_MAX_READERS = 1024

ROOT_INO = 1
FIRST_FREE_INO = 2
MAX_GEN = (1 << 64) - 1

DB_NAMES = ("meta", "volumes", "volnames", "snapshots", "snapnames",
            "records", "born", "chunks", "packs", "orphans",
            "holds", "policies", "paths", "logs", "digests")

KIND_INODE = b"I"
KIND_DENTRY = b"D"
KIND_CHUNK = b"C"
KIND_XATTR = b"X"

SNAP_FLAG_AUTO = 1                  # taken by a schedule (policy); prunable

PATHS_GEN = b"G"
PATHS_FORWARD = b"F"
PATHS_REVERSE = b"R"

DIGEST_ALGORITHM = 1                # sum mod 2**128 of xxh3-128 per visible record, see `digest`

TAG_TOMBSTONE = b"\x00"
TAG_LIVE = b"\x01"

PACK_MAGIC = b"COWPACK1"
PACK_HEADER = struct.Struct("<8sI4x")
ENTRY_MAGIC = b"CHNK"
ENTRY_HEADER = struct.Struct("<4sI16s")

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_VOLUME = struct.Struct("<QQQQqI")     # head_gen parent_vol parent_gen next_ino created_ns flags
_SNAPSHOT = struct.Struct("<qI")       # created_ns flags
_INODE = struct.Struct("<IIIIQQqqqQ")  # mode uid gid nlink rdev size atime mtime ctime parent_ino
_CHUNK = struct.Struct("<IQIQ")        # pack_id offset length refcount
_PACK = struct.Struct("<QQ")           # live_bytes live_chunks
_LE_U64 = struct.Struct("<Q")
_POLICY = struct.Struct("<QIIIII")   # every_s keep_last keep_hourly keep_daily keep_weekly keep_monthly
_HOLD = struct.Struct("<q")          # created_ns, then the reason
_LOG_STATE = struct.Struct("<QQQQ")  # epoch next_seq start_offset start_seq


def u64(value: int) -> bytes:
    return _U64.pack(value)


def read_u64(raw: bytes, offset: int = 0) -> int:
    return _U64.unpack_from(raw, offset)[0]


def inv_gen(gen: int) -> bytes:
    return _U64.pack(MAX_GEN - gen)


def gen_from_inv(raw: bytes) -> int:
    return MAX_GEN - _U64.unpack(raw)[0]


# --- record keys -----------------------------------------------------------

def inode_key(ino: int) -> bytes:
    return _U64.pack(ino)


def dentry_key(parent_ino: int, name: bytes) -> bytes:
    return _U64.pack(parent_ino) + name + b"\x00"


def dentry_name(record_key: bytes) -> bytes:
    return record_key[8:-1]


def chunk_key(ino: int, chunk_index: int) -> bytes:
    return _U64.pack(ino) + _U64.pack(chunk_index)


def chunk_index_of(record_key: bytes) -> int:
    return _U64.unpack_from(record_key, 8)[0]


def xattr_key(ino: int, name: bytes) -> bytes:
    return _U64.pack(ino) + name + b"\x00"


def xattr_name(record_key: bytes) -> bytes:
    return record_key[8:-1]


def versioned_key(vol_id: int, kind: bytes, record_key: bytes, gen: int) -> bytes:
    return _U64.pack(vol_id) + kind + record_key + inv_gen(gen)


def record_prefix(vol_id: int, kind: bytes, record_key: bytes = b"") -> bytes:
    return _U64.pack(vol_id) + kind + record_key


def split_versioned_key(raw: bytes) -> tuple[int, bytes, bytes, int]:
    """(vol_id, kind, record_key, gen) of a ``records`` key."""
    return (_U64.unpack_from(raw, 0)[0], raw[8:9], raw[9:-8], gen_from_inv(raw[-8:]))


def born_key(vol_id: int, gen: int, kind: bytes, record_key: bytes) -> bytes:
    return _U64.pack(vol_id) + _U64.pack(gen) + kind + record_key


def split_born_key(raw: bytes) -> tuple[int, int, bytes, bytes]:
    return (_U64.unpack_from(raw, 0)[0], _U64.unpack_from(raw, 8)[0], raw[16:17], raw[17:])


def born_range(vol_id: int, lo_gen: int, hi_gen: int) -> tuple[bytes, bytes]:
    """[start, end) of the ``born`` keys of versions born in (lo_gen, hi_gen]."""
    return _U64.pack(vol_id) + _U64.pack(lo_gen + 1), _U64.pack(vol_id) + _U64.pack(hi_gen + 1)


def vol_prefix(vol_id: int) -> bytes:
    """Every key of one volume in the sub-databases keyed by vol_id first."""
    return _U64.pack(vol_id)


def split_vol_gen_key(raw: bytes) -> tuple[int, int]:
    """(vol_id, gen) of a ``snapshots`` or ``holds`` key; (vol_id, ino) of an ``orphans`` key."""
    return _U64.unpack_from(raw, 0)[0], _U64.unpack_from(raw, 8)[0]


def split_snapname_key(raw: bytes) -> tuple[int, str]:
    return _U64.unpack_from(raw, 0)[0], bytes(raw[8:]).decode(errors="replace")


def orphan_key(vol_id: int, ino: int) -> bytes:
    return _U64.pack(vol_id) + _U64.pack(ino)


def snapshot_key(vol_id: int, gen: int) -> bytes:
    return _U64.pack(vol_id) + _U64.pack(gen)


def snapname_key(vol_id: int, name: str) -> bytes:
    return _U64.pack(vol_id) + name.encode()


def pack_key(pack_id: int) -> bytes:
    return _U32.pack(pack_id)


def hold_key(vol_id: int, gen: int) -> bytes:
    return _U64.pack(vol_id) + _U64.pack(gen)


def policy_key(vol_id: int) -> bytes:
    return _U64.pack(vol_id)


def log_state_key(vol_id: int) -> bytes:
    return _U64.pack(vol_id)


def log_fence_key(vol_id: int, ino: int) -> bytes:
    return _U64.pack(vol_id) + _U64.pack(ino)


def log_prefix(vol_id: int) -> bytes:
    """Every ``logs`` key of a volume (its state and its fences) starts so."""
    return _U64.pack(vol_id)


def is_log_fence_key(raw: bytes) -> bool:
    return len(raw) == 16


def paths_gen_key(vol_id: int) -> bytes:
    return _U64.pack(vol_id) + PATHS_GEN


def paths_forward_key(vol_id: int, parent_ino: int, name: bytes) -> bytes:
    return _U64.pack(vol_id) + PATHS_FORWARD + dentry_key(parent_ino, name)


def paths_reverse_key(vol_id: int, ino: int, parent_ino: int, name: bytes) -> bytes:
    return _U64.pack(vol_id) + PATHS_REVERSE + _U64.pack(ino) + dentry_key(parent_ino, name)


def paths_reverse_prefix(vol_id: int, ino: int) -> bytes:
    return _U64.pack(vol_id) + PATHS_REVERSE + _U64.pack(ino)


def digest_key(vol_id: int, gen: int) -> bytes:
    return _U64.pack(vol_id) + _U64.pack(gen)


def split_paths_reverse_key(raw: bytes) -> tuple[int, bytes]:
    """(parent_ino, name) of a ``paths`` reverse key."""
    return _U64.unpack_from(raw, 17)[0], raw[25:-1]


# --- values ------------------------------------------------------------------

def pack_volume(head_gen: int, parent_vol_id: int, parent_gen: int, next_ino: int,
                created_ns: int, name: str, flags: int = 0) -> bytes:
    """VolumeRecord. parent_vol_id 0 = no parent (the volume started empty)."""
    return _VOLUME.pack(head_gen, parent_vol_id, parent_gen, next_ino, created_ns, flags) + name.encode()


def unpack_volume(raw: bytes) -> dict:
    head_gen, parent_vol_id, parent_gen, next_ino, created_ns, flags = _VOLUME.unpack_from(raw)
    return dict(head_gen=head_gen, parent_vol_id=parent_vol_id, parent_gen=parent_gen,
                next_ino=next_ino, created_ns=created_ns, flags=flags,
                name=bytes(raw[_VOLUME.size:]).decode())


def pack_snapshot(created_ns: int, name: str, flags: int = 0, orphans=()) -> bytes:
    # Names never hold a NUL (volumes.check_name), so it can mark where the
    # orphan list starts; records written before the list existed have none.
    tail = b"\0" + b"".join(_U64.pack(ino) for ino in orphans) if orphans else b""
    return _SNAPSHOT.pack(created_ns, flags) + name.encode() + tail


def unpack_snapshot(raw: bytes) -> dict:
    created_ns, flags = _SNAPSHOT.unpack_from(raw)
    name, _, tail = bytes(raw[_SNAPSHOT.size:]).partition(b"\0")
    orphans = [_U64.unpack_from(tail, at)[0] for at in range(0, len(tail), 8)]
    return dict(created_ns=created_ns, flags=flags, name=name.decode(), orphans=orphans)


POLICY_FIELDS = ("every_s", "keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly")


def pack_policy(policy: dict) -> bytes:
    """PolicyRecord; keep_* of 0 means the rule is not used."""
    return _POLICY.pack(*(policy[f] for f in POLICY_FIELDS))


def unpack_policy(raw: bytes) -> dict:
    return dict(zip(POLICY_FIELDS, _POLICY.unpack_from(raw)))


def pack_hold(created_ns: int, reason: str) -> bytes:
    return _HOLD.pack(created_ns) + reason.encode()


def unpack_hold(raw: bytes) -> dict:
    return dict(created_ns=_HOLD.unpack_from(raw)[0], reason=bytes(raw[_HOLD.size:]).decode())


INODE_FIELDS = ("mode", "uid", "gid", "nlink", "rdev", "size",
                "atime_ns", "mtime_ns", "ctime_ns", "parent_ino")


def pack_inode(attrs: dict, symlink_target: bytes = b"") -> bytes:
    """Inode attributes; a symlink's target follows the fixed part.

    parent_ino is meaningful for directories only (they have exactly one
    parent); it is what lets rename refuse to move a directory into itself.
    """
    return _INODE.pack(*(attrs[f] for f in INODE_FIELDS)) + symlink_target


def unpack_inode(raw: bytes) -> tuple[dict, bytes]:
    attrs = dict(zip(INODE_FIELDS, _INODE.unpack_from(raw)))
    return attrs, bytes(raw[_INODE.size:])


def pack_chunk(pack_id: int, offset: int, length: int, refcount: int) -> bytes:
    return _CHUNK.pack(pack_id, offset, length, refcount)


def unpack_chunk(raw: bytes) -> tuple[int, int, int, int]:
    return _CHUNK.unpack(raw)


def pack_pack_stats(live_bytes: int, live_chunks: int) -> bytes:
    return _PACK.pack(live_bytes, live_chunks)


def unpack_pack_stats(raw: bytes) -> tuple[int, int]:
    return _PACK.unpack(raw)


def pack_log_state(epoch: int, next_seq: int, start_offset: int, start_seq: int) -> bytes:
    return _LOG_STATE.pack(epoch, next_seq, start_offset, start_seq)


def unpack_log_state(raw: bytes) -> tuple[int, int, int, int]:
    return _LOG_STATE.unpack(raw)


def pack_le_u64(value: int) -> bytes:
    return _LE_U64.pack(value)


def unpack_le_u64(raw: bytes) -> int:
    return _LE_U64.unpack(raw)[0]


# --- environment ---------------------------------------------------------------

class Env:
    """An open LMDB environment with its named sub-databases as attributes."""

    def __init__(self, path: str, readonly: bool = False, create: bool = False,
                 metasync: bool = True):
        """`metasync` False is for the mount daemon only.

        With it on, every commit is durable when it returns, which makes the
        LMDB commit the commit point (rule 2): what every command outside the
        daemon relies on. The daemon turns it off (MDB_NOMETASYNC: each commit
        still fdatasyncs its data pages, only the meta page waits, so a power
        loss can undo the last unsynced commits but never expose half of one)
        and syncs the environment in every path that acknowledges durability
        (`Filesystem.sync_all`, `Filesystem.snapshot`).
        """
        self.lmdb = lmdb.open(path, map_size=LMDB_MAP_SIZE, max_dbs=LMDB_MAX_DBS,
                              max_readers=LMDB_MAX_READERS, subdir=True, create=create,
                              readonly=readonly, lock=True, sync=True, metasync=metasync,
                              readahead=False, meminit=False)
        self.dbs = {name: self.lmdb.open_db(name.encode(), create=not readonly)
                    for name in DB_NAMES}
        for name, handle in self.dbs.items():
            setattr(self, name, handle)

    def begin(self, write: bool = False) -> lmdb.Transaction:
        return self.lmdb.begin(write=write)

    def close(self) -> None:
        self.lmdb.close()
