"""What a cowfs volume may hold after a power cut: a model of one flat directory.

The model follows the durability contract of docs/design.md, not the code:

* Bytes: once an fsync/fdatasync of a file returned, or a snapshot of the
  volume was acknowledged (rule 5 commits every buffer and syncs), the
  file's whole content at that moment is durable, byte by byte, until a
  later write or truncate covers that byte (`FileModel.must`). Any byte of a
  file after a cut must be zero or a value some write put at that offset of
  that file (`FileModel.writes`): never a byte from elsewhere.
* Names: namespace operations commit in order, at once, and are durable at
  the next fsync, fsyncdir or snapshot (rule 2). So after a cut the names are
  those of the state after *some prefix* of the namespace operations since
  the last such point (`Model.candidates`); which prefix is decided by
  matching the names found, then checking the bytes.
* Snapshots: a snapshot whose command returned exists after any later cut
  with exactly the content the head had when it was requested.

A file is identified by a `FileModel` object: a rename moves the object to
another name, so its bytes and history follow it.
"""

from dataclasses import dataclass, field

import numpy as np

UNKNOWN = -1


@dataclass
class FileModel:
    content: bytearray = field(default_factory=bytearray)
    must: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int16))
    writes: list = field(default_factory=list)        # (offset, bytes), every write since last known state

    @classmethod
    def found(cls, data: bytes) -> "FileModel":
        """A file as read back after a cut: all of it is durable now."""
        return cls(bytearray(data), np.frombuffer(data, dtype=np.uint8).astype(np.int16), [(0, bytes(data))])

    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.content):
            self.content.extend(bytes(end - len(self.content)))
        self.content[offset:end] = data
        self._grow_must(end)
        self.must[offset:end] = UNKNOWN            # overwritten since the last durable point
        self.writes.append((offset, bytes(data)))

    def truncate(self, size_bytes: int) -> None:
        if size_bytes < len(self.content):
            del self.content[size_bytes:]
        else:
            self.content.extend(bytes(size_bytes - len(self.content)))
        self.must[size_bytes:] = UNKNOWN

    def synced(self) -> None:
        self.must = np.full(max(len(self.must), len(self.content)), UNKNOWN, dtype=np.int16)
        self.must[:len(self.content)] = np.frombuffer(bytes(self.content), dtype=np.uint8)

    def _grow_must(self, size: int) -> None:
        if size > len(self.must):
            self.must = np.concatenate([self.must, np.full(size - len(self.must), UNKNOWN, dtype=np.int16)])

    def problems(self, data: bytes) -> list:
        """Why `data` (read after a cut) breaks the contract for this file; [] if it does not."""
        got = np.frombuffer(data, dtype=np.uint8)
        required = np.flatnonzero(self.must >= 0)
        out = []
        if len(required) and required[-1] >= len(got):
            out.append(f"{len(got)} bytes, but byte {required[-1]} was fsynced")
        inside = required[required < len(got)]
        bad = inside[got[inside] != self.must[inside]]
        if len(bad):
            out.append(f"{len(bad)} fsynced bytes differ, first at offset {bad[0]}")
        explained = got == 0
        for offset, written in self.writes:
            hi = min(len(got), offset + len(written))
            if offset < hi:
                explained[offset:hi] |= got[offset:hi] == np.frombuffer(written, dtype=np.uint8)[:hi - offset]
        if not explained.all():
            first = int(np.flatnonzero(~explained)[0])
            out.append(f"{int((~explained).sum())} bytes hold values never written there, first at offset {first}")
        return out


class Model:
    def __init__(self):
        self.files: dict[str, FileModel] = {}
        self.candidates: list = [{}]                   # namespace states since the last sync point
        self.snapshots: dict[str, dict] = {}          # name -> {file name: bytes}
        self.clones: dict[str, str] = {}              # clone volume -> snapshot name

    # --- what the test did ------------------------------------------------------------------

    def write(self, name: str, offset: int, data: bytes) -> None:
        if name not in self.files:
            self.files[name] = FileModel()
            self._namespace_changed()
        self.files[name].write(offset, data)

    def truncate(self, name: str, size_bytes: int) -> None:
        self.files[name].truncate(size_bytes)

    def rename(self, old: str, new: str) -> None:
        self.files[new] = self.files.pop(old)
        self._namespace_changed()

    def unlink(self, name: str) -> None:
        del self.files[name]
        self._namespace_changed()

    def fsync(self, name: str) -> None:
        self.files[name].synced()
        self._namespace_synced()

    def fsyncdir(self) -> None:
        self._namespace_synced()

    def snapshot(self, snap: str) -> None:
        self.snapshots[snap] = {name: bytes(f.content) for name, f in self.files.items()}
        for f in self.files.values():
            f.synced()
        self._namespace_synced()

    def _namespace_changed(self) -> None:
        self.candidates.append(dict(self.files))

    def _namespace_synced(self) -> None:
        self.candidates = [dict(self.files)]

    # --- after a cut ------------------------------------------------------------------------

    def recover(self, found: dict) -> None:
        """Check what a remount shows (`found`: name -> bytes) and adopt it.

        Raises AssertionError naming every candidate state it failed against."""
        reasons = []
        for state in reversed(self.candidates):
            if set(state) != set(found):
                continue
            problems = {name: p for name in found if (p := state[name].problems(found[name]))}
            if not problems:
                self.files = {name: FileModel.found(data) for name, data in found.items()}
                self.candidates = [dict(self.files)]
                return
            reasons.append(problems)
        names = [sorted(s) for s in self.candidates]
        raise AssertionError(f"after the cut the volume holds {sorted(found)}; the names allowed are one of "
                             f"{names}; byte problems against the matching states: {reasons}")
