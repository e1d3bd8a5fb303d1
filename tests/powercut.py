"""A disk that loses what was not made durable: a test-only FUSE passthrough.

A killed process keeps the kernel's page cache, so `kill -9` cannot show
whether a commit order or a log survives a power cut. This filesystem (the
idea of LazyFS, written anew on pyfuse3 + trio like cowfs) passes through to
a *backing directory*, which stands for the durable medium, and keeps every
write that was not made durable in its own memory. A `cut` drops that memory
(optionally tearing the last write or persisting a random part of it, as a
disk with a volatile cache may) and ends the process at once, so nothing
pending survives; a fresh instance on the same backing directory is the disk
after the power came back.

What is modelled
----------------
* Data. ``write`` and ``truncate`` (setattr size, O_TRUNC) of a file are
  *pending* until an ``fsync`` or ``fdatasync`` of that file (any handle of
  the inode; an O_DSYNC/O_SYNC write counts too, the kernel sends FSYNC after
  it). Then every pending operation of the file is applied to the backing file
  in order and the backing file is really fsynced. Reads and ``getattr`` see
  backing + pending, in order. Fsync of file A never makes file B's writes
  durable.
* One pending write is one FUSE WRITE request: the kernel splits large
  writes (128 KiB by default), so "the last write" of a tear is the last
  request, and mmap writeback arrives as page-sized requests.
* Creation. A name created by create/mknod/mkdir/symlink is *fresh*: it
  vanishes at the cut unless made durable first, by an fsync/fdatasync of the
  inode itself (as on ext4/xfs, which journal the name with it) or an fsync of
  a directory the inode is named in. A fresh directory vanishes with
  everything in it. A fresh file renamed over an existing one takes the rename
  with it: the old file is put back at the cut (the rename depended on a
  creation that was lost, as in an ordered journal).
* Everything else in the namespace -- unlink, rmdir, rename of a durable
  inode, link, chmod/chown/utimes, xattrs -- goes to the backing directory
  at once and is durable at once (an *ordered-metadata approximation*: a
  journaling filesystem could still lose the last of them, in order).
* ``cut(tear=True)`` applies a prefix of the most recent pending write that
  ends on an absolute 512-byte sector boundary strictly inside it (chosen by
  a seeded RNG; nothing if the write does not cross a boundary).
  ``cut(keep="random")`` persists each pending operation with probability
  1/2 (seeded), in the original order, as a volatile disk cache may; a
  persisted write of a fresh file is lost with its name.
* ``fsync``/``fdatasync``/``fsyncdir`` are counted per path and in total, so
  a test can assert how many device flushes one commit costs.

What is not modelled
--------------------
* Reordering of namespace operations, loss of a durable inode's unlink or
  rename, torn metadata: the backing filesystem holds them at once.
* Sector-level atomicity below 512 bytes is assumed; a write that fits in one
  sector is never torn. Tears happen only in the last write (with
  ``keep="random"`` earlier writes are all-or-nothing).
* ``syncfs``/``sync(2)`` do not reach a FUSE server: they flush nothing here
  (as on any FUSE filesystem). ``fallocate`` is not implemented (ENOSYS;
  glibc's ``posix_fallocate`` then writes zeros, which are pending writes).
* Free space (statvfs) is the backing filesystem's; pending bytes use none.
  mtime/ctime of a file with pending writes are the backing file's.
* Locks: ``flock`` and ``fcntl`` locks are not implemented by this server,
  so the kernel keeps them locally (pyfuse3 registers no lock handlers);
  that is exact for processes sharing one mount.
* The writeback cache is off, so every write(2) reaches this process before
  it returns; shared writable mmaps (LMDB's lock.mdb) work, their pages come
  as ordinary writes when the kernel writes them back.
* The backing directory itself is never cut: it is the platter.

Control: a Unix socket (``--control``), one JSON object per line each way:
``{"op": "ping"}``, ``{"op": "counts", "reset": bool}``, ``{"op": "pending"}``,
``{"op": "cut", "tear": bool, "keep": null|"random", "seed": int}`` (answers
what it kept, tore and removed, then the process ends with `CUT_EXIT_STATUS`).

Run: ``python tests/powercut.py --backing DIR --mountpoint MNT --control SOCK
--stash DIR``; tests use `PowerCutDisk`.
"""

import argparse
import collections
import contextlib
import errno
import functools
import json
import logging
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger("powercut")

CUT_EXIT_STATUS = 0            # a cut is the planned end of an instance
SECTOR_BYTES = 512
# Only requests through this mount change the backing directory, so the
# kernel's caches stay right for as long as it likes.
CACHE_TIMEOUT_S = 300.0
FSTYPE = "fuse.powercut"
HERE = os.path.dirname(os.path.abspath(__file__))


# --- pending data of one file ---------------------------------------------------------------

@dataclass
class Op:
    """One pending write (`data` at `offset`) or truncate (to `size_bytes`)."""
    seq: int                    # global order of arrival, across files
    ino: int
    offset: int = 0
    data: bytes = b""
    size_bytes: Optional[int] = None     # set: a truncate

    @property
    def is_truncate(self) -> bool:
        return self.size_bytes is not None


class PendingFile:
    """Writes and truncates of one inode not yet durable, over its backing file.

    `fd` (read-write, on the backing inode) keeps the inode alive, so its
    number cannot be reused while something is pending for it.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.ops: list[Op] = []
        self.size_bytes = os.fstat(fd).st_size     # logical size: backing + ops

    def add(self, op: Op) -> None:
        self.ops.append(op)
        if op.is_truncate:
            self.size_bytes = op.size_bytes
        else:
            self.size_bytes = max(self.size_bytes, op.offset + len(op.data))

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size_bytes)
        if end <= offset:
            return b""
        buf = bytearray(os.pread(self.fd, end - offset, offset))
        buf.extend(bytes(end - offset - len(buf)))      # beyond the backing end: zeros
        for op in self.ops:
            overlay(buf, offset, op)
        return bytes(buf)

    def apply(self, ops: list) -> None:
        """Write `ops` to the backing file, in order (not synced here)."""
        for op in ops:
            if op.is_truncate:
                os.ftruncate(self.fd, op.size_bytes)
            else:
                write_all(self.fd, op.data, op.offset)

    def close(self) -> None:
        os.close(self.fd)


def overlay(buf: bytearray, start: int, op: Op) -> None:
    """Apply one pending operation to `buf`, which holds bytes [start, start+len)."""
    end = start + len(buf)
    if op.is_truncate:
        lo = max(op.size_bytes, start)
        if lo < end:
            buf[lo - start:] = bytes(end - lo)
        return
    lo, hi = max(start, op.offset), min(end, op.offset + len(op.data))
    if lo < hi:
        buf[lo - start:hi - start] = op.data[lo - op.offset:hi - op.offset]


def write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def torn_prefix_bytes(op: Op, rng: random.Random) -> int:
    """How many bytes of `op` a torn write leaves: up to a sector boundary strictly inside it."""
    first = (op.offset // SECTOR_BYTES + 1) * SECTOR_BYTES
    boundaries = range(first, op.offset + len(op.data), SECTOR_BYTES)
    return rng.choice(boundaries) - op.offset if boundaries else 0


# --- the disk: namespace, pending data, durability --------------------------------------------

class Disk:
    """All state of one instance, on backing paths and inode numbers.

    Inode numbers are the backing filesystem's (`st_ino`), except that the
    backing root is FUSE's root inode. Every method is synchronous: called
    from the trio loop, each runs atomically with respect to the others.
    """

    def __init__(self, root: str, stash_dir: str, root_ino: int):
        self.root = os.fsencode(os.path.abspath(root))
        self.stash_dir = os.fsencode(os.path.abspath(stash_dir))
        self.root_ino = root_ino
        self.backing_root_ino = os.lstat(self.root).st_ino
        self.names: dict[int, set] = collections.defaultdict(set)   # ino -> {(parent_ino, name)}
        self.pending: dict[int, PendingFile] = {}
        self.handles: dict[int, tuple] = {}       # fh -> (ino, fd)
        self.next_fh = 1
        self.seq = 0
        self.fresh: set[int] = set()               # created, not yet durable
        self.stash: dict[int, list] = {}           # fresh ino -> [(replaced path, stash path)]
        self.counts = collections.defaultdict(collections.Counter)  # path -> {kind: n}
        self.frozen = False                        # set by a cut: serve nothing more

    # --- inode numbers and paths -----------------------------------------------------------

    def ino_of(self, st: os.stat_result) -> int:
        return self.root_ino if st.st_ino == self.backing_root_ino else st.st_ino

    def path(self, ino: int) -> bytes:
        if ino == self.root_ino:
            return self.root
        for parent, name in self.names.get(ino, ()):
            return os.path.join(self.path(parent), name)
        raise OSError(errno.ENOENT, f"inode {ino} has no name")

    def rel(self, ino: int) -> str:
        try:
            return os.fsdecode(os.path.relpath(self.path(ino), self.root))
        except OSError:
            return f"<unlinked inode {ino}>"

    def child(self, parent: int, name: bytes) -> bytes:
        return os.path.join(self.path(parent), name)

    def remember(self, parent: int, name: bytes) -> os.stat_result:
        st = os.lstat(self.child(parent, name))
        ino = self.ino_of(st)
        if ino != self.root_ino:
            self.names[ino].add((parent, name))
        return st

    def forget_name(self, ino: int, parent: int, name: bytes) -> None:
        names = self.names.get(ino)
        if names is not None:
            names.discard((parent, name))
            if not names:
                del self.names[ino]
        self.release_if_gone(ino)

    def stat(self, ino: int) -> os.stat_result:
        if ino in self.pending:
            return os.fstat(self.pending[ino].fd)
        if ino == self.root_ino or self.names.get(ino):
            return os.lstat(self.path(ino))
        for handle_ino, fd in self.handles.values():
            if handle_ino == ino:
                return os.fstat(fd)
        raise OSError(errno.ENOENT, f"inode {ino} is gone")

    def size(self, ino: int, st: os.stat_result) -> int:
        pending = self.pending.get(ino)
        return st.st_size if pending is None else pending.size_bytes

    # --- handles and pending data -----------------------------------------------------------

    def open(self, ino: int, truncate: bool) -> int:
        fd = os.open(self.path(ino), os.O_RDONLY | os.O_NOFOLLOW)
        fh = self.add_handle(ino, fd)
        if truncate:
            self.truncate(ino, 0)
        return fh

    def add_handle(self, ino: int, fd: int) -> int:
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.handles[fh] = (ino, fd)
        return fh

    def release(self, fh: int) -> None:
        ino, fd = self.handles.pop(fh)
        os.close(fd)
        self.release_if_gone(ino)

    def release_if_gone(self, ino: int) -> None:
        """Forget what is pending for an inode nobody can reach any more."""
        if any(h_ino == ino for h_ino, _fd in self.handles.values()):
            return
        pending = self.pending.get(ino)
        if pending is not None and os.fstat(pending.fd).st_nlink == 0:
            pending.close()
            del self.pending[ino]
        if ino not in self.names:
            self.fresh.discard(ino)
            self.drop_stash(ino)

    def pending_file(self, ino: int) -> PendingFile:
        pending = self.pending.get(ino)
        if pending is None:
            fd = None
            for h_ino, h_fd in self.handles.values():
                if h_ino == ino:       # also reaches an unlinked but open inode
                    fd = os.open(f"/proc/self/fd/{h_fd}", os.O_RDWR)
                    break
            if fd is None:
                fd = os.open(self.path(ino), os.O_RDWR | os.O_NOFOLLOW)
            pending = self.pending[ino] = PendingFile(fd)
        return pending

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def write(self, fh: int, offset: int, data: bytes) -> int:
        ino = self.handles[fh][0]
        self.pending_file(ino).add(Op(self._next_seq(), ino, offset, bytes(data)))
        return len(data)

    def truncate(self, ino: int, size_bytes: int) -> None:
        self.pending_file(ino).add(Op(self._next_seq(), ino, size_bytes=size_bytes))

    def setattr(self, ino: int, size=None, mode=None, uid=None, gid=None, atime_ns=None,
                mtime_ns=None) -> None:
        """Size is pending like a write; the other attributes go to the backing inode at once."""
        if size is not None:
            self.truncate(ino, size)
        st = self.stat(ino)
        named = ino == self.root_ino or bool(self.names.get(ino))
        # An unlinked but open file has no path: change it through a descriptor.
        target = self.path(ino) if named else self.pending_file(ino).fd
        nofollow = dict(follow_symlinks=False) if named else {}
        if mode is not None and not stat.S_ISLNK(st.st_mode):
            os.chmod(target, stat.S_IMODE(mode))
        if uid is not None or gid is not None:
            os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid, **nofollow)
        if atime_ns is not None or mtime_ns is not None:
            os.utime(target, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                                 st.st_mtime_ns if mtime_ns is None else mtime_ns), **nofollow)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        ino, fd = self.handles[fh]
        pending = self.pending.get(ino)
        if pending is None:
            return os.pread(fd, size, offset)
        return pending.read(offset, size)

    # --- durability ------------------------------------------------------------------------

    def fsync(self, fh: int, datasync: bool) -> None:
        ino, fd = self.handles[fh]
        self.count(ino, "fdatasync" if datasync else "fsync")
        pending = self.pending.pop(ino, None)
        if pending is not None:
            try:
                pending.apply(pending.ops)
                (os.fdatasync if datasync else os.fsync)(pending.fd)
            finally:
                pending.close()
        else:
            (os.fdatasync if datasync else os.fsync)(fd)
        self.make_durable(ino)

    def fsyncdir(self, ino: int, datasync: bool) -> None:
        self.count(ino, "fsyncdir")
        fd = os.open(self.path(ino), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.make_durable(ino)
        for child in [c for c in self.fresh if any(p == ino for p, _n in self.names.get(c, ()))]:
            self.make_durable(child)

    def make_durable(self, ino: int) -> None:
        self.fresh.discard(ino)
        self.drop_stash(ino)

    def drop_stash(self, ino: int) -> None:
        for _replaced, stashed in self.stash.pop(ino, []):
            with contextlib.suppress(OSError):
                os.unlink(stashed)

    def count(self, ino: int, kind: str) -> None:
        self.counts[self.rel(ino)][kind] += 1

    def flush_counts(self, reset: bool = False) -> dict:
        by_kind = collections.Counter()
        for counter in self.counts.values():
            by_kind.update(counter)
        out = dict(total=sum(by_kind.values()), fsync=by_kind["fsync"],
                   fdatasync=by_kind["fdatasync"], fsyncdir=by_kind["fsyncdir"],
                   paths={path: dict(c) for path, c in self.counts.items()})
        if reset:
            self.counts.clear()
        return out

    # --- namespace -------------------------------------------------------------------------

    def created(self, parent: int, name: bytes, uid: int, gid: int) -> os.stat_result:
        path = self.child(parent, name)
        os.chown(path, uid, gid, follow_symlinks=False)
        st = self.remember(parent, name)
        self.fresh.add(self.ino_of(st))
        return st

    def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes,
               noreplace: bool) -> None:
        old, new = self.child(parent_old, name_old), self.child(parent_new, name_new)
        src = self.remember(parent_old, name_old)
        try:
            dst = self.remember(parent_new, name_new)
        except FileNotFoundError:
            dst = None
        if dst is not None and noreplace:
            raise OSError(errno.EEXIST, "target exists")
        src_ino = self.ino_of(src)
        dst_ino = None if dst is None else self.ino_of(dst)
        if dst_ino == src_ino:
            return                                    # two links of one inode: nothing to do
        if (dst is not None and src_ino in self.fresh and dst_ino not in self.fresh
                and not stat.S_ISDIR(dst.st_mode)):
            self.stash_replaced(src_ino, new)
        os.rename(old, new)
        self.names[src_ino].discard((parent_old, name_old))
        self.names[src_ino].add((parent_new, name_new))
        if dst_ino is not None:
            self.forget_name(dst_ino, parent_new, name_new)

    def stash_replaced(self, fresh_ino: int, path: bytes) -> None:
        """Keep a link to the file a fresh one replaces, to put it back at a cut."""
        stashed = os.path.join(self.stash_dir, b"%d" % self._next_seq())
        os.link(path, stashed, follow_symlinks=False)
        self.stash.setdefault(fresh_ino, []).append((path, stashed))

    # --- the cut ---------------------------------------------------------------------------

    def cut(self, tear: bool, keep: Optional[str], seed: int) -> dict:
        """Persist what the options say, drop the rest, remove fresh names; the caller exits."""
        self.frozen = True
        rng = random.Random(seed)
        ops = sorted((op for p in self.pending.values() for op in p.ops), key=lambda op: op.seq)
        kept = [op for op in ops if rng.random() < 0.5] if keep == "random" else []
        report = dict(pending_ops=len(ops), kept=[self.describe(op) for op in kept], torn=None)
        if tear:
            last = next((op for op in reversed(ops) if not op.is_truncate), None)
            if last is not None and last not in kept:
                n = torn_prefix_bytes(last, rng)
                report["torn"] = dict(self.describe(last), applied_bytes=n)
                if n:
                    kept.append(Op(last.seq, last.ino, last.offset, last.data[:n]))
        for op in sorted(kept, key=lambda op: op.seq):
            self.pending[op.ino].apply([op])
        report["vanished"], report["restored"] = self.remove_fresh()
        return report

    def describe(self, op: Op) -> dict:
        if op.is_truncate:
            return dict(path=self.rel(op.ino), truncate=op.size_bytes)
        return dict(path=self.rel(op.ino), offset=op.offset, length=len(op.data))

    def remove_fresh(self) -> tuple:
        """Remove every name of a fresh inode (deepest first), put replaced files back."""
        paths = sorted({os.path.join(self.path(parent), name) for ino in self.fresh
                        for parent, name in self.names.get(ino, ())},
                       key=lambda p: p.count(b"/"), reverse=True)
        for path in paths:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        restored = []
        for ino in self.fresh:
            for replaced, stashed in self.stash.get(ino, []):
                if not os.path.lexists(replaced):
                    os.link(stashed, replaced, follow_symlinks=False)
                    restored.append(os.fsdecode(os.path.relpath(replaced, self.root)))
                os.unlink(stashed)
        return [os.fsdecode(os.path.relpath(p, self.root)) for p in paths], restored


# --- the FUSE adapter -------------------------------------------------------------------------

def _gate(handler):
    """OSError -> its errno; anything else is logged and answered with EIO; nothing after a cut."""
    import pyfuse3

    @functools.wraps(handler)
    async def gated(self, *args):
        if self.disk.frozen:
            raise pyfuse3.FUSEError(errno.EIO)
        try:
            return handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", handler.__name__, args[:3])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return gated


def make_operations(disk: Disk):
    """The pyfuse3.Operations of `disk` (pyfuse3 imported only in the server process)."""
    import pyfuse3

    class PowerCutOps(pyfuse3.Operations):
        enable_writeback_cache = False      # every write(2) must reach us before it returns

        def __init__(self):
            super().__init__()
            self.disk = disk
            self.listings: dict[int, list] = {}

        def entry(self, st: os.stat_result) -> "pyfuse3.EntryAttributes":
            ino = disk.ino_of(st)
            e = pyfuse3.EntryAttributes()
            e.st_ino = ino
            e.generation = 0
            e.entry_timeout = e.attr_timeout = CACHE_TIMEOUT_S
            e.st_mode, e.st_nlink, e.st_uid, e.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
            e.st_rdev = st.st_rdev
            e.st_size = disk.size(ino, st)
            e.st_blksize = st.st_blksize
            e.st_blocks = max(st.st_blocks, (e.st_size + 511) // 512)
            e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
            return e

        @_gate
        def lookup(self, parent, name, ctx=None):
            return self.entry(disk.remember(parent, name))

        @_gate
        def getattr(self, inode, ctx=None):
            return self.entry(disk.stat(inode))

        @_gate
        def setattr(self, inode, attr, fields, fh, ctx):
            disk.setattr(inode, size=attr.st_size if fields.update_size else None,
                         mode=attr.st_mode if fields.update_mode else None,
                         uid=attr.st_uid if fields.update_uid else None,
                         gid=attr.st_gid if fields.update_gid else None,
                         atime_ns=attr.st_atime_ns if fields.update_atime else None,
                         mtime_ns=attr.st_mtime_ns if fields.update_mtime else None)
            return self.entry(disk.stat(inode))

        @_gate
        def readlink(self, inode, ctx):
            return os.readlink(disk.path(inode))

        @_gate
        def mknod(self, parent, name, mode, rdev, ctx):
            os.mknod(disk.child(parent, name), mode, rdev)
            return self.entry(disk.created(parent, name, ctx.uid, ctx.gid))

        @_gate
        def mkdir(self, parent, name, mode, ctx):
            os.mkdir(disk.child(parent, name), stat.S_IMODE(mode))
            return self.entry(disk.created(parent, name, ctx.uid, ctx.gid))

        @_gate
        def symlink(self, parent, name, target, ctx):
            os.symlink(target, disk.child(parent, name))
            return self.entry(disk.created(parent, name, ctx.uid, ctx.gid))

        @_gate
        def create(self, parent, name, mode, flags, ctx):
            fd = os.open(disk.child(parent, name), os.O_RDWR | os.O_CREAT | os.O_EXCL,
                         stat.S_IMODE(mode))
            try:
                st = disk.created(parent, name, ctx.uid, ctx.gid)
            except BaseException:
                os.close(fd)
                raise
            fh = disk.add_handle(disk.ino_of(st), fd)
            return pyfuse3.FileInfo(fh=fh), self.entry(st)

        @_gate
        def link(self, inode, new_parent, new_name, ctx):
            os.link(disk.path(inode), disk.child(new_parent, new_name), follow_symlinks=False)
            return self.entry(disk.remember(new_parent, new_name))

        @_gate
        def unlink(self, parent, name, ctx):
            st = disk.remember(parent, name)
            os.unlink(disk.child(parent, name))
            disk.forget_name(disk.ino_of(st), parent, name)

        @_gate
        def rmdir(self, parent, name, ctx):
            st = disk.remember(parent, name)
            os.rmdir(disk.child(parent, name))
            disk.forget_name(disk.ino_of(st), parent, name)

        @_gate
        def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
            if flags & ~pyfuse3.RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EINVAL)      # RENAME_EXCHANGE: not needed
            disk.rename(parent_old, name_old, parent_new, name_new,
                        bool(flags & pyfuse3.RENAME_NOREPLACE))

        @_gate
        def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=disk.open(inode, truncate=bool(flags & os.O_TRUNC)))

        @_gate
        def read(self, fh, off, size):
            return disk.read(fh, off, size)

        @_gate
        def write(self, fh, off, buf):
            return disk.write(fh, off, buf)

        @_gate
        def flush(self, fh):
            return None                     # close(2) is no durability point

        @_gate
        def release(self, fh):
            disk.release(fh)

        @_gate
        def fsync(self, fh, datasync):
            disk.fsync(fh, bool(datasync))

        @_gate
        def opendir(self, inode, ctx):
            fh = disk.add_handle(inode, os.open(disk.path(inode), os.O_RDONLY | os.O_DIRECTORY))
            self.listings[fh] = sorted(os.listdir(disk.path(inode)))
            return fh

        @_gate
        def readdir(self, fh, start_id, token):
            ino = disk.handles[fh][0]
            names = self.listings[fh]
            for index in range(start_id, len(names)):
                try:
                    st = disk.remember(ino, names[index])
                except FileNotFoundError:
                    continue                # removed since opendir
                if not pyfuse3.readdir_reply(token, names[index], self.entry(st), index + 1):
                    break

        @_gate
        def releasedir(self, fh):
            self.listings.pop(fh, None)
            disk.release(fh)

        @_gate
        def fsyncdir(self, fh, datasync):
            disk.fsyncdir(disk.handles[fh][0], bool(datasync))

        @_gate
        def statfs(self, ctx):
            st = os.statvfs(disk.root)
            out = pyfuse3.StatvfsData()
            for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                          "f_ffree", "f_favail", "f_namemax"):
                setattr(out, field, getattr(st, field))
            return out

        @_gate
        def getxattr(self, inode, name, ctx):
            return os.getxattr(disk.path(inode), name, follow_symlinks=False)

        @_gate
        def setxattr(self, inode, name, value, ctx):
            os.setxattr(disk.path(inode), name, value, follow_symlinks=False)

        @_gate
        def listxattr(self, inode, ctx):
            return [os.fsencode(n) for n in os.listxattr(disk.path(inode), follow_symlinks=False)]

        @_gate
        def removexattr(self, inode, name, ctx):
            os.removexattr(disk.path(inode), name, follow_symlinks=False)

    return PowerCutOps()


# --- the server process -----------------------------------------------------------------------

async def _control(disk: Disk, listener) -> None:
    import trio

    async def handle(stream) -> None:
        async with stream:
            buf = b""
            while not buf.endswith(b"\n"):
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            request = json.loads(buf)
            if request.get("op") == "cut":
                report = disk.cut(bool(request.get("tear")), request.get("keep"),
                                  int(request.get("seed", 0)))
                # No await from here on: nothing may be served after the cut.
                sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
                sock.setblocking(True)
                sock.sendall(json.dumps(dict(ok=True, **report)).encode() + b"\n")
                log.info("cut: %s", report)
                os._exit(CUT_EXIT_STATUS)
            await stream.send_all(json.dumps(answer(disk, request)).encode() + b"\n")

    await trio.serve_listeners(handle, [listener])


def answer(disk: Disk, request: dict) -> dict:
    op = request.get("op")
    if op == "ping":
        return dict(ok=True, pid=os.getpid())
    if op == "counts":
        return dict(ok=True, **disk.flush_counts(bool(request.get("reset"))))
    if op == "pending":
        return dict(ok=True, ops=sum(len(p.ops) for p in disk.pending.values()),
                    files={disk.rel(ino): len(p.ops) for ino, p in disk.pending.items()},
                    fresh=sorted(disk.rel(ino) for ino in disk.fresh))
    return dict(ok=False, error=f"unknown op {op!r}")


async def _serve(disk: Disk, control_path: str) -> None:
    import pyfuse3
    import trio
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control_path)
    await sock.bind(control_path)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_control, disk, listener)
        nursery.start_soon(_stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    import pyfuse3
    import trio
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _signum in signals:
            pyfuse3.terminate()
            return


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="test-only FUSE disk that loses unsynced writes")
    parser.add_argument("--backing", required=True)
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--stash", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s powercut[%(process)d] %(message)s")
    import pyfuse3
    import trio
    os.umask(0)                        # modes come from the kernel, already masked
    os.makedirs(args.stash, exist_ok=True)
    disk = Disk(args.backing, args.stash, pyfuse3.ROOT_INODE)
    options = set(pyfuse3.default_options) | {"fsname=powercut", "subtype=powercut", "allow_other"}
    pyfuse3.init(make_operations(disk), args.mountpoint, options)
    try:
        trio.run(_serve, disk, args.control)
    finally:
        pyfuse3.close(unmount=True)
    return 0


# --- the test API -----------------------------------------------------------------------------

def is_mounted(path: str) -> bool:
    path = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def lazy_unmount(path: str) -> None:
    subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)


def kill_and_reap(pid: int, timeout_s: float = 30) -> None:
    """SIGKILL one process we started (by pid) and wait until it is gone."""
    from helpers import wait_gone
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)             # our child: reap it; otherwise wait_gone waits
    wait_gone(pid, timeout_s)


class PowerCutDisk:
    """A `Disk` served by its own process; `cut` is a power cut, `remount` the power back.

        with PowerCutDisk(workdir) as disk:
            ... use disk.path ...
            disk.cut(tear=True, seed=1, kill=[writer_pid])
            disk.remount()

    Teardown always detaches the mount and stops the process, also on failure.
    Its files live in ``workdir``: ``disk`` (the mount point), ``disk-backing``,
    ``disk-stash``, ``disk.sock`` (control) and ``disk-N.log`` (server logs).
    """

    START_TIMEOUT_S = 30

    def __init__(self, workdir: str, name: str = "disk"):
        self.path = os.path.join(workdir, name)
        self.backing = os.path.join(workdir, f"{name}-backing")
        self.stash = os.path.join(workdir, f"{name}-stash")
        self.control = os.path.join(workdir, f"{name}.sock")
        self.workdir, self.name = workdir, name
        self.proc: Optional[subprocess.Popen] = None
        self.instances = 0
        self.cuts = 0

    def __enter__(self) -> "PowerCutDisk":
        try:
            self.mount()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def log_path(self, instance: Optional[int] = None) -> str:
        return os.path.join(self.workdir, f"{self.name}-{instance or self.instances}.log")

    def mount(self) -> None:
        for path in (self.path, self.backing):
            os.makedirs(path, mode=0o755, exist_ok=True)
        os.chmod(self.backing, 0o755)          # the postgres user must traverse it
        self.instances += 1
        with open(self.log_path(), "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "powercut.py"), "--backing", self.backing,
                 "--mountpoint", self.path, "--control", self.control, "--stash", self.stash],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_ready()

    remount = mount

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"powercut server exited {self.proc.returncode}:\n{self.log_tail()}")
            if is_mounted(self.path):
                with contextlib.suppress(OSError):
                    if self.request(dict(op="ping")).get("pid") == self.proc.pid:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"powercut server not ready after {self.START_TIMEOUT_S} s:\n"
                                     f"{self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path(), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def request(self, message: dict, timeout_s: float = 60) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(self.control)
            sock.sendall(json.dumps(message).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                data = sock.recv(65536)
                if not data:
                    raise OSError(errno.ECONNRESET, f"powercut server closed the connection:\n{self.log_tail()}")
                buf += data
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise AssertionError(f"powercut request {message} failed: {reply}")
        return reply

    def flush_counts(self, reset: bool = False) -> dict:
        """{'total', 'fsync', 'fdatasync', 'fsyncdir', 'paths': {relative path: {kind: n}}}."""
        reply = self.request(dict(op="counts", reset=reset))
        reply.pop("ok")
        return reply

    def pending(self) -> dict:
        return self.request(dict(op="pending"))

    def cut(self, tear: bool = False, keep: Optional[str] = None, seed: int = 0,
            kill: tuple = ()) -> dict:
        """Power cut: drop what is pending (see the module docstring), end the server,
        SIGKILL the writers in `kill` (pids), detach the dead mount. Returns the
        server's report: kept, torn, vanished and restored paths."""
        assert keep in (None, "random"), keep
        report = self.request(dict(op="cut", tear=tear, keep=keep, seed=seed))
        self.proc.wait(timeout=30)
        for pid in kill:
            kill_and_reap(pid)
        lazy_unmount(self.path)
        self.proc = None
        self.cuts += 1
        report.pop("ok")
        return report

    def close(self) -> None:
        """Detach the mount and stop the server (by its pid); safe to call twice."""
        if is_mounted(self.path):
            lazy_unmount(self.path)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None


if __name__ == "__main__":
    sys.exit(main())
