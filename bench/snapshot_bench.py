"""Snapshot and clone latency at two volume sizes at least 100x apart.

Builds a small and a large volume through the library (not FUSE: faster to
build, same metadata), then times `snapshot` and `clone` on each, the
operation itself without interpreter start-up: one LMDB write transaction
including its durable commit. Also times a plain-directory baseline of the
closest equivalent work on the same disk (`cp -a` of the small tree),
to show what a data copy would cost instead.

    .venv/bin/python bench/snapshot_bench.py [--small-mib 100] [--large-gib 10] [--repeat 20]
                                             [--history 1000]

`--history N` also builds a volume with N snapshots (each after a small
change to a 64-file tree, as an hourly schedule would keep) and times
`list` and `df` at N/10 and at N snapshots: the cost per snapshot should
stay flat (linear in snapshots, not quadratic). It then destroys the older
half with one range (`hist@%hN/2`) and times that.

The large volume is deduplicated on purpose (a few thousand distinct
chunks): its logical size and its metadata (one chunk-map record per
8 KiB) are real, while the disk holds only the distinct chunks.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cowfs import admin, reports, schema, snapshots, volumes  # noqa: E402
from cowfs.filesystem import Filesystem  # noqa: E402
from cowfs.store import Store  # noqa: E402

FILE_BYTES = 1 << 30          # PostgreSQL segment files are 1 GiB


def build_volume(store: Store, name: str, logical_bytes: int, distinct_chunks: int) -> float:
    """Write `logical_bytes` of files into a new volume; returns seconds taken."""
    started = time.perf_counter()
    with store.env.begin(write=True) as txn:
        volumes.create_empty(txn, store.env, name)
        vol_id = volumes.volume_id(txn, store.env, name)
    fs = Filesystem(store, vol_id)
    cs = store.chunk_size
    pool = [os.urandom(cs) for _ in range(distinct_chunks)]
    written, file_no = 0, 0
    while written < logical_bytes:
        inode = fs.make(schema.ROOT_INO, f"seg.{file_no}".encode(), 0o100600, 0, 0)
        fh = fs.open(inode.ino, writable=True)
        file_bytes = min(FILE_BYTES, logical_bytes - written)
        for offset in range(0, file_bytes, 16 * cs):
            block = b"".join(pool[(offset // cs + i + file_no) % distinct_chunks] for i in range(16))
            fs.write(inode.ino, offset, block[: file_bytes - offset])
        fs.release(fh)
        written += file_bytes
        file_no += 1
    fs.flush_all()
    return time.perf_counter() - started


def time_ms(func) -> float:
    started = time.perf_counter()
    func()
    return (time.perf_counter() - started) * 1000


def measure(store: Store, name: str, repeat: int) -> dict:
    snap_ms, clone_ms = [], []
    for i in range(repeat):
        snap_ms.append(time_ms(lambda: admin.snapshot(store, f"{name}@b{i}")))
        clone_ms.append(time_ms(lambda: admin.clone(store, f"{name}@b{i}", f"{name}-c{i}")))
    with store.env.begin() as txn:
        vol_id = volumes.volume_id(txn, store.env, name)
        from cowfs import catalog
        logical = snapshots.logical_bytes(txn, store.env, catalog.volume_chain(txn, store.env, vol_id))
        records = txn.stat(store.env.records)["entries"]
    return dict(volume=name, logical_bytes=logical, store_records=records,
                snapshot_ms_median=statistics.median(snap_ms), snapshot_ms_max=max(snap_ms),
                clone_ms_median=statistics.median(clone_ms), clone_ms_max=max(clone_ms))


def history(store: Store, count: int) -> list[dict]:
    """`list` and `df` times with count/10 and count snapshots of one volume."""
    with store.env.begin(write=True) as txn:
        volumes.create_empty(txn, store.env, "hist")
        vol_id = volumes.volume_id(txn, store.env, "hist")
    fs = Filesystem(store, vol_id)
    files = [fs.make(schema.ROOT_INO, f"t{i}".encode(), 0o100600, 0, 0).ino for i in range(64)]
    rows = []
    for number in range(1, count + 1):
        ino = files[number % len(files)]
        fs.open(ino, writable=True)
        fs.write(ino, (number // len(files)) * store.chunk_size, os.urandom(store.chunk_size))
        fs.release(ino)
        fs.flush_all()
        with store.env.begin(write=True) as txn:
            snapshots.take(txn, store.env, vol_id, f"h{number}")
        if number in (count // 10, count):
            list_ms = time_ms(lambda: reports.listing(store))
            df_ms = time_ms(lambda: reports.df(store))
            rows.append(dict(snapshots=number, list_ms=list_ms, df_ms=df_ms,
                             list_ms_per_snapshot=list_ms / number, df_ms_per_snapshot=df_ms / number))
    half = count // 2
    destroy_ms = time_ms(lambda: admin.destroy(store, f"hist@%h{half}"))
    rows.append(dict(destroyed_snapshots=half, destroy_range_ms=destroy_ms))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-mib", type=int, default=100)
    parser.add_argument("--large-gib", type=float, default=10)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--history", type=int, default=1000, metavar="N",
                        help="snapshots in the list/df scale test (0: skip)")
    parser.add_argument("--dir", default=None, help="where to build the store (default: under /var/tmp)")
    parser.add_argument("--out", default=None, help="JSON result file (default bench/results/snapshot-DATE.json)")
    args = parser.parse_args(argv)
    base = tempfile.mkdtemp(prefix="cowfs-snapbench-", dir=args.dir or "/var/tmp")
    try:
        store = Store.create(os.path.join(base, "store"))
        small, large = args.small_mib << 20, int(args.large_gib * (1 << 30))
        build_s = dict(small=build_volume(store, "small", small, 4096),
                       large=build_volume(store, "large", large, 4096))
        rows = [measure(store, "small", args.repeat), measure(store, "large", args.repeat)]
        scale = history(store, args.history) if args.history >= 10 else []
        store.close()
        plain = _plain_copy_ms(base, small)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result = dict(machine=_machine(), build_seconds=build_s, rows=rows, plain_copy_small_ms=plain, history=scale,
                  size_ratio=rows[1]["logical_bytes"] / rows[0]["logical_bytes"],
                  snapshot_ratio=rows[1]["snapshot_ms_median"] / rows[0]["snapshot_ms_median"],
                  clone_ratio=rows[1]["clone_ms_median"] / rows[0]["clone_ms_median"])
    _report(result, args.out)
    return 0


def _plain_copy_ms(base: str, size_bytes: int) -> float:
    """What 'snapshotting' the small volume by copying costs on the same disk."""
    src = os.path.join(base, "plain-src")
    os.mkdir(src)
    with open(os.path.join(src, "data"), "wb") as f:
        for _ in range(size_bytes // (1 << 20)):
            f.write(os.urandom(1 << 20))
        os.fsync(f.fileno())
    return time_ms(lambda: shutil.copytree(src, os.path.join(base, "plain-copy")))


def _machine() -> str:
    return f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} GiB RAM"


def _report(result: dict, out: str) -> None:
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                              time.strftime("snapshot-%Y%m%d.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("| volume | logical | records in store | snapshot ms (median / max) | clone ms (median / max) |")
    print("|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['volume']} | {row['logical_bytes'] / (1 << 30):.2f} GiB | {row['store_records']} | "
              f"{row['snapshot_ms_median']:.2f} / {row['snapshot_ms_max']:.2f} | "
              f"{row['clone_ms_median']:.2f} / {row['clone_ms_max']:.2f} |")
    print(f"\nsize ratio {result['size_ratio']:.0f}x; large/small latency ratio: snapshot "
          f"{result['snapshot_ratio']:.2f}, clone {result['clone_ratio']:.2f}; "
          f"plain-directory copy of the small volume: {result['plain_copy_small_ms']:.0f} ms")
    for row in result["history"]:
        if "destroyed_snapshots" in row:
            print(f"destroy hist@%h{row['destroyed_snapshots']} (one range, one transaction): "
                  f"{row['destroy_range_ms']:.0f} ms")
            continue
        print(f"{row['snapshots']} snapshots: list {row['list_ms']:.0f} ms "
              f"({row['list_ms_per_snapshot']:.2f} ms/snapshot), df {row['df_ms']:.0f} ms "
              f"({row['df_ms_per_snapshot']:.2f} ms/snapshot)")
    print(f"results: {out}")


if __name__ == "__main__":
    sys.exit(main())
