"""Volumes: names, creation, records.

A volume is a mountable tree: a head generation plus (for clones) a parent
``(vol_id, gen)`` to fall through to. Creating an empty volume writes its
record, its name and a root directory inode in one transaction.
"""

import os
import re
import stat
import time

from . import catalog, schema
from .errors import NotFoundError, UsageError

NAME_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")
FIRST_GEN = 1


def check_name(name: str, what: str = "volume") -> str:
    """Names: letters, digits, '-', '_', '.', at most 128, not starting with '.'."""
    if not NAME_RE.fullmatch(name or ""):
        shown = repr(name if len(name) <= 40 else name[:40] + "...")
        raise UsageError(f"invalid {what} name {shown}: use letters, digits, '-', '_', '.', "
                         "at most 128 characters, not starting with '.'")
    return name


def volume_id(txn, env, name: str) -> int:
    # Every name a user typed meets the catalog here: refuse malformed ones
    # first (an empty key would even be an LMDB error, not a lookup miss).
    check_name(name)
    raw = txn.get(name.encode(), db=env.volnames)
    if raw is None:
        raise NotFoundError(f"no volume named {name!r}; 'cowfs list STORE' shows the volumes")
    return schema.read_u64(raw)


def volume_record(txn, env, vol_id: int) -> dict:
    return schema.unpack_volume(txn.get(schema.u64(vol_id), db=env.volumes))


def put_volume_record(txn, env, vol_id: int, record: dict) -> None:
    txn.put(schema.u64(vol_id), schema.pack_volume(
        record["head_gen"], record["parent_vol_id"], record["parent_gen"], record["next_ino"],
        record["created_ns"], record["name"], record["flags"]), db=env.volumes)


def allocate_vol_id(txn, env) -> int:
    vol_id = schema.unpack_le_u64(txn.get(b"next_vol_id", db=env.meta))
    txn.put(b"next_vol_id", schema.pack_le_u64(vol_id + 1), db=env.meta)
    return vol_id


def root_attrs(now_ns: int) -> dict:
    return dict(mode=stat.S_IFDIR | 0o755, uid=os.getuid(), gid=os.getgid(), nlink=2, rdev=0,
                size=0, atime_ns=now_ns, mtime_ns=now_ns, ctime_ns=now_ns,
                parent_ino=schema.ROOT_INO)


def create_empty(txn, env, name: str) -> int:
    """A new volume holding an empty root directory; returns its id."""
    check_name(name)
    if txn.get(name.encode(), db=env.volnames) is not None:
        raise UsageError(f"volume {name!r} already exists")
    vol_id = allocate_vol_id(txn, env)
    now_ns = time.time_ns()
    put_volume_record(txn, env, vol_id, dict(
        head_gen=FIRST_GEN, parent_vol_id=0, parent_gen=0, next_ino=schema.FIRST_FREE_INO,
        created_ns=now_ns, name=name, flags=0))
    txn.put(name.encode(), schema.u64(vol_id), db=env.volnames)
    chain = catalog.volume_chain(txn, env, vol_id)
    catalog.put(txn, env, chain, schema.KIND_INODE, schema.inode_key(schema.ROOT_INO),
                schema.pack_inode(root_attrs(now_ns)))
    return vol_id


def allocate_ino(txn, env, vol_id: int) -> int:
    record = volume_record(txn, env, vol_id)
    ino = record["next_ino"]
    record["next_ino"] = ino + 1
    put_volume_record(txn, env, vol_id, record)
    return ino


def list_volumes(txn, env) -> list[tuple[str, int]]:
    return [(bytes(k).decode(), schema.read_u64(v)) for k, v in txn.cursor(db=env.volnames)]
