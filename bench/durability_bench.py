"""Issue 14's two proofs: device flushes per commit, and clone to ready.

``flushes`` (figure ``flushes_per_commit``): a single-client pgbench TPC-B
run of a fixed number of transactions, plain directory vs cowfs, both on one
ext4 image of their own on a loop device (`harness.LoopDisk`), so that
``/sys/block/<loop>/stat`` field 16 counts the flush requests of this run
only. A probe first checks that the counter moves (an 8 KiB overwrite +
fdatasync is one flush) and records what an append costs. The figure of a
side is flushes / committed transactions; the issue's target is on the cowfs
figure itself (<= 1.1), the ratio to plain is reported beside it.

``clone_ready`` (figure ``clone_to_ready``): one crash image -- a snapshot
taken under pgbench load right after a large ``pgbench -i`` -- recovered by
PostgreSQL on a fresh cowfs clone and on a plain copy of the same image
(``cp -a`` from a read-only mount of the snapshot), caches dropped before
each start; time from server start to accepting connections (``pg_ctl start
-w``), plus the redo volume and PostgreSQL's own redo time from its log.
"""

import contextlib
import os
import re
import shutil
import subprocess
import time

from harness import GIB, MIB, Harness, Side, drop_caches, log
from workloads import CLIENTS, Config, add_round, checkpoint, new_metric, ordered, settings, timed

from cowfs.pg import PgServer

FLUSH_DISK_BYTES = 8 * GIB           # sparse: only what the two clusters write is allocated
PROBE_WRITES = 20
PROBE_BLOCK_BYTES = 8192


# --- flushes per commit -----------------------------------------------------------------------

def flush_probe(disk) -> dict:
    """Flushes per 8 KiB overwrite + fdatasync and per 8 KiB append + fdatasync on `disk`."""
    path = os.path.join(disk.mountpoint, "flush-probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, bytes(PROBE_WRITES * PROBE_BLOCK_BYTES))
        os.fsync(fd)
        out = {}
        for kind, base in (("overwrite_fdatasync", 0), ("append_fdatasync", PROBE_WRITES * PROBE_BLOCK_BYTES)):
            before = disk.stat()["flush_ios"]
            for i in range(PROBE_WRITES):
                os.pwrite(fd, os.urandom(PROBE_BLOCK_BYTES), base + i * PROBE_BLOCK_BYTES)
                os.fdatasync(fd)
            out[kind] = (disk.stat()["flush_ios"] - before) / PROBE_WRITES
    finally:
        os.close(fd)
        os.unlink(path)
    if out["overwrite_fdatasync"] < 1:
        raise RuntimeError(f"{disk.device} counts no flush requests (probe {out}); "
                           "flushes per commit cannot be measured on it")
    return out


def flush_settings(cfg: Config) -> dict:
    # No autovacuum: the count is of commits, not of vacuum runs that may or may not fall in.
    return {"autovacuum": "off", **settings(cfg)}


def count_flushes(h: Harness, side: Side, server: PgServer, disk, transactions: int) -> dict:
    """One single-client pgbench run of `transactions`; device counters per committed one."""
    checkpoint(server)
    result: dict = {}
    before = disk.stat()
    with h.observe(side, result):
        run = server.pgbench(1, transactions=transactions, extra_args=["-n"])
    after = disk.stat()
    n = run.transactions
    result.update(transactions=n, tps=run.tps, flushes=after["flush_ios"] - before["flush_ios"],
                  flushes_per_commit=(after["flush_ios"] - before["flush_ios"]) / n,
                  write_ios_per_commit=(after["write_ios"] - before["write_ios"]) / n,
                  write_bytes_per_commit=(after["write_bytes"] - before["write_bytes"]) / n)
    return result


def bench_flushes(h: Harness, cfg: Config) -> list:
    disk = h.loop_disk("flushdisk", FLUSH_DISK_BYTES)
    probe = flush_probe(disk)
    log(f"flushes: {disk.device} ({FLUSH_DISK_BYTES // GIB} GiB ext4 image); probe: {probe}")
    sides = [h.plain_side("plain-flush", base=disk.mountpoint),
             h.cowfs_side("cowfs-flush", base=disk.mountpoint)]
    servers = {s.kind: h.cluster(s, settings=flush_settings(cfg)).server for s in sides}
    for server in servers.values():
        server.pgbench_init(cfg.scale)
    metric = new_metric("flushes_per_commit", "flushes", higher_is_better=False, device=disk.device,
                        image_bytes=FLUSH_DISK_BYTES, transactions=cfg.flush_transactions, clients=1,
                        scale=cfg.scale, probe=probe, pg_settings=flush_settings(cfg))
    for r in range(cfg.rounds):
        res = {s.kind: count_flushes(h, s, servers[s.kind], disk, cfg.flush_transactions)
               for s in ordered(r, sides)}
        add_round(metric, res["plain"]["flushes_per_commit"], res["cowfs"]["flushes_per_commit"],
                  plain=res["plain"], cowfs=res["cowfs"])
        log(f"flushes round {r}: per commit plain {res['plain']['flushes_per_commit']:.2f}, "
            f"cowfs {res['cowfs']['flushes_per_commit']:.2f} (TPS {res['plain']['tps']:.0f}/"
            f"{res['cowfs']['tps']:.0f})")
    for server in servers.values():
        h.stop(server)
    h.unmount(sides[1].mount)
    h.close_loop(disk)
    return [metric]


# --- clone to ready ---------------------------------------------------------------------------

_REDO_START = re.compile(r"redo starts at ([0-9A-F]+)/([0-9A-F]+)")
_REDO_DONE = re.compile(r"redo done at ([0-9A-F]+)/([0-9A-F]+)(?:.*elapsed: ([0-9.]+) s)?")


def redo_from_log(path: str) -> dict:
    """Redo bytes and PostgreSQL's own redo time, from the server log of one start."""
    with open(path, errors="replace") as f:
        text = f.read()
    start, done = _REDO_START.search(text), _REDO_DONE.search(text)
    if start is None or done is None:
        return dict(redo_bytes=0, redo_elapsed_s=None, redo="not required" if start is None else "unfinished")
    lsn = lambda m: (int(m.group(1), 16) << 32) | int(m.group(2), 16)  # noqa: E731
    return dict(redo_bytes=lsn(done) - lsn(start),
                redo_elapsed_s=float(done.group(3)) if done.group(3) else None)


def crash_image(h: Harness, cfg: Config) -> tuple:
    """A store whose main@crash is a snapshot under TPC-B load right after pgbench -i."""
    from cowfs import admin
    from cowfs.store import Store
    side = h.cowfs_side("cowfs-crash")
    server = h.cluster(side, settings=settings(cfg)).server
    load_s = timed(server.pgbench_init, cfg.clone_scale)
    proc = h.track(server.popen("pgbench", *server.connection_args(), "-n", "-c", str(CLIENTS), "-j", "2",
                                "-T", str(cfg.clone_load_s * 3), "postgres",
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(cfg.clone_load_s)
    store = Store.open(side.store)
    try:
        admin.snapshot(store, "main@crash")
    finally:
        store.close()
    h.end(proc)
    h.stop(server)
    h.unmount(side.mount)
    return side.store, load_s


def start_measured(h: Harness, data_dir: str, cfg: Config, side: Side, extra: dict, prefix: str) -> float:
    """Start a server on a crash image with cold caches; seconds to accepting connections."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(data_dir, "postmaster.pid"))     # the crashed server's
    server = PgServer(h.pg_bin, data_dir)
    extra[f"{prefix}_caches_dropped"] = drop_caches()
    observed: dict = {}
    with h.observe(side, observed, profile_key="clone_ready" if side.kind == "cowfs" else None):
        seconds = timed(h.start, server, settings(cfg))
    extra.update({f"{prefix}_{k}": v for k, v in {**redo_from_log(server.log_path), **observed}.items()})
    h.stop(server)
    return seconds


def bench_clone_ready(h: Harness, cfg: Config) -> list:
    from cowfs import admin
    from cowfs.store import Store
    store_path, load_s = crash_image(h, cfg)
    snap = h.mount(store_path, os.path.join(h.work, "crash-snap-mnt"), "main@crash", "cowfs-crash-snap")
    plain = h.plain_side("plain-crash")
    metric = new_metric("clone_to_ready", "s", higher_is_better=False, base="plain copy",
                        value="cowfs clone", scale=cfg.clone_scale, load_under_snapshot_s=cfg.clone_load_s,
                        pgbench_init_s=load_s)
    for r in range(cfg.rounds):
        times, extra = {}, {}
        for kind in ordered(r, ["plain", "cowfs"]):
            if kind == "plain":
                data_dir = os.path.join(plain.root, f"pgdata-{r}")
                extra["plain_copy_s"] = timed(subprocess.run, ["cp", "-a", os.path.join(snap.path, "pgdata"),
                                                               data_dir], check=True)
                times["plain"] = start_measured(h, data_dir, cfg, plain, extra, "plain")
                shutil.rmtree(data_dir)
                continue
            name = f"ready{r}"
            store = Store.open(store_path)
            try:
                extra["clone_s"] = timed(admin.clone, store, "main@crash", name)
            finally:
                store.close()
            mount = h.mount(store_path, os.path.join(h.work, f"{name}-mnt"), name, f"cowfs-{name}")
            side = Side("cowfs", name, mount.path, mount, store_path)
            times["cowfs"] = start_measured(h, os.path.join(mount.path, "pgdata"), cfg, side, extra, "cowfs")
            h.unmount(mount)
            store = Store.open(store_path)
            try:
                admin.destroy(store, name)
            finally:
                store.close()
        add_round(metric, times["plain"], times["cowfs"], **extra)
        log(f"clone_ready round {r}: plain copy {times['plain']:.2f} s, cowfs clone {times['cowfs']:.2f} s; "
            f"redo {extra.get('cowfs_redo_bytes', 0) / MIB:.0f} MiB")
    h.unmount(snap)
    return [metric]


GROUPS = {"flushes": bench_flushes, "clone_ready": bench_clone_ready}
ALIASES = {"flushes_per_commit": "flushes", "clone_to_ready": "clone_ready"}
