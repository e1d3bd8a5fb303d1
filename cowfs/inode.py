"""The in-memory state of one file of a mounted volume.

The `Inode` is the truth for the mounted head; the catalog holds what was
last committed. Data writes and attribute changes (setattr) only touch the
inode (`dirty`, `attrs`); the commit pipeline (`commit`) takes them to
packs and LMDB later.
"""

import stat
from typing import Optional


class Inode:
    __slots__ = ("ino", "attrs", "target", "lookups", "opens", "dirty", "flushing",
                 "in_job", "attrs_dirty", "purged", "unlogged", "attrs_unlogged",
                 "logged_seq", "log_ticket")

    def __init__(self, ino: int, attrs: dict, target: bytes = b""):
        self.ino = ino
        self.attrs = attrs
        self.target = target               # symlink target
        self.lookups = 0                   # kernel references (lookup/forget)
        self.opens = 0                     # open file handles
        self.dirty: dict[int, bytearray] = {}   # chunk_index -> full-size chunk buffer
        # Buffers frozen into the FlushJob in flight (read-only until it ends);
        # newer writes go to `dirty`, which reads consult first.
        self.flushing: dict[int, bytearray] = {}
        # Part of the FlushJob in flight (even with attributes only): it must
        # stay the cached object, or a reload would show the old record.
        self.in_job = False
        self.attrs_dirty = False
        self.purged = False                # records deleted; only kernel references remain
        # The intent log (see `intent_log`): chunks and attributes changed
        # since this file's last record; the seq of that record and the
        # writer's batch that holds it (an fsync with nothing new to log
        # still waits for that batch).
        self.unlogged: set[int] = set()
        self.attrs_unlogged = False
        self.logged_seq = 0
        self.log_ticket = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.attrs["mode"])

    def buffered(self, idx: int) -> Optional[bytearray]:
        """The newest buffered bytes of chunk `idx` (written, or frozen in the
        flush in flight), or None if the store has the current version."""
        buf = self.dirty.get(idx)
        return self.flushing.get(idx) if buf is None else buf
