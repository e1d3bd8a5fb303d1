"""Is an LMDB data file safe to map? Checked before `lmdb.open`.

LMDB maps data.mdb and trusts it: touching a page beyond the end of the
file kills the process with SIGBUS instead of raising an error. So before
opening, cowfs checks that every page LMDB could read lies inside the file.

The quick test is the file size against the newest meta page's
``mm_last_pg``. It is not enough to call a store damaged: pages that one
transaction allocated and freed again (a big delete) count in
``mm_last_pg`` but are never written, so a healthy file can be shorter. When
the quick test fails, `file_problem` walks every B-tree (the main database,
each named database, the free-page database) with plain reads and reports
damage only if a *referenced* page lies beyond the end. Other processes may
commit meanwhile and reuse pages of the tree being walked, so a failed walk
counts only if the newest meta page did not change during it; otherwise it
is walked again. A clean walk then extends the file to ``mm_last_pg`` with
the fallocate system call (never glibc's emulation, which rewrites bytes:
racy beside a writer), from its current end only, and ignores a failure (a
full disk): the extension only makes the next open take the quick path.

Layout (lmdb.h / mdb.c, 64-bit): a page starts with pgno u64, pad u16,
flags u16, lower u16, upper u16 (an overflow page has a u32 page count in
place of lower/upper), then an array of u16 node offsets. A node is lo u16,
hi u16, flags u16, ksize u16, key, data. In a branch page the child page
number is lo | hi << 16 | flags << 32. In a leaf, F_BIGDATA data is the u64
number of an overflow page, F_SUBDATA data is an MDB_db whose md_root is
its last u64 field (with F_DUPDATA alone the data is an inline sub-page,
which refers to no other page).
"""

import ctypes
import errno
import logging
import os
import struct
from typing import Optional

log = logging.getLogger(__name__)

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1                             # LMDB 0.9's data format (mm_version)
WALK_ATTEMPTS = 5
P_INVALID = (1 << 64) - 1
# After the 16-byte page header: mm_magic, mm_version, mm_address, mm_mapsize,
# mm_dbs[FREE] (md_pad holds the page size; md_root is its last field),
# mm_dbs[MAIN], mm_last_pg, mm_txnid.
_META = struct.Struct("<II16x I 36x Q 40x Q QQ")
_DB_ROOT = struct.Struct("<40xQ")             # MDB_db: ... md_root
_PAGE = struct.Struct("<QHHHH")               # pgno, pad, flags, lower, upper
_OVERFLOW_PAGES = struct.Struct("<12xI")      # mp_pages of an overflow page
_NODE = struct.Struct("<HHHH")                # lo, hi, flags, ksize
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
PAGE_HEADER_BYTES = 16

P_BRANCH, P_LEAF, P_OVERFLOW, P_LEAF2 = 0x01, 0x02, 0x04, 0x20
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04


class _Damaged(Exception):
    pass


def file_problem(data_path: str, repair_size: bool = True) -> Optional[str]:
    """Why `data_path` cannot be mapped safely, or None."""
    try:
        fd = os.open(data_path, os.O_RDWR if repair_size else os.O_RDONLY)
    except PermissionError:
        fd = os.open(data_path, os.O_RDONLY)
        repair_size = False
    except OSError as exc:
        return f"cannot read {data_path} ({exc.strerror})"
    try:
        return _check(fd, data_path, repair_size)
    except OSError as exc:
        return f"cannot read {data_path} ({exc.strerror})"
    finally:
        os.close(fd)


def _check(fd: int, data_path: str, repair_size: bool) -> Optional[str]:
    for _ in range(WALK_ATTEMPTS):
        meta = _newest_meta(os.pread(fd, 2 * 65536, 0))
        if meta is None:
            return f"{data_path} has no valid LMDB meta page"
        version, txnid, page_size, free_root, main_root, last_pg = meta
        if version != DATA_VERSION:
            return (f"{data_path} uses LMDB data format {version}; this cowfs reads format "
                    f"{DATA_VERSION}")
        size_bytes = os.fstat(fd).st_size
        needed_bytes = (last_pg + 1) * page_size
        if size_bytes >= needed_bytes:
            return None
        try:
            _Walk(fd, page_size, size_bytes).run([free_root, main_root])
        except (_Damaged, struct.error) as exc:
            again = _newest_meta(os.pread(fd, 2 * 65536, 0))
            if again is not None and again[1] != txnid:
                continue            # a commit reused pages under the walk: walk the new tree
            return (f"{data_path} is truncated or damaged ({exc}; "
                    f"the file has {size_bytes} bytes, its meta page names {needed_bytes})")
        if repair_size:
            _extend(fd, size_bytes, needed_bytes)
        return None
    return None        # committing all the time, each walk of a new tree: a live, working store


def _extend(fd: int, size_bytes: int, needed_bytes: int) -> None:
    """Allocate [size, needed) with fallocate(2) itself; never shrinks, never
    rewrites, may fail (full disk, unsupported): then the next open walks again."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, 0, size_bytes, needed_bytes - size_bytes) != 0:
        code = ctypes.get_errno()
        log.info("data.mdb not extended (%s); harmless", errno.errorcode.get(code, code))


def _newest_meta(head: bytes):
    """(version, txnid, page size, free root, main root, last page) of the
    newest valid meta page, or None."""
    metas = []
    for page_size in (4096, 8192, 16384, 32768, 65536):
        for at in (0, page_size):
            if at + PAGE_HEADER_BYTES + _META.size <= len(head):
                magic, version, psize, free_root, main_root, last_pg, txnid = \
                    _META.unpack_from(head, at + PAGE_HEADER_BYTES)
                if magic == MAGIC and psize == page_size:
                    metas.append((txnid, version, psize, free_root, main_root, last_pg))
        if metas:
            break
    if not metas:
        return None
    txnid, version, psize, free_root, main_root, last_pg = max(metas)
    return version, txnid, psize, free_root, main_root, last_pg


class _Walk:
    """Every page reachable from some roots, read with pread, never mapped."""

    def __init__(self, fd: int, page_size: int, size_bytes: int):
        self.fd = fd
        self.page_size = page_size
        self.pages_in_file = size_bytes // page_size
        self.seen: set[int] = set()

    def run(self, roots: list[int]) -> None:
        stack = [root for root in roots if root != P_INVALID]
        while stack:
            pgno = stack.pop()
            if pgno in self.seen:
                raise _Damaged(f"page {pgno} is referenced twice")
            self.seen.add(pgno)
            stack.extend(self._children(pgno))

    def _read(self, pgno: int, pages: int = 1) -> bytes:
        if pgno < 2 or pgno + pages > self.pages_in_file:
            raise _Damaged(f"page {pgno} (+{pages - 1}) lies beyond the end of the file")
        return os.pread(self.fd, self.page_size, pgno * self.page_size)

    def _children(self, pgno: int) -> list[int]:
        page = self._read(pgno)
        _pgno, _pad, flags, lower, upper = _PAGE.unpack_from(page)
        if flags & P_LEAF2:
            return []
        if not flags & (P_BRANCH | P_LEAF) or not PAGE_HEADER_BYTES <= lower <= upper <= len(page):
            raise _Damaged(f"page {pgno} is not a branch or leaf page")
        children = []
        for i in range((lower - PAGE_HEADER_BYTES) // 2):
            offset = _U16.unpack_from(page, PAGE_HEADER_BYTES + 2 * i)[0]
            if offset + _NODE.size > len(page):
                raise _Damaged(f"page {pgno} has a node outside the page")
            lo, hi, node_flags, ksize = _NODE.unpack_from(page, offset)
            data_at = offset + _NODE.size + ksize
            if flags & P_BRANCH:
                children.append(lo | hi << 16 | node_flags << 32)
            elif node_flags & F_BIGDATA:
                overflow = _U64.unpack_from(page, data_at)[0]
                count = _OVERFLOW_PAGES.unpack_from(self._read(overflow))[0]
                self._read(overflow, max(count, 1))       # every page of the run is inside
                self.seen.add(overflow)
            elif node_flags & F_SUBDATA:       # a named database or a dupsort tree
                if data_at + _DB_ROOT.size > len(page):
                    raise _Damaged(f"page {pgno} has a database record outside the page")
                root = _DB_ROOT.unpack_from(page, data_at)[0]
                if root != P_INVALID:
                    children.append(root)
        return children
