"""Namespace operations of a mounted volume: create, link, unlink, rename,
open/release, directories, extended attributes.

Each commits at once, in one LMDB transaction (`Filesystem._change`, a
`_Change` here), and writes no chunk: visible at once and surviving a
daemon crash, durable against a power cut at the next environment sync
(rule 2). For a file whose writes are still buffered (or frozen in the
fold in flight) a change starts from its *committed* inode record and
changes only its own fields (nlink, ctime): buffered writes never block a
delete (a full disk can always unlink, rename over, link), and no commit
exposes a size ahead of the data committed with it.

`NamespaceOps` is a part of `Filesystem` (a mixin), kept apart because it
is a concern of its own; it uses the inode cache and `_change` of
`filesystem.Filesystem`.
"""

import errno
import stat
import time
from typing import Optional

from . import catalog, schema, snapshots, volumes
from .chunks import ChunkBatch
from .commit import DATA_FIELDS
from .errors import FsError
from .inode import Inode

NAME_MAX_BYTES = 255
XATTR_VALUE_MAX_BYTES = 64 * 1024
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class _Change:
    """One namespace transaction: pending attribute changes, applied after commit."""

    def __init__(self, fs, txn, batch: ChunkBatch, committing: set[int]):
        self.fs = fs
        self.txn = txn
        self.batch = batch
        self.committing = committing        # inodes whose buffers this change commits
        # ino -> (inode, attributes before, attributes to write)
        self.pending: dict[int, tuple[Inode, dict, dict]] = {}
        self.created: list[Inode] = []
        self.purged: list[Inode] = []

    def attrs(self, inode: Inode) -> dict:
        """The attribute record this change writes for `inode`, for the body
        to change; the fields it changes reach the cached inode after the
        commit.

        An inode whose buffered changes (or those frozen in the fold in
        flight) this change does not commit starts from its *committed*
        record: only the fields the body changes are written (see the module
        doc)."""
        entry = self.pending.get(inode.ino)
        if entry is None:
            if inode.ino in self.committing or not self.fs.has_uncommitted(inode):
                base = dict(inode.attrs)
            else:
                base = self.fs._committed_attrs(self.txn, inode)
            entry = self.pending[inode.ino] = (inode, base, dict(base))
        return entry[2]

    def create(self, ino: int, attrs: dict, target: bytes = b"") -> Inode:
        inode = Inode(ino, attrs, target)
        self.created.append(inode)
        self.fs._put_inode_record(self.txn, ino, attrs, target)
        return inode

    def put(self, kind: bytes, record_key: bytes, payload: bytes) -> None:
        catalog.put(self.txn, self.fs.env, self.fs.chain, kind, record_key, payload)

    def delete(self, kind: bytes, record_key: bytes) -> Optional[bytes]:
        return catalog.delete(self.txn, self.fs.env, self.fs.chain, kind, record_key)

    def purge(self, inode: Inode) -> None:
        """Delete every record of an inode (its last link and last open are gone)."""
        fs, txn = self.fs, self.txn
        ino_key = schema.inode_key(inode.ino)
        for record_key, _ in catalog.scan(txn, fs.env, fs.chain, schema.KIND_CHUNK, ino_key):
            old = self.delete(schema.KIND_CHUNK, record_key)
            if old is not None:
                self.batch.unref(old)
        for record_key, _ in catalog.scan(txn, fs.env, fs.chain, schema.KIND_XATTR, ino_key):
            self.delete(schema.KIND_XATTR, record_key)
        self.delete(schema.KIND_INODE, ino_key)
        txn.delete(schema.orphan_key(fs.vol_id, inode.ino), db=fs.env.orphans)
        txn.delete(schema.log_fence_key(fs.vol_id, inode.ino), db=fs.env.logs)
        self.purged.append(inode)

    def write_records(self) -> None:
        """The inode records of the change (the purged ones are gone)."""
        purged = {inode.ino for inode in self.purged}
        for ino, (inode, _before, attrs) in self.pending.items():
            if ino not in purged:
                self.fs._put_inode_record(self.txn, ino, attrs, inode.target)

    def apply_to_cache(self) -> None:
        """After the commit: the cached inodes take the changed fields. One
        frozen in the fold in flight is marked dirty when a data field
        changed (a directory's mtime): that fold writes its older copy."""
        for inode, before, after in self.pending.values():
            changed = [name for name, value in after.items() if before[name] != value]
            for name in changed:
                inode.attrs[name] = after[name]
            if inode.in_job and any(name in DATA_FIELDS for name in changed):
                self.fs._mark_dirty(inode)
        for inode in self.created:
            self.fs.inodes[inode.ino] = inode


class NamespaceOps:
    """The namespace half of `filesystem.Filesystem` (see the module doc)."""

    def _new_attrs(self, parent: Inode, mode: int, uid: int, gid: int, rdev: int = 0) -> dict:
        now_ns = time.time_ns()
        is_dir = stat.S_ISDIR(mode)
        if parent.attrs["mode"] & stat.S_ISGID:    # BSD group semantics of setgid dirs
            gid = parent.attrs["gid"]
            if is_dir:
                mode |= stat.S_ISGID
        return dict(mode=mode, uid=uid, gid=gid, nlink=2 if is_dir else 1, rdev=rdev, size=0,
                    atime_ns=now_ns, mtime_ns=now_ns, ctime_ns=now_ns,
                    parent_ino=parent.ino if is_dir else 0)

    def make(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int,
             rdev: int = 0, target: bytes = b"") -> Inode:
        """mknod, mkdir, create and symlink: a new inode under a new name."""
        self._check_writable()
        self._check_name(name)
        parent = self._dir(parent_ino)
        attrs = self._new_attrs(parent, mode, uid, gid, rdev)
        if target:
            attrs["size"] = len(target)
        with self._change() as ch:
            if self._child_ino(ch.txn, parent, name) is not None:
                raise FsError(errno.EEXIST, name.decode(errors="replace"))
            ino = volumes.allocate_ino(ch.txn, self.env, self.vol_id)
            inode = ch.create(ino, attrs, target)
            ch.put(schema.KIND_DENTRY, schema.dentry_key(parent.ino, name), schema.u64(ino))
            parent_attrs = ch.attrs(parent)
            if inode.is_dir:
                parent_attrs["nlink"] += 1
            parent_attrs["mtime_ns"] = parent_attrs["ctime_ns"] = attrs["ctime_ns"]
        inode.lookups += 1
        return inode

    def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Inode:
        self._check_writable()
        self._check_name(new_name)
        inode = self.get(ino)
        if inode.is_dir:
            raise FsError(errno.EPERM, "hard links to directories are not allowed")
        parent = self._dir(new_parent_ino)
        with self._change() as ch:
            if self._child_ino(ch.txn, parent, new_name) is not None:
                raise FsError(errno.EEXIST, new_name.decode(errors="replace"))
            ch.put(schema.KIND_DENTRY, schema.dentry_key(parent.ino, new_name), schema.u64(ino))
            now_ns = time.time_ns()
            attrs = ch.attrs(inode)
            attrs["nlink"] += 1
            attrs["ctime_ns"] = now_ns
            parent_attrs = ch.attrs(parent)
            parent_attrs["mtime_ns"] = parent_attrs["ctime_ns"] = now_ns
        inode.lookups += 1
        return inode

    def _drop_link(self, ch: _Change, inode: Inode) -> None:
        """One name of `inode` is gone; free it when no name and no open remains."""
        attrs = ch.attrs(inode)
        attrs["nlink"] = 0 if inode.is_dir else attrs["nlink"] - 1
        attrs["ctime_ns"] = time.time_ns()
        if attrs["nlink"] > 0:
            return
        if inode.opens > 0:
            # Unlinked while open: data lives until the last close; the orphan
            # record lets the next mount free it if we crash before that.
            ch.txn.put(schema.orphan_key(self.vol_id, inode.ino), b"", db=self.env.orphans)
        else:
            ch.purge(inode)

    def _is_empty_dir(self, txn, inode: Inode) -> bool:
        return not catalog.scan(txn, self.env, self.chain, schema.KIND_DENTRY,
                                schema.inode_key(inode.ino))

    def remove(self, parent_ino: int, name: bytes, is_dir: bool) -> None:
        """unlink (is_dir False) or rmdir (is_dir True)."""
        self._check_writable()
        parent = self._dir(parent_ino)
        with self.env.begin() as txn:
            child_ino = self._child_ino(txn, parent, name)
            if child_ino is None:
                raise FsError(errno.ENOENT, name.decode(errors="replace"))
            child = self.get(child_ino, txn)
            if child.is_dir != is_dir:
                raise FsError(errno.ENOTDIR if is_dir else errno.EISDIR, name.decode(errors="replace"))
            if is_dir and not self._is_empty_dir(txn, child):
                raise FsError(errno.ENOTEMPTY, name.decode(errors="replace"))
        with self._change() as ch:
            ch.delete(schema.KIND_DENTRY, schema.dentry_key(parent.ino, name))
            self._drop_link(ch, child)
            parent_attrs = ch.attrs(parent)
            if is_dir:
                parent_attrs["nlink"] -= 1
            parent_attrs["mtime_ns"] = parent_attrs["ctime_ns"] = time.time_ns()

    def _is_ancestor(self, txn, ancestor_ino: int, ino: int) -> bool:
        """Is `ancestor_ino` one of the directories on the path from `ino` up to the root?"""
        while True:
            if ino == ancestor_ino:
                return True
            if ino == schema.ROOT_INO:
                return False
            ino = self.get(ino, txn).attrs["parent_ino"]

    def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
               new_name: bytes, flags: int) -> None:
        self._check_writable()
        self._check_name(new_name)
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        old_parent, new_parent = self._dir(old_parent_ino), self._dir(new_parent_ino)
        with self.env.begin() as txn:
            src_ino = self._child_ino(txn, old_parent, old_name)
            if src_ino is None:
                raise FsError(errno.ENOENT, old_name.decode(errors="replace"))
            dst_ino = self._child_ino(txn, new_parent, new_name)
            src = self.get(src_ino, txn)
            dst = None if dst_ino is None else self.get(dst_ino, txn)
            self._check_rename(txn, src, dst, new_parent, flags)
        if src_ino == dst_ino:
            return      # two names of one file: POSIX says do nothing
        with self._change() as ch:
            ch.delete(schema.KIND_DENTRY, schema.dentry_key(old_parent.ino, old_name))
            ch.put(schema.KIND_DENTRY, schema.dentry_key(new_parent.ino, new_name), schema.u64(src_ino))
            now_ns = time.time_ns()
            if dst is not None:
                self._drop_link(ch, dst)
                if dst.is_dir:
                    ch.attrs(new_parent)["nlink"] -= 1
            if src.is_dir and old_parent.ino != new_parent.ino:
                ch.attrs(src)["parent_ino"] = new_parent.ino
                ch.attrs(old_parent)["nlink"] -= 1
                ch.attrs(new_parent)["nlink"] += 1
            ch.attrs(src)["ctime_ns"] = now_ns
            for parent in (old_parent, new_parent):
                attrs = ch.attrs(parent)
                attrs["mtime_ns"] = attrs["ctime_ns"] = now_ns

    def _check_rename(self, txn, src: Inode, dst: Optional[Inode], new_parent: Inode, flags: int) -> None:
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST, "target exists (RENAME_NOREPLACE)")
            if dst.ino == src.ino:
                return
            if dst.is_dir and not src.is_dir:
                raise FsError(errno.EISDIR, "cannot replace a directory with a non-directory")
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR, "cannot replace a non-directory with a directory")
            if dst.is_dir and not self._is_empty_dir(txn, dst):
                raise FsError(errno.ENOTEMPTY, "target directory is not empty")
        if src.is_dir and self._is_ancestor(txn, src.ino, new_parent.ino):
            raise FsError(errno.EINVAL, "cannot move a directory into itself")

    def readlink(self, ino: int) -> bytes:
        inode = self.get(ino)
        if not stat.S_ISLNK(inode.attrs["mode"]):
            raise FsError(errno.EINVAL, f"inode {ino} is not a symlink")
        return inode.target

    # --- open files ----------------------------------------------------------------------

    def open(self, ino: int, writable: bool, truncate: bool = False) -> int:
        """A new file handle (fh) on `ino`; `truncate` is O_TRUNC.

        The kernel passes O_TRUNC to us instead of sending a setattr (FUSE's
        atomic O_TRUNC) and already shows the file as empty, so ignoring the
        flag would bring the old bytes back at the next mount.
        """
        if writable or truncate:
            self._check_writable()
        inode = self.get(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR, f"inode {ino}")
        if truncate and inode.attrs["size"] != 0:
            self._truncate(inode, 0)
        inode.opens += 1
        fh = self._next_file_fh
        self._next_file_fh += 1
        self._file_handles[fh] = (ino, self.store.packs.space.fills)
        return fh

    def handle_ino(self, fh: int) -> int:
        return self._file_handles[fh][0]

    def fsync_target(self, fh: int) -> int:
        """The inode an fsync on `fh` syncs; ENOSPC if the store filled up
        after `fh` was opened and is still full.

        The grace (`space`) is for the writes buffered when the store filled
        and for the crash recovery that follows; a writer that goes on
        writing and fsyncing through the handles it had open would use it
        up first (PostgreSQL keeps committing through its WAL file for
        seconds until its checkpointer's failed fsync makes it PANIC), and
        then the restart finds no space to recover in. So those handles
        fail every fsync until space is back, as on a full plain disk;
        files opened since (the restarted server's) may use the grace.
        """
        ino, fills_at_open = self._file_handles[fh]
        if self.store.packs.space.full_since(fills_at_open):
            raise FsError(errno.ENOSPC, f"store {self.store.path} filled up after this file was "
                                        f"opened; delete files or destroy snapshots ('cowfs df "
                                        f"{self.store.path}' shows what frees space)")
        return ino

    def release(self, fh: int) -> None:
        entry = self._file_handles.pop(fh, None)
        inode = self.inodes.get(entry[0]) if entry is not None else None
        if inode is None:
            return
        inode.opens -= 1
        if inode.opens == 0 and inode.attrs["nlink"] == 0 and not inode.purged:
            with self._change() as ch:
                ch.purge(inode)
        self._maybe_evict(inode)

    def recover_orphans(self) -> int:
        """Free inodes that were unlinked while open when the last daemon died."""
        with self.env.begin() as txn:
            inos = snapshots.orphans_of(txn, self.env, self.vol_id)
        for ino in inos:
            inode = self.get(ino)
            with self._change() as ch:
                if inode.attrs["nlink"] == 0:
                    ch.purge(inode)
                else:
                    ch.txn.delete(schema.orphan_key(self.vol_id, ino), db=self.env.orphans)
            self._maybe_evict(inode)
        return len(inos)

    # --- directories ------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        self._dir(ino)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dir_handles[fh] = None
        return fh

    def _listing(self, fh: int, ino: int) -> list[tuple[bytes, int]]:
        listing = self._dir_handles.get(fh)
        if listing is None:
            # A stable listing per handle: offsets stay valid while entries change.
            with self.env.begin() as txn:
                entries = catalog.scan(txn, self.env, self.chain, schema.KIND_DENTRY,
                                       schema.inode_key(ino))
            listing = [(schema.dentry_name(k), schema.read_u64(v)) for k, v in entries]
            self._dir_handles[fh] = listing
        return listing

    def readdir(self, fh: int, ino: int, start: int):
        """Yield (name, inode, next_offset) from offset `start`."""
        listing = self._listing(fh, ino)
        for offset in range(start, len(listing)):
            name, child_ino = listing[offset]
            try:
                inode = self.get(child_ino)
            except FsError:
                continue        # removed since the listing was taken
            yield name, inode, offset + 1

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    # --- extended attributes ---------------------------------------------------------

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._check_name(name)
        if len(value) > XATTR_VALUE_MAX_BYTES:
            raise FsError(errno.E2BIG, "extended attribute value too large")
        inode = self.get(ino)
        with self._change() as ch:
            ch.put(schema.KIND_XATTR, schema.xattr_key(ino, name), value)
            ch.attrs(inode)["ctime_ns"] = time.time_ns()

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.xattr_or_none(ino, name)
        if value is None:
            raise FsError(errno.ENODATA, name.decode(errors="replace"))
        return value

    def xattr_or_none(self, ino: int, name: bytes) -> bytes | None:
        """The xattr value, or None when absent: the kernel asks for
        security.capability before every write (no S_NOSEC), so a miss must
        not cost an exception through several layers."""
        self.get(ino)
        with self.env.begin() as txn:
            return catalog.get(txn, self.env, self.chain, schema.KIND_XATTR, schema.xattr_key(ino, name))

    def listxattr(self, ino: int) -> list[bytes]:
        self.get(ino)
        with self.env.begin() as txn:
            entries = catalog.scan(txn, self.env, self.chain, schema.KIND_XATTR, schema.inode_key(ino))
        return [schema.xattr_name(k) for k, _ in entries]

    def removexattr(self, ino: int, name: bytes) -> None:
        inode = self.get(ino)
        self.getxattr(ino, name)
        with self._change() as ch:
            ch.delete(schema.KIND_XATTR, schema.xattr_key(ino, name))
            ch.attrs(inode)["ctime_ns"] = time.time_ns()
