"""Thin pyfuse3 adapter over `Filesystem`, with the single error gate.

pyfuse3 only understands ``FUSEError``; any other exception escaping a
handler would take the whole mount down. `_gate` is the one place where
errors become errnos: `FsError` keeps its errno, disk-full and I/O errors keep
theirs, LMDB's map-full becomes ENOSPC, and anything unexpected is logged
with its traceback and answered with EIO.
"""

import collections
import errno
import functools
import logging
import os

import lmdb
import pyfuse3
import trio

from .errors import ChunkDamagedError, ChunkGoneError, FsError
from .filesystem import Filesystem
from .inode import Inode
from .group_commit import GroupCommitter

log = logging.getLogger(__name__)

# Only this daemon changes the volume, and every change passes through the
# kernel, which updates its own caches; long timeouts are therefore safe and
# save a round trip per lookup/getattr (timeouts of 0 cost 3-4x on reads).
CACHE_TIMEOUT_S = 3600.0
# Reads of at least this many stored chunks run in a worker thread; smaller
# ones (PostgreSQL's 8 KiB page reads) are cheaper than the thread hop.
OFFLOAD_READ_MIN_CHUNKS = 16
# A read whose chunks were freed and reclaimed under it is planned again.
READ_ATTEMPTS = 3
_PASSTHROUGH_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


def _gate(handler):
    name = handler.__name__

    @functools.wraps(handler)
    async def gated(self, *args):
        self.requests[name] += 1
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            if isinstance(exc, ChunkDamagedError):
                # Never wrong bytes: the reader gets EIO, the log names the chunk.
                log.error("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except lmdb.MapFullError:
            log.error("%s: metadata map is full", handler.__name__)
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except OSError as exc:
            log.error("%s failed: %s", handler.__name__, exc)
            code = exc.errno if exc.errno in _PASSTHROUGH_ERRNOS else errno.EIO
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("unexpected error in %s%r", handler.__name__, args[:3])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return gated


class FuseOps(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self, fs: Filesystem, committer: GroupCommitter, xattrs: bool = True):
        super().__init__()
        self.fs = fs
        self.committer = committer
        # Without xattrs every xattr request answers ENOSYS once, and the
        # kernel asks no more: that saves the GETXATTR security.capability
        # round trip it makes before every write(2) (see `cowfs mount --no-xattrs`).
        self.xattrs = xattrs
        self._dir_inos: dict[int, int] = {}    # directory handle -> inode
        self.requests: collections.Counter = collections.Counter()     # by handler (for `stats`)

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        attrs = inode.attrs
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode.ino
        entry.generation = 0
        entry.entry_timeout = CACHE_TIMEOUT_S
        entry.attr_timeout = CACHE_TIMEOUT_S
        entry.st_mode = attrs["mode"]
        entry.st_nlink = attrs["nlink"]
        entry.st_uid = attrs["uid"]
        entry.st_gid = attrs["gid"]
        entry.st_rdev = attrs["rdev"]
        entry.st_size = attrs["size"]
        entry.st_blksize = self.fs.chunk_size
        entry.st_blocks = (attrs["size"] + 511) // 512
        entry.st_atime_ns = attrs["atime_ns"]
        entry.st_mtime_ns = attrs["mtime_ns"]
        entry.st_ctime_ns = attrs["ctime_ns"]
        return entry

    @_gate
    async def lookup(self, parent_inode, name, ctx=None):
        inode = self.fs.lookup_or_none(parent_inode, name)
        if inode is None:
            # A negative entry (inode 0) the kernel may cache: names are
            # created only through this mount, which replaces the entry.
            entry = pyfuse3.EntryAttributes()
            entry.st_ino = 0
            entry.entry_timeout = CACHE_TIMEOUT_S
            return entry
        return self._entry(inode)

    async def forget(self, inode_list):
        for ino, count in inode_list:
            self.fs.forget(ino, count)

    @_gate
    async def getattr(self, inode, ctx=None):
        return self._entry(self.fs.get(inode))

    @_gate
    async def setattr(self, inode, attr, fields, fh, ctx):
        result = self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None)
        return self._entry(result)

    @_gate
    async def readlink(self, inode, ctx):
        return self.fs.readlink(inode)

    @_gate
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._entry(self.fs.make(parent_inode, name, mode, ctx.uid, ctx.gid, rdev=rdev))

    @_gate
    async def mkdir(self, parent_inode, name, mode, ctx):
        mode = (mode & 0o7777) | 0o040000
        return self._entry(self.fs.make(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_gate
    async def symlink(self, parent_inode, name, target, ctx):
        return self._entry(self.fs.make(parent_inode, name, 0o120777, ctx.uid, ctx.gid, target=target))

    @_gate
    async def create(self, parent_inode, name, mode, flags, ctx):
        inode = self.fs.make(parent_inode, name, mode, ctx.uid, ctx.gid)
        fh = self.fs.open(inode.ino, writable=True)
        return pyfuse3.FileInfo(fh=fh), self._entry(inode)

    @_gate
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._entry(self.fs.link(inode, new_parent_inode, new_name))

    @_gate
    async def unlink(self, parent_inode, name, ctx):
        self.fs.remove(parent_inode, name, is_dir=False)

    @_gate
    async def rmdir(self, parent_inode, name, ctx):
        self.fs.remove(parent_inode, name, is_dir=True)

    @_gate
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_gate
    async def open(self, inode, flags, ctx):
        writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        fh = self.fs.open(inode, writable, truncate=bool(flags & os.O_TRUNC))
        # keep_cache: the kernel's pages stay valid across opens, only this
        # daemon changes the file and every change passes through the kernel.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_gate
    async def read(self, fh, off, size):
        for attempt in range(READ_ATTEMPTS):
            plan = self.fs.plan_read(self.fs.handle_ino(fh), off, size)
            try:
                if plan.stored_chunks >= OFFLOAD_READ_MIN_CHUNKS:
                    # Large reads (sequential read-ahead) wait for the disk in a
                    # thread: several are in flight at once and the loop keeps serving.
                    return await trio.to_thread.run_sync(plan.fetch)
                return plan.fetch()
            except ChunkGoneError:
                # The file changed after the plan and gc reclaimed a chunk it
                # named: plan again, which reads the newer bytes.
                if attempt == READ_ATTEMPTS - 1:
                    raise

    @_gate
    async def write(self, fh, off, buf):
        return self.fs.write(self.fs.handle_ino(fh), off, buf)

    @_gate
    async def flush(self, fh):
        # close() is not a durability point in POSIX; fsync is.
        return None

    @_gate
    async def release(self, fh):
        self.fs.release(fh)

    @_gate
    async def fsync(self, fh, datasync):
        # Rule 2: returns after a commit of this file's writes that started
        # after this call; it runs in a worker thread, shared with concurrent
        # fsyncs. Other files' buffered writes wait for their own fsync.
        await self.committer.sync(self.fs.fsync_target(fh))

    @_gate
    async def opendir(self, inode, ctx):
        fh = self.fs.opendir(inode)
        self._dir_inos[fh] = inode
        return fh

    @_gate
    async def readdir(self, fh, start_id, token):
        ino = self._dir_inos[fh]
        for name, inode, next_offset in self.fs.readdir(fh, ino, start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry(inode), next_offset):
                break
            self.fs.remember(inode)

    @_gate
    async def releasedir(self, fh):
        self.fs.releasedir(fh)
        self._dir_inos.pop(fh, None)

    @_gate
    async def fsyncdir(self, fh, datasync):
        # Namespace changes are committed when they happen; this syncs the
        # metadata of those earlier commits (rule 2), with the directory's
        # own buffered attributes if any.
        await self.committer.sync(self._dir_inos[fh])

    @_gate
    async def statfs(self, ctx):
        st = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = max(st.f_files, 1 << 32)
        out.f_ffree = max(st.f_ffree, 1 << 31)
        out.f_favail = out.f_ffree
        out.f_namemax = 255
        return out

    def _check_xattrs(self) -> None:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)

    @_gate
    async def setxattr(self, inode, name, value, ctx):
        self._check_xattrs()
        self.fs.setxattr(inode, name, value)

    @_gate
    async def getxattr(self, inode, name, ctx):
        self._check_xattrs()
        value = self.fs.xattr_or_none(inode, name)
        if value is None:
            # The common miss (security.capability before each write) answers
            # ENODATA here; the gate passes FUSEError through untouched.
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @_gate
    async def listxattr(self, inode, ctx):
        self._check_xattrs()
        return self.fs.listxattr(inode)

    @_gate
    async def removexattr(self, inode, name, ctx):
        self._check_xattrs()
        self.fs.removexattr(inode, name)
