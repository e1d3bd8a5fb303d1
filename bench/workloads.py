"""The benchmark groups. Each runs its workload on a plain directory and on cowfs.

Every group takes the `Harness` and a `Config` and returns a list of
metrics (`new_metric`). A metric holds one entry per round with the figure
of the baseline (normally the plain directory), the figure of cowfs and
their ratio cowfs / baseline, both measured in that round. Rounds alternate
the order of the two runs (plain first in even rounds, cowfs first in odd
ones), so a slow drift of the shared machine does not favour one side.
"""

import concurrent.futures
import json
import os
import random
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

from harness import GIB, MIB, Harness, Side, disk_bytes, drop_caches, log

from cowfs.pg import PgServer
from cowfs.pg.server import parse_pgbench

CLIENTS = 4
BLOCK_BYTES = 1 << 20
STAMP_EVERY = 4096          # each 4 KiB of generated data is unique: no chunk size dedups it


@dataclass
class Config:
    rounds: int = 3
    scale: int = 10
    tpcb_s: int = 20
    select_s: int = 10
    seq_bytes: int = GIB
    rand_bytes: int = 512 * MIB
    fio_s: int = 10
    snap_small_mib: int = 100
    snap_large_gib: float = 10.0
    snap_repeat: int = 20
    snap_history: int = 1000           # snapshots of one volume for the list/df/destroy-range times
    snapshots: int = 24
    snap_interval_s: float = 1.0
    chunk_sizes: tuple = (8192, 16384, 32768, 65536)
    chunk_tpcb_s: int = 15
    pg_settings: tuple = ()            # ("name=value", ...) for every server, e.g. wal_init_zero=off
    flush_transactions: int = 2000     # single-client TPC-B transactions counted per side and round
    clone_scale: int = 50              # the large pgbench -i before the crash image
    clone_load_s: int = 5              # TPC-B load before the snapshot that is the crash image

    @classmethod
    def quick(cls) -> "Config":
        return cls(rounds=1, scale=1, tpcb_s=3, select_s=2, seq_bytes=16 * MIB,
                   rand_bytes=16 * MIB, fio_s=2, snap_small_mib=2, snap_large_gib=0.2,
                   snap_repeat=5, snap_history=20, snap_interval_s=0.1, chunk_tpcb_s=2,
                   chunk_sizes=(8192, 32768), flush_transactions=100, clone_scale=2, clone_load_s=2)


# --- metrics ---------------------------------------------------------------------------------

def new_metric(name: str, unit: str, higher_is_better: bool, base: str = "plain",
               value: str = "cowfs", **info) -> dict:
    return dict(name=name, unit=unit, higher_is_better=higher_is_better, base_label=base,
                value_label=value, rounds=[], **info)


def add_round(metric: dict, base: float, value: float, **extra) -> None:
    ratio = value / base if base else None
    metric["rounds"].append(dict(base=base, value=value, ratio=ratio, **extra))


def ordered(round_no: int, items: list) -> list:
    """A B in even rounds, B A in odd ones."""
    return list(items) if round_no % 2 == 0 else list(reversed(items))


def timed(func: Callable, *args, **kwargs) -> float:
    started = time.perf_counter()
    func(*args, **kwargs)
    return time.perf_counter() - started


# --- data -------------------------------------------------------------------------------------

class UniqueData:
    """Blocks of pseudo-random bytes, each 4 KiB stamped with its position: never dedups."""

    def __init__(self, seed: int = 0):
        self._base = bytearray(random.Random(seed).randbytes(BLOCK_BYTES))
        self._salt = random.Random().getrandbits(64)

    def block(self, index: int, size: int = BLOCK_BYTES) -> bytearray:
        buf = self._base
        for off in range(0, BLOCK_BYTES, STAMP_EVERY):
            struct.pack_into("<QQ", buf, off, self._salt ^ index, off)
        return buf[:size] if size < BLOCK_BYTES else buf


def write_file(path: str, size_bytes: int, data: UniqueData) -> float:
    """Write ``size_bytes`` of unique data and fsync; returns seconds (open to close)."""
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i, off in enumerate(range(0, size_bytes, BLOCK_BYTES)):
            os.write(fd, data.block(i, min(BLOCK_BYTES, size_bytes - off)))
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def read_file(path: str) -> tuple:
    """Read a whole file sequentially; (seconds, bytes)."""
    buf = bytearray(BLOCK_BYTES)
    total = 0
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            total += n
    return time.perf_counter() - started, total


# --- PostgreSQL helpers -----------------------------------------------------------------------

def checkpoint(server: PgServer) -> None:
    server.psql("CHECKPOINT")


def tpcb(h: Harness, side: Side, server: PgServer, seconds: int, key: str,
         select_only: bool = False) -> dict:
    checkpoint(server)
    result: dict = {}
    with h.observe(side, result, key if side.kind == "cowfs" else None):
        run = server.pgbench(CLIENTS, seconds=seconds, extra_args=["-S"] if select_only else [])
    result.update(tps=run.tps, latency_ms=run.latency_avg_ms, transactions=run.transactions)
    return result


def settings(cfg: Config) -> dict:
    return dict(item.split("=", 1) for item in cfg.pg_settings)


def loaded_cluster(h: Harness, side: Side, cfg: Config) -> tuple:
    """initdb + start + pgbench -i; (cluster, seconds of pgbench -i)."""
    cluster = h.cluster(side, settings=settings(cfg))
    return cluster, timed(cluster.server.pgbench_init, cfg.scale)


def wal_lsn(server: PgServer) -> str:
    return server.psql("SELECT pg_current_wal_lsn()")


def wal_diff(server: PgServer, later: str, earlier: str) -> int:
    return int(float(server.psql(f"SELECT pg_wal_lsn_diff('{later}', '{earlier}')")))


# --- groups -----------------------------------------------------------------------------------

def bench_initdb(h: Harness, cfg: Config) -> list:
    sides = [h.plain_side(), h.cowfs_side()]
    metric = new_metric("initdb", "s", higher_is_better=False)
    for r in range(cfg.rounds):
        times, extra = {}, {}
        for side in ordered(r, sides):
            server = PgServer(h.pg_bin, os.path.join(side.root, f"initdb-{r}"))
            with h.observe(side, extra, "initdb" if side.kind == "cowfs" else None):
                times[side.kind] = timed(server.initdb)
        add_round(metric, times["plain"], times["cowfs"], **extra)
        log(f"initdb round {r}: plain {times['plain']:.2f} s, cowfs {times['cowfs']:.2f} s")
    h.unmount(sides[1].mount)
    return [metric]


def bench_pgbench(h: Harness, cfg: Config) -> list:
    """pgbench -i load time, TPC-B and select-only TPS, on one cluster per side."""
    sides = [h.plain_side(), h.cowfs_side()]
    clusters = {s.kind: h.cluster(s, settings=settings(cfg)) for s in sides}
    load = new_metric("pgbench_init", "s", higher_is_better=False, scale=cfg.scale)
    rw = new_metric("tpcb", "TPS", higher_is_better=True, scale=cfg.scale, clients=CLIENTS,
                    seconds=cfg.tpcb_s)
    ro = new_metric("select_only", "TPS", higher_is_better=True, scale=cfg.scale,
                    clients=CLIENTS, seconds=cfg.select_s)
    for r in range(cfg.rounds):
        t, extra = {}, {}
        for side in ordered(r, sides):
            with h.observe(side, extra, "pgbench_init" if side.kind == "cowfs" else None):
                t[side.kind] = timed(clusters[side.kind].server.pgbench_init, cfg.scale)
        add_round(load, t["plain"], t["cowfs"], **extra)
        for metric, seconds, select in ((rw, cfg.tpcb_s, False), (ro, cfg.select_s, True)):
            res = {s.kind: tpcb(h, s, clusters[s.kind].server, seconds, metric["name"], select)
                   for s in ordered(r, sides)}
            add_round(metric, res["plain"]["tps"], res["cowfs"]["tps"],
                      **{f"cowfs_{k}": v for k, v in res["cowfs"].items() if k != "tps"},
                      plain_latency_ms=res["plain"]["latency_ms"])
        log(f"pgbench round {r}: load {t['plain']:.1f}/{t['cowfs']:.1f} s, "
            f"tpcb {rw['rounds'][-1]['base']:.0f}/{rw['rounds'][-1]['value']:.0f} TPS, "
            f"select {ro['rounds'][-1]['base']:.0f}/{ro['rounds'][-1]['value']:.0f} TPS")
    for cluster in clusters.values():
        h.stop(cluster.server)
    h.unmount(sides[1].mount)
    return [load, rw, ro]


def bench_seqio(h: Harness, cfg: Config) -> list:
    sides = [h.plain_side(), h.cowfs_side()]
    data = UniqueData()
    wr = new_metric("seq_write", "MiB/s", higher_is_better=True, bytes=cfg.seq_bytes)
    rd = new_metric("seq_read", "MiB/s", higher_is_better=True, bytes=cfg.seq_bytes)
    dropped = True
    for r in range(cfg.rounds):
        w, rr, wx, rx = {}, {}, {}, {}
        for side in ordered(r, sides):
            path = os.path.join(side.root, f"seq-{r}")
            with h.observe(side, wx if side.kind == "cowfs" else {}, "seq_write"
                           if side.kind == "cowfs" else None):
                w[side.kind] = cfg.seq_bytes / MIB / write_file(path, cfg.seq_bytes, data)
            dropped = drop_caches() and dropped
            with h.observe(side, rx if side.kind == "cowfs" else {}, "seq_read"
                           if side.kind == "cowfs" else None):
                seconds, n = read_file(path)
            assert n == cfg.seq_bytes, f"read {n} bytes of {cfg.seq_bytes} from {path}"
            rr[side.kind] = n / MIB / seconds
            os.unlink(path)
        add_round(wr, w["plain"], w["cowfs"], **wx)
        add_round(rd, rr["plain"], rr["cowfs"], **rx)
        log(f"seqio round {r}: write {w['plain']:.0f}/{w['cowfs']:.0f} MiB/s, "
            f"read {rr['plain']:.0f}/{rr['cowfs']:.0f} MiB/s")
    rd["caches_dropped"] = dropped
    h.unmount(sides[1].mount)
    return [wr, rd]


FIO_ARGS = ["--name=rand8k", "--rw=randrw", "--rwmixread=50", "--bs=8k", "--ioengine=psync",
            "--numjobs=1", "--time_based", "--invalidate=1", "--end_fsync=1", "--randrepeat=0",
            "--refill_buffers", "--output-format=json"]


def fio_iops(path: str, size_bytes: int, seconds: int) -> dict:
    out = subprocess.run(["fio", f"--filename={path}", f"--size={size_bytes}",
                          f"--runtime={seconds}", *FIO_ARGS], capture_output=True, text=True,
                         timeout=seconds * 4 + 120, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return dict(iops=job["read"]["iops"] + job["write"]["iops"], read_iops=job["read"]["iops"],
                write_iops=job["write"]["iops"])


def python_iops(path: str, size_bytes: int, seconds: int) -> dict:
    """The fallback without fio: random 8 KiB pread/pwrite, 50/50, fdatasync at the end."""
    rng, pages = random.Random(), size_bytes // 8192
    data, reads, writes = UniqueData(1), 0, 0
    fd = os.open(path, os.O_RDWR)
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < seconds:
            off = rng.randrange(pages) * 8192
            if rng.random() < 0.5:
                os.pread(fd, 8192, off)
                reads += 1
            else:
                os.pwrite(fd, data.block(writes, 8192), off)
                writes += 1
        os.fdatasync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    return dict(iops=(reads + writes) / elapsed, read_iops=reads / elapsed, write_iops=writes / elapsed)


def bench_randio(h: Harness, cfg: Config) -> list:
    sides = [h.plain_side(), h.cowfs_side()]
    tool = "fio" if shutil.which("fio") else "python"
    metric = new_metric("rand_8k", "IOPS", higher_is_better=True, tool=tool,
                        file_bytes=cfg.rand_bytes, seconds=cfg.fio_s,
                        job="fio " + " ".join(FIO_ARGS) if tool == "fio" else
                        "python pread/pwrite 8 KiB, 50/50, fdatasync at end")
    if tool == "python":
        log("fio is not installed: random I/O falls back to a Python pread/pwrite loop")
    data = UniqueData(2)
    paths = {s.kind: os.path.join(s.root, "rand.dat") for s in sides}
    for side in sides:
        write_file(paths[side.kind], cfg.rand_bytes, data)
    run = fio_iops if tool == "fio" else python_iops
    for r in range(cfg.rounds):
        res, extra = {}, {}
        for side in ordered(r, sides):
            drop_caches()
            with h.observe(side, extra, "rand_8k" if side.kind == "cowfs" else None):
                res[side.kind] = run(paths[side.kind], cfg.rand_bytes, cfg.fio_s)
        add_round(metric, res["plain"]["iops"], res["cowfs"]["iops"],
                  **extra, **{f"cowfs_{k}": v for k, v in res["cowfs"].items() if k != "iops"})
        log(f"randio round {r}: plain {res['plain']['iops']:.0f}, cowfs {res['cowfs']['iops']:.0f} IOPS")
    h.unmount(sides[1].mount)
    return [metric]


def bench_snapshot(h: Harness, cfg: Config) -> list:
    """Snapshot and clone latency at two volume sizes (bench/snapshot_bench.py, reused)."""
    import snapshot_bench
    out = os.path.join(h.work, "snapshot-bench.json")
    snapshot_bench.main(["--small-mib", str(cfg.snap_small_mib), "--large-gib",
                         str(cfg.snap_large_gib), "--repeat", str(cfg.snap_repeat),
                         "--history", str(cfg.snap_history), "--dir", h.work, "--out", out])
    with open(out) as f:
        raw = json.load(f)
    small, large = raw["rows"]
    metrics = []
    for op in ("snapshot", "clone"):
        metric = new_metric(f"{op}_latency", "ms", higher_is_better=False,
                            base=f"{small['logical_bytes'] / MIB:.0f} MiB",
                            value=f"{large['logical_bytes'] / GIB:.1f} GiB",
                            small_max_ms=small[f"{op}_ms_max"], large_max_ms=large[f"{op}_ms_max"],
                            size_ratio=raw["size_ratio"], plain_copy_small_ms=raw["plain_copy_small_ms"],
                            history=raw["history"])
        add_round(metric, small[f"{op}_ms_median"], large[f"{op}_ms_median"])
        metrics.append(metric)
    return metrics


def _concurrent(*calls):
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(*call) for call in calls]
        return [f.result() for f in futures]


def _plain_pair(h: Harness, cfg: Config, pair: tuple, extra: dict) -> None:
    """The same on the plain disk: one cluster alone, then beside a second busy one."""
    (side_a, a), (side_b, b) = pair
    extra["plain_alone_tps"] = tpcb(h, side_a, a.server, cfg.tpcb_s, "plain_alone")["tps"]
    checkpoint(b.server)
    res_a, res_b = _concurrent((tpcb, h, side_a, a.server, cfg.tpcb_s, "plain_pair_a"),
                               (tpcb, h, side_b, b.server, cfg.tpcb_s, "plain_pair_b"))
    extra.update(plain_together_tps=res_a["tps"], plain_second_tps=res_b["tps"],
                 plain_pair_ratio=res_a["tps"] / extra["plain_alone_tps"])


def bench_clone_load(h: Harness, cfg: Config) -> list:
    """Live TPC-B alone vs. while a second server runs TPC-B on a clone of it.

    For reference, the same on the plain disk with two independent clusters
    of the same size (a plain directory has no clone): what this machine
    gives a second busy server without cowfs (``plain_pair_ratio``).
    """
    from cowfs import admin
    from cowfs.store import Store
    side = h.cowfs_side("cowfs-live")
    live, _ = loaded_cluster(h, side, cfg)
    plain_sides = [h.plain_side("plain-live"), h.plain_side("plain-second")]
    pair = tuple((s, loaded_cluster(h, s, cfg)[0]) for s in plain_sides)
    metric = new_metric("live_with_clone", "TPS", higher_is_better=True, base="live alone",
                        value="live + clone busy", seconds=cfg.tpcb_s)
    for r in range(cfg.rounds):
        alone = together = None
        extra: dict = {}
        for mode in ordered(r, ["alone", "together", "plain"]):
            if mode == "plain":
                _plain_pair(h, cfg, pair, extra)
                continue
            if mode == "alone":
                alone = tpcb(h, side, live.server, cfg.tpcb_s, "live_alone")["tps"]
                continue
            name = f"rehearsal{r}"
            store = Store.open(side.store)
            try:
                extra["clone_s"] = timed(admin.clone, store, "main", name)
            finally:
                store.close()
            mount = h.mount(side.store, os.path.join(h.work, f"clone-{r}-mnt"), name, f"cowfs-clone{r}")
            clone_side = Side("cowfs", f"clone{r}", mount.path, mount, side.store)
            data_dir = os.path.join(mount.path, "pgdata")
            os.unlink(os.path.join(data_dir, "postmaster.pid"))   # the live server's, copied
            clone = PgServer(h.pg_bin, data_dir)
            extra["clone_start_s"] = timed(h.start, clone, settings(cfg))
            checkpoint(live.server)
            live_res, clone_res = _concurrent(
                (tpcb, h, side, live.server, cfg.tpcb_s, "live_with_clone"),
                (tpcb, h, clone_side, clone, cfg.tpcb_s, "clone_side"))
            together = live_res["tps"]
            extra.update(clone_tps=clone_res["tps"], live_daemon_cpu_util=live_res.get("daemon_cpu_util"),
                         clone_daemon_cpu_util=clone_res.get("daemon_cpu_util"))
            h.stop(clone)
            h.unmount(mount)
            store = Store.open(side.store)
            try:
                admin.destroy(store, name)
            finally:
                store.close()
        add_round(metric, alone, together, **extra)
        log(f"clone_load round {r}: live alone {alone:.0f} TPS, with busy clone {together:.0f} "
            f"(clone {extra['clone_tps']:.0f}); plain alone {extra['plain_alone_tps']:.0f}, "
            f"beside a second {extra['plain_together_tps']:.0f}")
    for _side, cluster in pair:
        h.stop(cluster.server)
    h.stop(live.server)
    h.unmount(side.mount)
    return [metric]


def bench_snapshots24(h: Harness, cfg: Config) -> list:
    """Stored bytes per snapshot under TPC-B load, against the WAL written meanwhile."""
    from cowfs import admin, reports
    from cowfs.store import Store
    side = h.cowfs_side("cowfs-snaps")
    cluster, _ = loaded_cluster(h, side, cfg)
    server = cluster.server
    store = Store.open(side.store)
    try:
        admin.snapshot(store, "main@before")              # flushes everything buffered
        df0, disk0, lsn0 = reports.df(store), disk_bytes(side.store), wal_lsn(server)
        seconds = int(cfg.snapshots * cfg.snap_interval_s + 2)
        proc = h.track(server.popen("pgbench", *server.connection_args(), "-c", str(CLIENTS),
                                    "-j", "2", "-T", str(seconds), "postgres",
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        latencies = []
        started = time.monotonic()
        for i in range(cfg.snapshots):
            time.sleep(max(0.0, started + (i + 1) * cfg.snap_interval_s - time.monotonic()))
            latencies.append(timed(admin.snapshot, store, f"main@load{i}") * 1000)
        output, _ = proc.communicate(timeout=seconds * 4 + 120)
        h.end(proc)
        bench = parse_pgbench(output)
        lsn1 = wal_lsn(server)
        admin.snapshot(store, "main@after")
        df1, disk1 = reports.df(store), disk_bytes(side.store)
        wal = wal_diff(server, lsn1, lsn0)
    finally:
        store.close()
    h.stop(server)
    h.unmount(side.mount)
    n = cfg.snapshots
    chunk_growth = df1["chunk_bytes"] - df0["chunk_bytes"]
    pinned = sum(i["frees_bytes"] for i in df1["items"] if "@load" in i["name"])
    lat = sorted(latencies)
    info = dict(name="snapshots_under_load", snapshots=n, interval_s=cfg.snap_interval_s,
                pgbench_tps=bench.tps, wal_bytes=wal, wal_bytes_per_snapshot=wal / n,
                referenced_chunk_growth_bytes=chunk_growth,
                stored_bytes_per_snapshot=chunk_growth / n,
                stored_per_wal=chunk_growth / wal if wal else None,
                disk_growth_bytes=disk1 - disk0, frees_if_destroyed_each_sum_bytes=pinned,
                snapshot_ms_median=lat[len(lat) // 2], snapshot_ms_max=lat[-1],
                snapshot_ms_all=[round(x, 2) for x in latencies])
    log(f"snapshots24: {n} snapshots, WAL {wal / MIB:.1f} MiB, referenced chunks +{chunk_growth / MIB:.1f} MiB, "
        f"disk +{(disk1 - disk0) / MIB:.1f} MiB, snapshot latency median {info['snapshot_ms_median']:.1f} ms")
    return [info]


def bench_chunks(h: Harness, cfg: Config) -> list:
    """TPC-B and sequential write at each chunk size, each against plain in the same round."""
    sides = [h.plain_side("plain-chunks")] + [h.cowfs_side(f"cowfs-{cs // 1024}k", cs)
                                              for cs in cfg.chunk_sizes]
    clusters = {}
    loads = {}
    for side in sides:
        clusters[side.label], loads[side.label] = loaded_cluster(h, side, cfg)
    stored = {s.label: disk_bytes(s.store) for s in sides if s.store}
    rows = {s.label: dict(chunk_size=s.chunk_size, tpcb=[], seq_write=[],
                          load_s=loads[s.label], store_bytes_after_load=stored.get(s.label))
            for s in sides[1:]}
    data = UniqueData(3)
    for r in range(cfg.rounds):
        tps, mbs = {}, {}
        for side in ordered(r, sides):
            tps[side.label] = tpcb(h, side, clusters[side.label].server, cfg.chunk_tpcb_s,
                                   f"tpcb-{side.label}")["tps"]
        for side in ordered(r, sides):
            path = os.path.join(side.root, f"seq-{r}")
            mbs[side.label] = cfg.seq_bytes / MIB / write_file(path, cfg.seq_bytes, data)
            os.unlink(path)
        base = sides[0].label
        for label, row in rows.items():
            row["tpcb"].append(dict(base=tps[base], value=tps[label], ratio=tps[label] / tps[base]))
            row["seq_write"].append(dict(base=mbs[base], value=mbs[label], ratio=mbs[label] / mbs[base]))
        log("chunks round %d: TPS %s; MiB/s %s" % (r, {k: round(v) for k, v in tps.items()},
                                                  {k: round(v) for k, v in mbs.items()}))
    for side in sides:
        h.stop(clusters[side.label].server)
        if side.mount:
            rows[side.label]["store_bytes_end"] = disk_bytes(side.store)
            h.unmount(side.mount)
    return [dict(name="chunk_sizes", rows=list(rows.values()), tpcb_seconds=cfg.chunk_tpcb_s,
                 seq_bytes=cfg.seq_bytes)]


GROUPS = {
    "initdb": bench_initdb,
    "pgbench": bench_pgbench,
    "seqio": bench_seqio,
    "randio": bench_randio,
    "snapshot": bench_snapshot,
    "clone_load": bench_clone_load,
    "snapshots24": bench_snapshots24,
    "chunks": bench_chunks,
}

ALIASES = {"pgbench_init": "pgbench", "tpcb": "pgbench", "select_only": "pgbench",
           "seq_write": "seqio", "seq_read": "seqio", "rand_8k": "randio", "fio": "randio",
           "snapshot_latency": "snapshot", "clone_latency": "snapshot",
           "live_with_clone": "clone_load", "chunk_sizes": "chunks"}
