"""Writer processes for power-cut tests: they report each durable step on stdout.

A power cut kills whatever writes to the disk, so writers run in their own
process (the test process must not hold mmaps or descriptors of a mount that
dies). Each prints ``acked N`` only after step N is durable by the contract
under test; the test keeps the highest N it read and checks it after the cut.

    python tests/powercut_workers.py lmdb ENV_DIR FIRST [--nometasync]
    python tests/powercut_workers.py records FILE FIRST

Both run until killed.
"""

import argparse
import os
import struct
import subprocess
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))

# --- LMDB: numbered commits, a window of the newest ones kept ---------------------------------

KEYS_PER_COMMIT = 16
VALUE_BYTES = 3000            # several values per page, a commit spans many pages
WINDOW = 10                   # commit n deletes commit n - WINDOW: LMDB reuses freed pages


def lmdb_key(commit: int, i: int) -> bytes:
    return b"c%08d-%d" % (commit, i)


def lmdb_value(commit: int, i: int) -> bytes:
    stamp = struct.pack("<QQ", commit, i)
    return (stamp * (VALUE_BYTES // len(stamp) + 1))[:VALUE_BYTES]


def lmdb_open(path: str, metasync: bool = True):
    import lmdb
    return lmdb.open(path, map_size=1 << 30, sync=True, metasync=metasync, subdir=True)


def lmdb_writer(path: str, first: int, metasync: bool) -> None:
    """Commit n writes KEYS_PER_COMMIT values and `last`=n and deletes commit n-WINDOW.
    Without metasync (cowfs's daemon mode) an explicit env sync acknowledges."""
    env = lmdb_open(path, metasync)
    n = first
    while True:
        with env.begin(write=True) as txn:
            for i in range(KEYS_PER_COMMIT):
                txn.put(lmdb_key(n, i), lmdb_value(n, i))
                txn.delete(lmdb_key(n - WINDOW, i))
            txn.put(b"last", b"%d" % n)
        if not metasync:
            env.sync(True)
        print(f"acked {n}", flush=True)
        n += 1


def lmdb_check(path: str) -> int:
    """The last commit present; raises AssertionError unless the newest WINDOW
    commits are whole and nothing else is there (no half commit)."""
    env = lmdb_open(path)
    try:
        with env.begin() as txn:
            raw = txn.get(b"last")
            last = -1 if raw is None else int(raw)
            expected = {lmdb_key(n, i): lmdb_value(n, i)
                        for n in range(max(0, last - WINDOW + 1), last + 1) for i in range(KEYS_PER_COMMIT)}
            found = {bytes(k): bytes(v) for k, v in txn.cursor() if bytes(k) != b"last"}
    finally:
        env.close()
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in expected if k in found and found[k] != expected[k])
    assert not (missing or extra or wrong), (f"LMDB state is not commit {last}: missing {missing[:5]}, "
                                             f"extra {extra[:5]}, wrong values {wrong[:5]}")
    return last


# --- a file of numbered records, each fsynced -------------------------------------------------

RECORD_BYTES = 4096           # half a cowfs chunk: every other record rewrites a chunk


def record(n: int) -> bytes:
    stamp = struct.pack("<Q", n)
    return stamp * (RECORD_BYTES // len(stamp))


def records_writer(path: str, first: int) -> None:
    """Record n at offset n * RECORD_BYTES, then fdatasync, then `acked n` (a WAL-like stream)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    n = first
    while True:
        os.pwrite(fd, record(n), n * RECORD_BYTES)
        os.fdatasync(fd)
        print(f"acked {n}", flush=True)
        n += 1


def records_present(data: bytes) -> int:
    """How many records the file holds; raises unless they are whole, from the
    start, and the rest of the file is zeros (never torn, never a foreign byte)."""
    assert len(data) % RECORD_BYTES == 0, f"the file ends inside a record ({len(data)} bytes)"
    whole = 0
    for n in range(len(data) // RECORD_BYTES):
        piece = data[n * RECORD_BYTES:(n + 1) * RECORD_BYTES]
        if piece == record(n):
            assert n == whole, f"record {n} is there but record {whole} is not"
            whole += 1
        else:
            assert piece == bytes(RECORD_BYTES), f"record {n} is torn or holds bytes never written there"
    return whole


# --- the parent's side ------------------------------------------------------------------------

class Writer:
    """A writer process; `wait_acked(n)` blocks until it reported step n durable."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "powercut_workers.py"), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.acked: Optional[int] = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_acked(self, n: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.acked is None or self.acked < n:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"writer exited {self.proc.wait()}: {self.proc.stderr.read()}")
            self.acked = int(line.split()[1])
            assert time.monotonic() < deadline, f"writer did not reach step {n} in {timeout_s} s"

    def close(self) -> None:
        """After the writer was killed: read the acks it printed before it died."""
        if self.proc.poll() is None:
            self.proc.kill()
        for line in self.proc.stdout:
            self.acked = int(line.split()[1])
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def wait_pending(disk, path: str, polls: int = 200) -> None:
    """Poll until `path` on `disk` has writes pending (a commit under way), at most
    `polls` times: a cut right after it lands inside a commit, not between two."""
    for _ in range(polls):
        if disk.pending()["files"].get(path):
            return


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["lmdb", "records"])
    parser.add_argument("path")
    parser.add_argument("first", type=int)
    parser.add_argument("--nometasync", action="store_true")
    args = parser.parse_args(argv)
    if args.kind == "lmdb":
        lmdb_writer(args.path, args.first, metasync=not args.nometasync)
    else:
        records_writer(args.path, args.first)
    return 0


if __name__ == "__main__":
    sys.exit(main())
