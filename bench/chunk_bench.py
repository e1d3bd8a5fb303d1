"""Micro benchmark of the chunk write path, without FUSE.

Writes --mib MiB of unique (incompressible, non-deduplicating) data into one file
of a fresh store through `Filesystem.write` and commits every --flush-mib
with `Filesystem.flush_all` (hash, dedup lookup, pack append, pack sync,
LMDB commit), then does the same with a plain file in a plain directory on
the same filesystem (write + fdatasync at the same points). Reports chunks/s
and MiB/s of each run and the cowfs/plain ratio, and the CPU seconds of the
cowfs part (steadier than wall time on a shared machine); prints the median
of --runs. Opens the store like the daemon does (metasync=False).
--layer chunks times the chunk store alone (ChunkBatch add_many, sync, ref,
apply, commit per --flush-mib), without the inode layer above it.

    .venv/bin/python bench/chunk_bench.py --dir /var/tmp --mib 256 --runs 3
"""

import argparse
import os
import shutil
import statistics
import stat
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cowfs import schema, volumes  # noqa: E402
from cowfs.filesystem import Filesystem  # noqa: E402
from cowfs.store import Store  # noqa: E402


def _payload(total_bytes: int) -> bytes:
    # Generated once, outside the timed part; unique per chunk, so no dedup.
    return os.urandom(total_bytes)


def cowfs_run(workdir: str, payload: bytes, flush_bytes: int, write_bytes: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of writing `payload`."""
    store_dir = os.path.join(workdir, "store")
    subprocess.run([sys.executable, "-m", "cowfs", "init", store_dir], check=True, cwd=REPO,
                   capture_output=True)
    store = Store.open(store_dir, metasync=False)
    try:
        with store.env.begin() as txn:
            vol_id = volumes.volume_id(txn, store.env, "main")
        fs = Filesystem(store, vol_id)
        inode = fs.make(schema.ROOT_INO, b"bench", stat.S_IFREG | 0o644, 0, 0)
        view = memoryview(payload)
        start, start_cpu = time.perf_counter(), time.process_time()
        for offset in range(0, len(payload), write_bytes):
            fs.write(inode.ino, offset, view[offset:offset + write_bytes])
            if (offset + write_bytes) % flush_bytes == 0:
                fs.flush_all()
        fs.flush_all()
        return time.perf_counter() - start, time.process_time() - start_cpu
    finally:
        store.close()
        shutil.rmtree(store_dir)


def chunks_run(workdir: str, payload: bytes, flush_bytes: int, write_bytes: int) -> tuple[float, float]:
    """Like `cowfs_run`, one layer down: only the chunk store's commit work
    (ChunkBatch add_many or add, sync, ref, apply, LMDB commit), no inodes."""
    store_dir = os.path.join(workdir, "store")
    subprocess.run([sys.executable, "-m", "cowfs", "init", store_dir], check=True, cwd=REPO,
                   capture_output=True)
    store = Store.open(store_dir, metasync=False)
    chunk_size = store.chunk_size
    try:
        view = memoryview(payload)
        start, start_cpu = time.perf_counter(), time.process_time()
        for first in range(0, len(payload), flush_bytes):
            datas = [bytes(view[offset:offset + chunk_size])
                     for offset in range(first, min(first + flush_bytes, len(payload)), chunk_size)]
            batch = store.chunks.batch()
            if hasattr(batch, "add_many"):
                chunk_ids = batch.add_many(datas)
            else:                                   # a tree from before add_many
                chunk_ids = [batch.add(data) for data in datas]
            batch.sync()
            with store.env.begin(write=True) as txn:
                for chunk_id in chunk_ids:
                    batch.ref(chunk_id)
                batch.apply(txn)
        return time.perf_counter() - start, time.process_time() - start_cpu
    finally:
        store.close()
        shutil.rmtree(store_dir)


def plain_run(workdir: str, payload: bytes, flush_bytes: int, write_bytes: int) -> float:
    path = os.path.join(workdir, "plain")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    view = memoryview(payload)
    try:
        start = time.perf_counter()
        for offset in range(0, len(payload), write_bytes):
            os.pwrite(fd, view[offset:offset + write_bytes], offset)
            if (offset + write_bytes) % flush_bytes == 0:
                os.fdatasync(fd)
        os.fdatasync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)


def main(args=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/var/tmp", help="where the store and plain file go")
    parser.add_argument("--mib", type=int, default=256, help="MiB written per run (default 256)")
    parser.add_argument("--flush-mib", type=int, default=32,
                        help="commit (and plain fdatasync) every this many MiB (default 32)")
    parser.add_argument("--write-kib", type=int, default=128,
                        help="size of each write call in KiB, like FUSE writes (default 128)")
    parser.add_argument("--layer", choices=("filesystem", "chunks"), default="filesystem",
                        help="write through Filesystem.write/flush_all (default) or straight "
                             "into ChunkBatch (only the chunk and pack layer)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each; the median is reported")
    opts = parser.parse_args(args)
    total = opts.mib << 20
    write_bytes = opts.write_kib << 10
    flush_bytes = opts.flush_mib << 20
    if flush_bytes % write_bytes or total % write_bytes:
        parser.error("--mib and --flush-mib must be multiples of --write-kib")
    payload = _payload(total)
    chunks = total // schema.DEFAULT_CHUNK_SIZE
    cow_times, cow_cpu, plain_times = [], [], []
    workdir = tempfile.mkdtemp(prefix="chunk_bench.", dir=opts.dir)
    try:
        for run in range(opts.runs):
            run_cowfs = cowfs_run if opts.layer == "filesystem" else chunks_run
            wall, cpu = run_cowfs(workdir, payload, flush_bytes, write_bytes)
            cow_times.append(wall)
            cow_cpu.append(cpu)
            plain_times.append(plain_run(workdir, payload, flush_bytes, write_bytes))
            print(f"run {run + 1}: cowfs {wall:.3f} s ({cpu:.3f} s CPU), "
                  f"plain {plain_times[-1]:.3f} s", flush=True)
    finally:
        shutil.rmtree(workdir)
    cow, plain = statistics.median(cow_times), statistics.median(plain_times)
    print(f"cowfs: {chunks / cow:,.0f} chunks/s, {opts.mib / cow:.1f} MiB/s, "
          f"{statistics.median(cow_cpu):.3f} s CPU (median of {opts.runs})")
    print(f"plain: {opts.mib / plain:.1f} MiB/s")
    print(f"cowfs/plain throughput ratio: {plain / cow:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
