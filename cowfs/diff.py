"""What changed between two points of one volume, in O(changes).

The ``born`` log lists, per generation, the record keys written at that
generation. Every key whose visible value differs between points A < B has a
version born in (A, B] that B still sees (the newest one, which snapshot
destruction never frees), so walking born over (A, B] finds all candidates;
comparing each candidate's value as of A and as of B drops the ones that
changed back. Cost: O(records born in between x chain depth), independent
of the volume size.

Naming what changed needs inode -> path. Directories store their parent, files
do not, and a file whose data changed in place has no changed directory
entry. The ``paths`` sub-database is a reverse index (ino -> its names) of
the volume head, kept current by replaying the born log of directory entries
since it was last refreshed: O(changes) too, except the first time (one
scan of the directory entries). A name taken from the index is verified
against the catalog as of the point being named. If that fails (renamed or
removed after that point), a directory is looked up in its parent (its
inode names it), and only a file falls back to scanning every directory
entry as of that point, once per diff; ``stats.full_scans`` says so.
"""

import collections
import stat
from dataclasses import dataclass
from typing import Optional

from . import catalog, schema, snapshots, volumes
from .errors import UsageError

FILE_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
              stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "chardev",
              stat.S_IFBLK: "blockdev"}


@dataclass(frozen=True)
class Point:
    vol_id: int
    vol_name: str
    gen: int
    label: str
    is_head: bool


def resolve_point(txn, env, text: str) -> Point:
    vol, snap = snapshots.parse_target(text)
    vol_id = volumes.volume_id(txn, env, vol)
    if snap is None:
        gen = volumes.volume_record(txn, env, vol_id)["head_gen"]
        return Point(vol_id, vol, gen, vol, True)
    gen = snapshots.snapshot_gen(txn, env, vol_id, vol, snap)
    return Point(vol_id, vol, gen, f"{vol}@{snap}", False)


def check_same_volume(a: Point, b: Point) -> None:
    if a.vol_id != b.vol_id:
        raise UsageError(f"diff compares two points of one volume; {a.label} and {b.label} belong "
                         f"to different volumes (compare a clone with the snapshot it came from "
                         f"by diffing the snapshots of each volume)")


# --- reverse path index --------------------------------------------------------------------------

def index_is_stale(txn, env, vol_id: int) -> bool:
    """Could the head have changed since the index was refreshed?"""
    raw = txn.get(schema.paths_gen_key(vol_id), db=env.paths)
    if raw is None:
        return True
    indexed_gen = schema.read_u64(raw)
    head_gen = volumes.volume_record(txn, env, vol_id)["head_gen"]
    # Indexed up to head - 1: only the open head generation may have changed.
    return indexed_gen + 1 < head_gen or bool(changed_keys_exist(txn, env, vol_id, indexed_gen, head_gen))


def changed_keys_exist(txn, env, vol_id: int, lo_gen: int, hi_gen: int) -> bool:
    cursor = txn.cursor(db=env.born)
    start, end = schema.born_range(vol_id, lo_gen, hi_gen)
    return cursor.set_range(start) and bytes(cursor.key()) < end


INDEX_BATCH_ENTRIES = 10_000    # per write transaction: a mounted volume's commits wait at most one batch


def refresh_index(env, vol_id: int) -> dict:
    """Bring the ``paths`` index of a volume head up to date.

    What to write is worked out in one read transaction, then written in
    bounded write transactions, so that the daemon of a mounted volume never
    waits long for the LMDB writer lock (its fsyncs commit through it). The
    index generation is recorded last: a refresh cut short is redone from
    the old generation, and re-applying an update is harmless.
    """
    with env.begin() as txn:
        head_gen = volumes.volume_record(txn, env, vol_id)["head_gen"]
        chain = catalog.volume_chain(txn, env, vol_id)
        raw = txn.get(schema.paths_gen_key(vol_id), db=env.paths)
        if raw is None:
            updates = [(key, schema.read_u64(payload))
                       for key, payload in catalog.scan(txn, env, chain, schema.KIND_DENTRY, b"")]
        else:
            updates = _replay_updates(txn, env, vol_id, chain, schema.read_u64(raw), head_gen)
    if raw is None:
        _clear_index(env, vol_id)
    for start in range(0, len(updates), INDEX_BATCH_ENTRIES):
        with env.begin(write=True) as txn:
            for record_key, ino in updates[start:start + INDEX_BATCH_ENTRIES]:
                _index_update(txn, env, vol_id, record_key, ino)
    with env.begin(write=True) as txn:
        # The head generation stays open for writes: record the one before,
        # so the next refresh replays the head generation again.
        txn.put(schema.paths_gen_key(vol_id), schema.u64(head_gen - 1), db=env.paths)
    built = raw is None
    return dict(index_built=len(updates) if built else 0, index_replayed=0 if built else len(updates))


def _replay_updates(txn, env, vol_id: int, chain, from_gen: int, to_gen: int) -> list:
    """(dentry key, ino or None) for the directory entries born in (from_gen, to_gen]."""
    updates = []
    for record_key in snapshots.changed_keys(txn, env, vol_id, from_gen, to_gen)[schema.KIND_DENTRY]:
        payload = catalog.get(txn, env, chain, schema.KIND_DENTRY, record_key)
        updates.append((record_key, None if payload is None else schema.read_u64(payload)))
    return updates


def _clear_index(env, vol_id: int) -> None:
    prefix = schema.vol_prefix(vol_id)
    while True:
        with env.begin(write=True) as txn:
            cursor = txn.cursor(db=env.paths)
            if not cursor.set_range(prefix):
                return
            for _ in range(INDEX_BATCH_ENTRIES):
                if not bytes(cursor.key()).startswith(prefix):
                    return
                if not cursor.delete():
                    return


def _index_update(txn, env, vol_id: int, record_key: bytes, ino) -> None:
    parent_ino, name = schema.read_u64(record_key), schema.dentry_name(record_key)
    forward = schema.paths_forward_key(vol_id, parent_ino, name)
    old = txn.get(forward, db=env.paths)
    if old is not None:
        txn.delete(forward, db=env.paths)
        txn.delete(schema.paths_reverse_key(vol_id, schema.read_u64(old), parent_ino, name), db=env.paths)
    if ino is not None:
        txn.put(forward, schema.u64(ino), db=env.paths)
        txn.put(schema.paths_reverse_key(vol_id, ino, parent_ino, name), b"", db=env.paths)


def _indexed_names(txn, env, vol_id: int, ino: int) -> list[tuple[int, bytes]]:
    prefix = schema.paths_reverse_prefix(vol_id, ino)
    cursor = txn.cursor(db=env.paths)
    out = []
    if cursor.set_range(prefix):
        for key, _ in cursor:
            if not bytes(key).startswith(prefix):
                break
            out.append(schema.split_paths_reverse_key(bytes(key)))
    return out


class PathResolver:
    """ino -> path as of one point: index hint, verified; full scan as a last resort."""

    def __init__(self, txn, env, vol_id: int, chain):
        self.txn, self.env, self.vol_id, self.chain = txn, env, vol_id, chain
        self._paths: dict[int, Optional[str]] = {schema.ROOT_INO: ""}
        self._scanned: Optional[dict[int, tuple[int, bytes]]] = None
        self.full_scans = 0

    def child(self, parent_ino: int, name: bytes) -> Optional[str]:
        parent = self.path(parent_ino)
        return None if parent is None else f"{parent}/{name.decode(errors='surrogateescape')}"

    def path(self, ino: int) -> Optional[str]:
        if ino not in self._paths:
            self._paths[ino] = None          # guards against cycles in a damaged tree
            self._paths[ino] = self._resolve(ino)
        return self._paths[ino]

    def _names_at_point(self, ino: int) -> list[tuple[int, bytes]]:
        return [(parent_ino, name) for parent_ino, name in _indexed_names(self.txn, self.env, self.vol_id, ino)
                if self._entry(parent_ino, name) == ino]

    def _entry(self, parent_ino: int, name: bytes) -> Optional[int]:
        raw = catalog.get(self.txn, self.env, self.chain, schema.KIND_DENTRY,
                          schema.dentry_key(parent_ino, name))
        return None if raw is None else schema.read_u64(raw)

    def _resolve(self, ino: int) -> Optional[str]:
        for parent_ino, name in sorted(self._names_at_point(ino)):
            found = self.child(parent_ino, name)
            if found is not None:
                return found
        entry = self._entry_in_parent_dir(ino) or self._scan().get(ino)
        return None if entry is None else self.child(*entry)

    def _entry_in_parent_dir(self, ino: int) -> Optional[tuple[int, bytes]]:
        """A directory knows its parent: look for its name there, O(that directory)."""
        raw = catalog.get(self.txn, self.env, self.chain, schema.KIND_INODE, schema.inode_key(ino))
        if raw is None:
            return None
        attrs, _ = schema.unpack_inode(raw)
        if not stat.S_ISDIR(attrs["mode"]):
            return None
        parent_ino = attrs["parent_ino"]
        for record_key, payload in catalog.scan(self.txn, self.env, self.chain, schema.KIND_DENTRY,
                                                schema.inode_key(parent_ino)):
            if schema.read_u64(payload) == ino:
                return parent_ino, schema.dentry_name(record_key)
        return None

    def _scan(self) -> dict[int, tuple[int, bytes]]:
        """Every directory entry as of the point: O(entries), used once per diff at most."""
        if self._scanned is None:
            self.full_scans += 1
            self._scanned = {}
            for record_key, payload in catalog.scan(self.txn, self.env, self.chain, schema.KIND_DENTRY, b""):
                self._scanned.setdefault(schema.read_u64(payload),
                                         (schema.read_u64(record_key), schema.dentry_name(record_key)))
        return self._scanned


# --- changed records ------------------------------------------------------------------------------

class _Side:
    """One point of the comparison: its chain, inode attributes and paths."""

    def __init__(self, txn, env, point: Point):
        self.txn, self.env = txn, env
        self.chain = catalog.volume_chain(txn, env, point.vol_id, point.gen)
        self.paths = PathResolver(txn, env, point.vol_id, self.chain)
        self._inodes: dict[int, Optional[tuple[dict, bytes]]] = {}

    def get(self, kind: bytes, record_key: bytes) -> Optional[bytes]:
        return catalog.get(self.txn, self.env, self.chain, kind, record_key)

    def inode(self, ino: int) -> Optional[tuple[dict, bytes]]:
        if ino not in self._inodes:
            raw = self.get(schema.KIND_INODE, schema.inode_key(ino))
            self._inodes[ino] = None if raw is None else schema.unpack_inode(raw)
        return self._inodes[ino]

    def type_of(self, ino: int) -> str:
        found = self.inode(ino)
        return "?" if found is None else FILE_TYPES.get(stat.S_IFMT(found[0]["mode"]), "?")


# --- comparing --------------------------------------------------------------------------------------

def compare(txn, env, a: Point, b: Point, chunk_size: int) -> dict:
    """The changes from point a to point b of one volume (either may be the newer)."""
    check_same_volume(a, b)
    side_a, side_b = _Side(txn, env, a), _Side(txn, env, b)
    keys = snapshots.changed_keys(txn, env, a.vol_id, min(a.gen, b.gen), max(a.gen, b.gen))
    dentries, content = _changed_records(keys, side_a, side_b)
    changes = _link_changes(dentries, side_a, side_b, content, chunk_size)
    renamed = {c["ino"] for c in changes if c["change"] == "renamed"}   # carry their details
    for ino in sorted(content):
        # An inode missing on one side is listed as added or removed already.
        if ino not in renamed and side_a.inode(ino) is not None and side_b.inode(ino) is not None:
            entry = _modified_entry(ino, side_a, side_b, content[ino], chunk_size)
            if entry is not None:
                changes.append(entry)
    changes.sort(key=lambda c: (c["path"], c["change"]))
    counts = collections.Counter(c["change"] for c in changes)
    stats = dict(changed_records=sum(len(v) for v in keys.values()),
                 full_scans=side_a.paths.full_scans + side_b.paths.full_scans)
    for c in changes:
        c.pop("ino")
    return dict(changes=changes, counts=dict(sorted(counts.items())), stats=stats)


def _changed_records(keys: dict, side_a: _Side, side_b: _Side):
    """Directory entries that changed, and per inode what else changed (attrs, chunks, xattrs)."""
    dentries = []
    content = collections.defaultdict(lambda: dict(attrs=False, chunks=set(), xattrs=set()))
    for record_key in keys[schema.KIND_DENTRY]:
        ino_a = side_a.get(schema.KIND_DENTRY, record_key)
        ino_b = side_b.get(schema.KIND_DENTRY, record_key)
        if ino_a != ino_b:
            dentries.append((schema.read_u64(record_key), schema.dentry_name(record_key),
                             None if ino_a is None else schema.read_u64(ino_a),
                             None if ino_b is None else schema.read_u64(ino_b)))
    for record_key in keys[schema.KIND_INODE]:
        if side_a.get(schema.KIND_INODE, record_key) != side_b.get(schema.KIND_INODE, record_key):
            content[schema.read_u64(record_key)]["attrs"] = True
    for record_key in keys[schema.KIND_CHUNK]:
        if side_a.get(schema.KIND_CHUNK, record_key) != side_b.get(schema.KIND_CHUNK, record_key):
            content[schema.read_u64(record_key)]["chunks"].add(schema.chunk_index_of(record_key))
    for record_key in keys[schema.KIND_XATTR]:
        if side_a.get(schema.KIND_XATTR, record_key) != side_b.get(schema.KIND_XATTR, record_key):
            content[schema.read_u64(record_key)]["xattrs"].add(schema.xattr_name(record_key))
    return sorted(dentries), content


def _link_changes(dentries, side_a: _Side, side_b: _Side, content, chunk_size: int) -> list[dict]:
    """Added, removed, renamed, replaced and retyped paths, from changed directory entries."""
    removed, added = collections.defaultdict(list), collections.defaultdict(list)
    for parent_ino, name, ino_a, ino_b in dentries:
        if ino_a is not None:
            removed[ino_a].append(side_a.paths.child(parent_ino, name) or f"?/{name.decode(errors='replace')}")
        if ino_b is not None:
            added[ino_b].append(side_b.paths.child(parent_ino, name) or f"?/{name.decode(errors='replace')}")
    changes = []
    for ino in sorted(set(removed) | set(added)):
        olds, news = sorted(removed.get(ino, [])), sorted(added.get(ino, []))
        if side_a.inode(ino) is not None and side_b.inode(ino) is not None:
            for old, new in zip(olds, news):
                entry = _modified_entry(ino, side_a, side_b, content.get(ino), chunk_size, always=True)
                entry.update(change="renamed", path=old, new_path=new)
                changes.append(entry)
            olds, news = olds[len(news):], news[len(olds):]
        changes += [dict(change="removed", path=p, type=side_a.type_of(ino), ino=ino, details=[]) for p in olds]
        changes += [dict(change="added", path=p, type=side_b.type_of(ino), ino=ino, details=[]) for p in news]
    return _merge_replaced(changes, side_a, side_b)


def _merge_replaced(changes: list[dict], side_a: _Side, side_b: _Side) -> list[dict]:
    """A path removed and added again names another inode: a type change or a replacement."""
    by_path = collections.defaultdict(list)
    for c in changes:
        if c["change"] in ("added", "removed"):
            by_path[c["path"]].append(c)
    for path, pair in by_path.items():
        kinds = {c["change"]: c for c in pair}
        if len(pair) != 2 or set(kinds) != {"added", "removed"}:
            continue
        old, new = kinds["removed"], kinds["added"]
        changes.remove(old)
        if old["type"] != new["type"]:
            new.update(change="type", type=new["type"], details=[f"{old['type']} -> {new['type']}"],
                       from_type=old["type"])
        else:
            new.update(change="modified", details=["replaced by another file (new inode)"])
    return changes


def _modified_entry(ino: int, side_a: _Side, side_b: _Side, what: Optional[dict], chunk_size: int,
                    always: bool = False) -> Optional[dict]:
    """A 'modified' entry with what changed, or None when nothing a user sees changed."""
    (attrs_a, target_a), (attrs_b, target_b) = side_a.inode(ino), side_b.inode(ino)
    what = what or dict(attrs=False, chunks=set(), xattrs=set())
    entry = dict(change="modified", path=side_b.paths.path(ino) or f"<inode {ino}>",
                 type=side_b.type_of(ino), ino=ino, details=[])
    details = entry["details"]
    is_dir = stat.S_ISDIR(attrs_b["mode"])
    if stat.S_IMODE(attrs_a["mode"]) != stat.S_IMODE(attrs_b["mode"]):
        details.append(f"mode {stat.S_IMODE(attrs_a['mode']):04o} -> {stat.S_IMODE(attrs_b['mode']):04o}")
        entry["mode"] = [stat.S_IMODE(attrs_a["mode"]), stat.S_IMODE(attrs_b["mode"])]
    if (attrs_a["uid"], attrs_a["gid"]) != (attrs_b["uid"], attrs_b["gid"]):
        details.append(f"owner {attrs_a['uid']}:{attrs_a['gid']} -> {attrs_b['uid']}:{attrs_b['gid']}")
    if what["xattrs"]:
        details.append("xattrs " + ", ".join(sorted(n.decode(errors="replace") for n in what["xattrs"])))
    if not is_dir:
        _content_details(entry, attrs_a, attrs_b, target_a, target_b, what["chunks"], chunk_size)
    if not details and not always:
        return None
    return entry


def _content_details(entry: dict, attrs_a, attrs_b, target_a, target_b, chunk_indexes: set,
                     chunk_size: int) -> None:
    details = entry["details"]
    if attrs_a["size"] != attrs_b["size"]:
        details.append(f"size {attrs_a['size']} -> {attrs_b['size']}")
        entry["size"] = [attrs_a["size"], attrs_b["size"]]
    if target_a != target_b:
        details.append(f"target {target_a.decode(errors='replace')} -> {target_b.decode(errors='replace')}")
    if chunk_indexes:
        ranges = changed_ranges(chunk_indexes, chunk_size, max(attrs_a["size"], attrs_b["size"]))
        entry["ranges"] = ranges
        entry["changed_bytes"] = sum(end - start for start, end in ranges)
        shown = ", ".join(f"{start}-{end - 1}" for start, end in ranges[:4])
        more = f" and {len(ranges) - 4} more ranges" if len(ranges) > 4 else ""
        details.append(f"bytes {shown}{more}")
    if not details and attrs_a["mtime_ns"] != attrs_b["mtime_ns"]:
        details.append("mtime")


def changed_ranges(chunk_indexes: set, chunk_size: int, size_bytes: int) -> list[list[int]]:
    """Sorted chunk indexes -> merged [start, end) byte ranges, clipped to the file size."""
    ranges: list[list[int]] = []
    for idx in sorted(chunk_indexes):
        start, end = idx * chunk_size, min((idx + 1) * chunk_size, size_bytes)
        if end <= start:
            end = start + chunk_size     # a chunk beyond the size: truncated away
        if ranges and ranges[-1][1] >= start:
            ranges[-1][1] = max(ranges[-1][1], end)
        else:
            ranges.append([start, end])
    return ranges
