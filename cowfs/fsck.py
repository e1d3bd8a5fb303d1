"""Consistency check of a whole store, in one LMDB read transaction.

Each check appends one line per problem; `check` returns the list, empty
when the store is consistent. Every check has a test that breaks exactly
what it checks (tests/test_fsck.py). Safe while volumes are mounted: it
sees the last committed state, which is consistent by construction.
"""

import collections
import stat

import lmdb

from . import catalog, digest, intent_log, log_replay, schema, snapshots
from .errors import StoreError
from .store import Store


class Report:
    def __init__(self):
        self.problems: list[str] = []
        self.counts = collections.Counter()
        self.damaged_chunks: set[bytes] = set()     # missing or wrong bytes

    def add(self, problem: str) -> None:
        self.problems.append(problem)


def check(store: Store, verify_data: bool = False, progress=None) -> Report:
    """`progress(done_bytes, total_bytes)` is called while --verify-data reads chunks."""
    report = Report()
    env = store.env
    with env.begin() as txn:
        vols = _check_volumes(txn, env, report)
        refs = _check_records(txn, env, vols, report)
        _check_born_log(txn, env, report)
        _check_chunks(txn, store, refs, verify_data, report, progress if verify_data else None)
        _name_damaged_users(txn, env, report)
        _check_snapshots(txn, env, vols, report)
        _check_holds_and_policies(txn, env, vols, report)
        _check_log_states(txn, env, vols, report)
        _check_digests(txn, env, verify_data, report)
        for vol_id, record in vols.items():
            try:
                _check_tree(txn, env, vol_id, record, report)
            except StoreError:
                pass        # broken clone chain, reported by _check_volumes
    return report


# --- volumes ------------------------------------------------------------------------------

def _check_volumes(txn, env, report: Report) -> dict[int, dict]:
    vols = {}
    for key, raw in txn.cursor(db=env.volumes):
        vols[schema.read_u64(bytes(key))] = schema.unpack_volume(bytes(raw))
    for name, raw in txn.cursor(db=env.volnames):
        vol_id = schema.read_u64(bytes(raw))
        if vol_id not in vols:
            report.add(f"volume name {bytes(name).decode()!r} points at missing volume id {vol_id}")
        elif vols[vol_id]["name"] != bytes(name).decode():
            report.add(f"volume name {bytes(name).decode()!r} points at volume id {vol_id}, "
                       f"which is named {vols[vol_id]['name']!r}")
    for vol_id, record in vols.items():
        _check_chain(vols, vol_id, record, report)
    report.counts["volumes"] = len(vols)
    return vols


def _check_chain(vols: dict, vol_id: int, record: dict, report: Report) -> None:
    seen = {vol_id}
    child, parent_id = record, record["parent_vol_id"]
    while parent_id:
        parent = vols.get(parent_id)
        if parent is None:
            report.add(f"volume {record['name']}: clone chain names missing volume id {parent_id}")
            return
        if child["parent_gen"] > parent["head_gen"]:
            report.add(f"volume {child['name']}: parent generation {child['parent_gen']} is newer "
                       f"than the head {parent['head_gen']} of volume {parent['name']}")
        if parent_id in seen:
            report.add(f"volume {record['name']}: clone chain has a cycle through {parent['name']}")
            return
        seen.add(parent_id)
        child, parent_id = parent, parent["parent_vol_id"]


def _check_snapshots(txn, env, vols: dict, report: Report) -> None:
    for key, raw in txn.cursor(db=env.snapshots):
        vol_id, gen = schema.split_vol_gen_key(bytes(key))
        vol = vols.get(vol_id)
        if vol is None:
            report.add(f"snapshot at generation {gen} belongs to missing volume id {vol_id}")
        elif gen >= vol["head_gen"]:
            report.add(f"volume {vol['name']}: snapshot generation {gen} is not older than the head")
    for key, raw in txn.cursor(db=env.snapnames):
        vol_id, name = schema.split_snapname_key(bytes(key))
        if txn.get(schema.snapshot_key(vol_id, schema.read_u64(bytes(raw))), db=env.snapshots) is None:
            report.add(f"snapshot name {name!r} of volume id {vol_id} points at no snapshot")


def _check_holds_and_policies(txn, env, vols: dict, report: Report) -> None:
    """A hold must name a snapshot, a policy a volume: else destroy and pruning misjudge them."""
    for key, _raw in txn.cursor(db=env.holds):
        vol_id, gen = schema.split_vol_gen_key(bytes(key))
        if txn.get(schema.snapshot_key(vol_id, gen), db=env.snapshots) is None:
            report.add(f"hold on generation {gen} of volume id {vol_id} names no snapshot")
    for key, _raw in txn.cursor(db=env.policies):
        vol_id = schema.read_u64(bytes(key))
        if vol_id not in vols:
            report.add(f"snapshot policy of missing volume id {vol_id}")


def _check_log_states(txn, env, vols: dict, report: Report) -> None:
    """An intent-log state or fence must belong to a volume, and a state must
    point where replay can start (else a replay would read from nowhere)."""
    for key, raw in txn.cursor(db=env.logs):
        key = bytes(key)
        vol_id = schema.read_u64(key)
        if vol_id not in vols:
            report.add(f"intent-log {'fence' if schema.is_log_fence_key(key) else 'state'} "
                       f"of missing volume id {vol_id}")
        elif not schema.is_log_fence_key(key):
            state = intent_log.LogState.unpack(bytes(raw))
            if (state.start_offset < intent_log.DATA_START or state.start_offset % intent_log.BLOCK
                    or state.start_seq > state.next_seq):
                report.add(f"volume {vols[vol_id]['name']}: intent-log state is impossible ({state})")


def _check_digests(txn, env, recompute: bool, report: Report) -> None:
    """A cached content digest names an existing snapshot; with --verify-data it is recomputed
    from the records, trusting no cached value (each volume's history is walked once)."""
    fresh: dict = {}
    for key, _raw in txn.cursor(db=env.digests):
        vol_id, gen = schema.read_u64(bytes(key)), schema.read_u64(bytes(key), 8)
        if txn.get(schema.snapshot_key(vol_id, gen), db=env.snapshots) is None:
            report.add(f"cached content digest of generation {gen} of volume id {vol_id} names no snapshot")
            continue
        report.counts["cached digests"] += 1
        if recompute:
            expected = digest.point_digest(txn, env, vol_id, gen, fresh, use_cache=False)
            if digest.cached(txn, env, vol_id, gen) != expected:
                report.add(f"cached content digest of generation {gen} of volume id {vol_id} is wrong "
                           f"(the records give {digest.to_hex(expected)}); delete it and it is computed again")


# --- records ------------------------------------------------------------------------------

def _check_records(txn, env, vols: dict, report: Report) -> collections.Counter:
    """Count chunk references per chunk id over every record version."""
    refs = collections.Counter()
    max_ino = collections.Counter()
    for vol_id, kind, record_key, gen, raw in catalog.iter_all_versions(txn, env):
        report.counts["record versions"] += 1
        vol = vols.get(vol_id)
        if vol is None:
            report.add(f"record {kind.decode()}:{record_key.hex()} belongs to missing volume id {vol_id}")
            continue
        if gen > vol["head_gen"]:
            report.add(f"volume {vol['name']}: record {kind.decode()}:{record_key.hex()} has generation "
                       f"{gen}, newer than the head {vol['head_gen']}")
        if kind not in (schema.KIND_INODE, schema.KIND_DENTRY, schema.KIND_CHUNK, schema.KIND_XATTR):
            report.add(f"volume {vol['name']}: record of unknown kind {kind!r}")
            continue
        if kind in (schema.KIND_INODE, schema.KIND_CHUNK):
            max_ino[vol_id] = max(max_ino[vol_id], schema.read_u64(record_key))
        if kind == schema.KIND_CHUNK and raw[:1] == schema.TAG_LIVE:
            if len(raw) != 17:
                report.add(f"volume {vol['name']}: chunk record of inode "
                           f"{schema.read_u64(record_key)} has a malformed value")
                continue
            refs[bytes(raw[1:])] += 1
    for vol_id, highest in max_ino.items():
        if vol_id in vols and vols[vol_id]["next_ino"] <= highest:
            report.add(f"volume {vols[vol_id]['name']}: inode allocator {vols[vol_id]['next_ino']} "
                       f"would reuse inode {highest}")
    return refs


def _check_born_log(txn, env, report: Report) -> None:
    """Every record version is in the change log of its generation, and only those."""
    for vol_id, kind, record_key, gen, _ in catalog.iter_all_versions(txn, env):
        if txn.get(schema.born_key(vol_id, gen, kind, record_key), db=env.born) is None:
            report.add(f"change log misses record {kind.decode()}:{record_key.hex()} "
                       f"of volume id {vol_id} at generation {gen}")
    for key, _ in txn.cursor(db=env.born):
        vol_id, gen, kind, record_key = schema.split_born_key(bytes(key))
        if txn.get(schema.versioned_key(vol_id, kind, record_key, gen), db=env.records) is None:
            report.add(f"change log names missing record {kind.decode()}:{record_key.hex()} "
                       f"of volume id {vol_id} at generation {gen}")


# --- chunks and packs -------------------------------------------------------------------

def _check_chunks(txn, store: Store, refs: collections.Counter, verify_data: bool,
                  report: Report, progress=None) -> None:
    env = store.env
    pack_sizes: dict[int, int] = {}
    live = collections.defaultdict(lambda: [0, 0])
    total_bytes = sum(schema.unpack_pack_stats(bytes(raw))[0] for _k, raw in txn.cursor(db=env.packs)) \
        if progress else 0
    done_bytes = 0
    for key, raw in txn.cursor(db=env.chunks):
        chunk_id = bytes(key)
        pack_id, offset, length, refcount = schema.unpack_chunk(bytes(raw))
        report.counts["chunks"] += 1
        live[pack_id][0] += length
        live[pack_id][1] += 1
        if refcount != refs.get(chunk_id, 0):
            report.add(f"chunk {chunk_id.hex()}: reference count {refcount}, "
                       f"but {refs.get(chunk_id, 0)} record versions refer to it")
        _check_location(store, pack_sizes, chunk_id, pack_id, offset, length, verify_data, report)
        if progress:
            done_bytes += length
            progress(done_bytes, max(total_bytes, done_bytes))
    for chunk_id, count in refs.items():
        if txn.get(chunk_id, db=env.chunks) is None:
            report.add(f"chunk {chunk_id.hex()}: {count} record versions refer to it, "
                       "but it is not in the chunk index")
    for key, raw in txn.cursor(db=env.packs):
        pack_id = int.from_bytes(bytes(key), "big")
        live_bytes, live_chunks = schema.unpack_pack_stats(bytes(raw))
        if [live_bytes, live_chunks] != live.get(pack_id, [0, 0]):
            report.add(f"pack {pack_id:08x}: statistics say {live_chunks} live chunks / {live_bytes} bytes, "
                       f"the index holds {live[pack_id][1]} / {live[pack_id][0]}")


def _check_location(store, pack_sizes, chunk_id, pack_id, offset, length, verify_data, report) -> None:
    if pack_id not in pack_sizes:
        try:
            pack_sizes[pack_id] = store.packs.size(pack_id)
        except OSError:
            pack_sizes[pack_id] = -1
            report.add(f"pack {pack_id:08x} is missing ({store.packs.path(pack_id)})")
    if pack_sizes[pack_id] < 0:
        report.damaged_chunks.add(chunk_id)
        return
    header_at = offset - schema.ENTRY_HEADER.size
    if header_at < schema.PACK_HEADER.size or offset + length > pack_sizes[pack_id]:
        report.add(f"chunk {chunk_id.hex()}: bytes {offset}..{offset + length} lie outside "
                   f"pack {pack_id:08x} ({pack_sizes[pack_id]} bytes)")
        report.damaged_chunks.add(chunk_id)
        return
    try:
        header = store.packs.read(pack_id, header_at, schema.ENTRY_HEADER.size)
        data = store.packs.read(pack_id, offset, length) if verify_data else None
    except OSError as exc:
        report.add(f"chunk {chunk_id.hex()}: reading pack {pack_id:08x} failed: {exc}")
        report.damaged_chunks.add(chunk_id)
        return
    magic, stored_len, stored_id = schema.ENTRY_HEADER.unpack(header)
    if magic != schema.ENTRY_MAGIC or stored_len != length or stored_id != chunk_id:
        report.add(f"chunk {chunk_id.hex()}: pack {pack_id:08x} holds a different entry at offset {header_at}")
        report.damaged_chunks.add(chunk_id)
        return
    if verify_data:
        from .chunks import chunk_id_of
        if chunk_id_of(data) != chunk_id:
            report.add(f"chunk {chunk_id.hex()}: bytes in pack {pack_id:08x} do not match the checksum")
            report.damaged_chunks.add(chunk_id)


def _name_damaged_users(txn, env, report: Report) -> None:
    """Which file of which volume (head or snapshot) reads each damaged chunk."""
    if not report.damaged_chunks:
        return
    names = {schema.read_u64(bytes(v)): bytes(k).decode(errors="replace")
             for k, v in txn.cursor(db=env.volnames)}
    cs = _chunk_size(txn, env)
    for vol_id, kind, record_key, gen, raw in catalog.iter_all_versions(txn, env):
        if kind == schema.KIND_CHUNK and raw[:1] == schema.TAG_LIVE and bytes(raw[1:]) in report.damaged_chunks:
            offset = schema.chunk_index_of(record_key) * cs
            report.add(f"volume {names.get(vol_id, vol_id)}: inode {schema.read_u64(record_key)} "
                       f"reads damaged chunk {bytes(raw[1:]).hex()} at file offset {offset} "
                       f"(record generation {gen}); reading those bytes gives EIO")


# --- directory tree ---------------------------------------------------------------------

def _check_tree(txn, env, vol_id: int, record: dict, report: Report) -> None:
    """The head of a volume: a tree from the root, link counts right, nothing leaked."""
    name = record["name"]
    chain = catalog.volume_chain(txn, env, vol_id)
    inodes = {schema.read_u64(k): schema.unpack_inode(v)
              for k, v in catalog.scan(txn, env, chain, schema.KIND_INODE, b"")}
    if schema.ROOT_INO not in inodes:
        report.add(f"volume {name}: root directory is missing")
        return
    links = collections.Counter()
    subdirs = collections.Counter()
    seen_dirs = {schema.ROOT_INO}
    todo = [schema.ROOT_INO]
    while todo:
        dir_ino = todo.pop()
        for key, raw in catalog.scan(txn, env, chain, schema.KIND_DENTRY, schema.inode_key(dir_ino)):
            entry = schema.dentry_name(key).decode(errors="replace")
            child = schema.read_u64(raw)
            if child not in inodes:
                report.add(f"volume {name}: entry {entry!r} in directory {dir_ino} points at missing inode {child}")
                continue
            links[child] += 1
            attrs = inodes[child][0]
            if stat.S_ISDIR(attrs["mode"]):
                subdirs[dir_ino] += 1
                if child in seen_dirs:
                    report.add(f"volume {name}: directory {child} is linked more than once")
                    continue
                if attrs["parent_ino"] != dir_ino:
                    report.add(f"volume {name}: directory {child} records parent {attrs['parent_ino']}, "
                               f"but is listed in {dir_ino}")
                seen_dirs.add(child)
                todo.append(child)
    orphans = set(snapshots.orphans_of(txn, env, vol_id))
    for ino, (attrs, target) in inodes.items():
        _check_inode(txn, env, chain, name, ino, attrs, target, links, subdirs, orphans, report)


def _check_inode(txn, env, chain, name, ino, attrs, target, links, subdirs, orphans, report) -> None:
    if stat.S_ISDIR(attrs["mode"]):
        expected = 2 + subdirs[ino] if (links[ino] or ino == schema.ROOT_INO) else 0
    else:
        expected = links[ino]
    if expected == 0 and ino != schema.ROOT_INO:
        if ino not in orphans:
            report.add(f"volume {name}: inode {ino} is not reachable from the root (leaked)")
        elif attrs["nlink"] != 0:
            report.add(f"volume {name}: orphan inode {ino} has link count {attrs['nlink']}")
        return
    if attrs["nlink"] != expected:
        report.add(f"volume {name}: inode {ino} has link count {attrs['nlink']}, expected {expected}")
    if stat.S_ISLNK(attrs["mode"]) and attrs["size"] != len(target):
        report.add(f"volume {name}: symlink {ino} has size {attrs['size']} but a {len(target)}-byte target")
    if stat.S_ISREG(attrs["mode"]):
        cs = _chunk_size(txn, env)
        last_index = (attrs["size"] - 1) // cs if attrs["size"] else -1
        beyond = catalog.scan(txn, env, chain, schema.KIND_CHUNK, schema.inode_key(ino),
                              start_key=schema.chunk_key(ino, last_index + 1))
        if beyond:
            report.add(f"volume {name}: inode {ino} has {len(beyond)} chunks beyond its size "
                       f"{attrs['size']}")


def _chunk_size(txn, env) -> int:
    return schema.unpack_le_u64(txn.get(b"chunk_size", db=env.meta))


def run(store_path: str, verify_data: bool = False, progress=None) -> Report:
    store = Store.open(store_path)
    try:
        # Like e2fsck replaying a journal: an unmounted volume's log after a
        # crash holds acknowledged writes the check must see.
        log_replay.replay_unmounted(store)
        return check(store, verify_data, progress)
    except lmdb.Error as exc:
        # LMDB has no page checksums: a damaged page shows up as an error
        # (or a wrong value) only when it is read.
        raise StoreError(f"metadata of store {store.path} is damaged ({exc}); "
                         "restore meta/ from a copy") from exc
    finally:
        store.close()

