"""`cowfs diff` cost at two volume sizes at least 100x apart, same amount of change.

Builds a small and a large volume through the library (not FUSE: faster to
build, same metadata); the large one has 100x the files *and* 100x the bytes,
laid out like PostgreSQL (directories of segment files). On each, the same
scripted change set is applied between two snapshots: pages rewritten in
place in existing files, files created, removed and renamed. Then
`admin.diff` (the code behind `cowfs diff`) is timed:

* first diff: also builds the volume's reverse path index (one scan of the
  directory entries, O(files), once per volume);
* later diffs: the index is current (only the born log is replayed), which is
  the steady state; this is the O(changes) figure.

    .venv/bin/python bench/diff_bench.py [--small-files 50] [--ratio 100] [--file-mib 2] [--repeat 15]

The large volume is deduplicated on purpose (a pool of distinct chunks): its
logical size and its metadata (one chunk-map record per 8 KiB) are real,
while the disk holds only the distinct chunks.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import stat
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cowfs import admin, schema, volumes  # noqa: E402
from cowfs.filesystem import Filesystem  # noqa: E402
from cowfs.store import Store  # noqa: E402

FILES_PER_DIR = 50
CHANGES = dict(pages_rewritten=40, files_created=10, files_removed=10, files_renamed=10)


def _fs(store: Store, name: str) -> Filesystem:
    with store.env.begin() as txn:
        return Filesystem(store, volumes.volume_id(txn, store.env, name))


def build_volume(store: Store, name: str, files: int, file_bytes: int, pool: list) -> float:
    """`files` files of `file_bytes` in directories of FILES_PER_DIR; returns seconds."""
    started = time.perf_counter()
    with store.env.begin(write=True) as txn:
        volumes.create_empty(txn, store.env, name)
    fs = _fs(store, name)
    cs = store.chunk_size
    base = fs.make(schema.ROOT_INO, b"base", stat.S_IFDIR | 0o700, 0, 0)
    directory = None
    for n in range(files):
        if n % FILES_PER_DIR == 0:
            directory = fs.make(base.ino, str(n // FILES_PER_DIR).encode(), stat.S_IFDIR | 0o700, 0, 0)
        inode = fs.make(directory.ino, str(n).encode(), stat.S_IFREG | 0o600, 0, 0)
        fh = fs.open(inode.ino, writable=True)
        for offset in range(0, file_bytes, 16 * cs):
            fs.write(inode.ino, offset, b"".join(pool[(offset // cs + i + n) % len(pool)] for i in range(16)))
        fs.release(fh)
    fs.flush_all()
    return time.perf_counter() - started


def apply_changes(store: Store, name: str, files: int, file_bytes: int, seed: int) -> None:
    """The same number of changes whatever the volume size."""
    rng = random.Random(seed)
    fs = _fs(store, name)
    base = fs.lookup(schema.ROOT_INO, b"base")
    picked = rng.sample(range(files), CHANGES["pages_rewritten"] + CHANGES["files_removed"] + CHANGES["files_renamed"])
    rewrite = picked[:CHANGES["pages_rewritten"]]
    remove = picked[len(rewrite):len(rewrite) + CHANGES["files_removed"]]
    rename = picked[len(rewrite) + len(remove):]
    for n in rewrite:
        inode = _file(fs, base, n)
        fh = fs.open(inode.ino, writable=True)
        fs.write(inode.ino, rng.randrange(file_bytes // 8192) * 8192, os.urandom(8192))
        fs.release(fh)
    for n in remove:
        fs.remove(_dir(fs, base, n).ino, str(n).encode(), is_dir=False)
    for n in rename:
        d = _dir(fs, base, n)
        fs.rename(d.ino, str(n).encode(), d.ino, f"{n}.renamed-{seed}".encode(), 0)
    d0 = fs.lookup(base.ino, b"0")
    for i in range(CHANGES["files_created"]):
        inode = fs.make(d0.ino, f"new-{seed}-{i}".encode(), stat.S_IFREG | 0o600, 0, 0)
        fh = fs.open(inode.ino, writable=True)
        fs.write(inode.ino, 0, os.urandom(8192))
        fs.release(fh)
    fs.flush_all()


def _dir(fs: Filesystem, base, n: int):
    return fs.lookup(base.ino, str(n // FILES_PER_DIR).encode())


def _file(fs: Filesystem, base, n: int):
    return fs.lookup(_dir(fs, base, n).ino, str(n).encode())


def prepare(store: Store, name: str, files: int, file_bytes: int) -> None:
    admin.snapshot(store, f"{name}@a")
    apply_changes(store, name, files, file_bytes, seed=1)
    admin.snapshot(store, f"{name}@b")


def time_diff(store: Store, name: str) -> tuple[float, dict]:
    started = time.perf_counter()
    report = admin.diff(store, f"{name}@a", f"{name}@b")
    return (time.perf_counter() - started) * 1000, report


def measure(store: Store, sizes: dict, file_bytes: int, repeat: int) -> list[dict]:
    """First diff of each volume, then `repeat` rounds alternating small and large
    (alternating cancels out load from other processes drifting over time)."""
    first = {name: time_diff(store, name) for name in sizes}
    steady = {name: [] for name in sizes}
    reports = {}
    for _ in range(repeat):
        for name in sizes:
            ms, reports[name] = time_diff(store, name)
            steady[name].append(ms)
    rows = []
    with store.env.begin() as txn:
        records = txn.stat(store.env.records)["entries"]
    for name, files in sizes.items():
        report = reports[name]
        assert report["changes"] == first[name][1]["changes"]
        rows.append(dict(volume=name, files=files, logical_bytes=files * file_bytes, store_records=records,
                         changes=len(report["changes"]), counts=report["counts"],
                         changed_records=report["stats"]["changed_records"],
                         full_scans=report["stats"]["full_scans"], first_diff_ms=first[name][0],
                         index_built_entries=first[name][1]["stats"]["index_built"],
                         diff_ms_median=statistics.median(steady[name]), diff_ms_max=max(steady[name])))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-files", type=int, default=100)
    parser.add_argument("--ratio", type=int, default=100, help="large volume = ratio x small (files and bytes)")
    parser.add_argument("--file-mib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--dir", default=None, help="where to build the store (default: under /var/tmp)")
    parser.add_argument("--out", default=None, help="JSON result file (default bench/results/diff-DATE.json)")
    args = parser.parse_args(argv)
    file_bytes = int(args.file_mib * (1 << 20))
    base = tempfile.mkdtemp(prefix="cowfs-diffbench-", dir=args.dir or "/var/tmp")
    try:
        store = Store.create(os.path.join(base, "store"))
        pool = [os.urandom(store.chunk_size) for _ in range(4096)]
        sizes = dict(small=args.small_files, large=args.small_files * args.ratio)
        build_s = {name: build_volume(store, name, n, file_bytes, pool) for name, n in sizes.items()}
        for name, n in sizes.items():
            prepare(store, name, n, file_bytes)
        rows = measure(store, sizes, file_bytes, args.repeat)
        store.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    small, large = rows
    result = dict(machine=_machine(), changes_applied=CHANGES, build_seconds=build_s, rows=rows,
                  size_ratio=large["logical_bytes"] / small["logical_bytes"],
                  diff_ratio=large["diff_ms_median"] / small["diff_ms_median"],
                  first_diff_ratio=large["first_diff_ms"] / small["first_diff_ms"])
    _report(result, args.out)
    return 0


def _machine() -> str:
    return f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} GiB RAM"


def _report(result: dict, out: str) -> None:
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                              time.strftime("diff-%Y%m%d.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("| volume | files | logical | changes listed | records walked | first diff ms (builds index) "
          "| diff ms (median / max) |")
    print("|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['volume']} | {row['files']} | {row['logical_bytes'] / (1 << 30):.2f} GiB | {row['changes']} | "
              f"{row['changed_records']} | {row['first_diff_ms']:.1f} | "
              f"{row['diff_ms_median']:.2f} / {row['diff_ms_max']:.2f} |")
    print(f"\nsize ratio {result['size_ratio']:.0f}x; large/small diff time ratio {result['diff_ratio']:.2f} "
          f"(first diff, building the path index: {result['first_diff_ratio']:.1f})")
    print(f"results: {out}")


if __name__ == "__main__":
    sys.exit(main())
