"""Issue 16's figures: a cowfs standby of a primary on a plain directory.

``follow`` (figures ``base_backup``, ``base_backup_follow``, ``replay_lag``), on one
primary (plain directory, ``pgbench -i -s follow_scale``):

base_backup
    the same ``pg_basebackup -X stream -c fast`` (with its own fsync of every
    file) into a plain directory and into a fresh cowfs store, interleaved
    round by round; MiB/s of the data directory it reports, ratio cowfs / plain.
base_backup_follow
    the copy as `cowfs pg follow` makes it: ``--no-sync``, then one snapshot
    that makes the volume durable (docs/postgres.md), against the same plain
    figure of the round.
replay_lag
    two standbys of the primary at once, one in a plain directory
    (``pg_basebackup -R``), one on cowfs made by ``cowfs pg follow``; the
    suite's TPC-B load (4 clients, ``tpcb_s``) on the primary; every 0.25 s
    the primary's WAL position is read, then each standby's replay position:
    the bytes between them. Reported: the mean over the samples of each
    round (plain standby as the base), median and largest, and the primary's
    ``replay_lag`` seconds (pg_stat_replication) beside them.
"""

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

from harness import MIB, REPO, Harness, log
from workloads import CLIENTS, Config, add_round, checkpoint, new_metric, ordered, settings

from cowfs.pg import PgServer, free_port

SAMPLE_EVERY_S = 0.25
PLAIN_SLOT = "bench_plain"


def _conninfo(primary: PgServer) -> str:
    return f"host={primary.socket_dir} port={primary.port} user=postgres"


def _target(root: str, name: str, primary: PgServer) -> PgServer:
    """An empty directory for a copy, owned by the user pg_basebackup runs as."""
    path = os.path.join(root, name)
    os.mkdir(path, 0o700)
    owner = primary.owner_ids()
    if owner is not None:
        os.chown(path, *owner)
    return PgServer(primary.bin_dir, path)


def _copy_s(primary: PgServer, target: PgServer, *extra) -> float:
    started = time.perf_counter()
    target.run("pg_basebackup", "-d", _conninfo(primary), "-D", target.data_dir, "-X", "stream",
               "-c", "fast", *extra, timeout_s=3600, what="pg_basebackup")
    return time.perf_counter() - started


def _db_bytes(primary: PgServer) -> int:
    return int(primary.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))


def _cowfs_copy(h: Harness, primary: PgServer, r: int, follow_way: bool) -> float:
    """Seconds for one copy into a fresh store (a second copy into one store would dedup)."""
    from cowfs import admin
    from cowfs.store import Store
    side = h.cowfs_side(f"cowfs-bb{r}{'f' if follow_way else ''}")
    target = _target(side.root, "pgdata", primary)
    try:
        if not follow_way:
            return _copy_s(primary, target)
        seconds = _copy_s(primary, target, "--no-sync")
        store = Store.open(side.store)
        try:
            started = time.perf_counter()
            admin.snapshot(store, "main@base-backup")
            return seconds + time.perf_counter() - started
        finally:
            store.close()
    finally:
        h.unmount(side.mount)
        shutil.rmtree(side.store, ignore_errors=True)


def bench_base_backup(h: Harness, cfg: Config, primary: PgServer) -> list:
    size = _db_bytes(primary)
    same = new_metric("base_backup", "MiB/s", higher_is_better=True, bytes=size,
                      command="pg_basebackup -X stream -c fast (fsync of every file)")
    follow_way = new_metric("base_backup_follow", "MiB/s", higher_is_better=True, bytes=size,
                            value="cowfs pg follow's copy",
                            command="pg_basebackup -X stream -c fast --no-sync, then one snapshot")
    plain_side = h.plain_side("plain-bb")
    for r in range(cfg.rounds):
        seconds = {}
        for kind in ordered(r, ["plain", "cowfs", "follow"]):
            if kind == "plain":
                target = _target(plain_side.root, f"pgdata-{r}", primary)
                seconds[kind] = _copy_s(primary, target)
                shutil.rmtree(target.data_dir)
            else:
                seconds[kind] = _cowfs_copy(h, primary, r, follow_way=kind == "follow")
        rate = {k: size / MIB / s for k, s in seconds.items()}
        add_round(same, rate["plain"], rate["cowfs"])
        add_round(follow_way, rate["plain"], rate["follow"])
        log(f"base_backup round {r}: plain {rate['plain']:.0f} MiB/s, cowfs {rate['cowfs']:.0f}, "
            f"cowfs as follow copies {rate['follow']:.0f}")
    return [same, follow_way]


# --- replay lag ------------------------------------------------------------------------------------

class LagSampler:
    """Bytes each standby has not replayed of the primary's WAL, sampled while load runs."""

    def __init__(self, primary: PgServer, standbys: dict):
        self.primary, self.standbys = primary, standbys
        self.bytes = {name: [] for name in standbys}
        self.seconds = {name: [] for name in standbys}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "LagSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            rows = self.primary.psql(
                "SELECT s.slot_name, pg_current_wal_lsn(), extract(epoch FROM r.replay_lag) "
                "FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid")
            for row in rows.splitlines():
                slot, lsn, lag_s = row.split("|")
                standby = self.standbys.get(slot)
                if standby is None:
                    continue
                self.bytes[slot].append(int(float(standby.psql(
                    f"SELECT greatest(0, pg_wal_lsn_diff('{lsn}', pg_last_wal_replay_lsn()))"))))
                self.seconds[slot].append(float(lag_s) if lag_s else 0.0)


def _cowfs_standby(h: Harness, primary: PgServer, taken: tuple) -> PgServer:
    """A standby made by `cowfs pg follow`; the caller stops it."""
    side = h.cowfs_side("cowfs-standby")
    port = free_port(exclude=taken)
    socket_dir = os.path.join(h.work, f"run-{port}")
    result = subprocess.run([sys.executable, "-m", "cowfs", "pg", "follow", side.store, "main",
                             "--primary", _conninfo(primary), "--pgdata", "pgdata", "--bin",
                             h.pg_bin, "--mountpoint", side.root, "--port", str(port),
                             "--socket-dir", socket_dir], capture_output=True, text=True,
                            cwd=REPO, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"cowfs pg follow failed: {(result.stderr or result.stdout).strip()}")
    standby = PgServer(h.pg_bin, os.path.join(side.root, "pgdata"))
    standby.port, standby.socket_dir = port, socket_dir
    return standby


def _plain_standby(h: Harness, primary: PgServer) -> PgServer:
    target = _target(h.plain_side("plain-standby").root, "pgdata", primary)
    target.run("pg_basebackup", "-d", _conninfo(primary), "-D", target.data_dir, "-X", "stream",
               "-c", "fast", "-C", "-S", PLAIN_SLOT, "-R", timeout_s=3600, what="pg_basebackup")
    h.start(target, {"hot_standby": "on"})
    return target


def bench_replay_lag(h: Harness, cfg: Config, primary: PgServer) -> list:
    plain = _plain_standby(h, primary)
    cowfs_standby = _cowfs_standby(h, primary, (primary.port, plain.port))
    try:
        return [_measure_lag(cfg, primary, {PLAIN_SLOT: plain, "cowfs_main": cowfs_standby})]
    finally:
        h.stop(cowfs_standby)
        h.stop(plain)


def _measure_lag(cfg: Config, primary: PgServer, standbys: dict) -> dict:
    metric = new_metric("replay_lag", "bytes", higher_is_better=False, base="plain standby",
                        value="cowfs standby", clients=CLIENTS, seconds=cfg.tpcb_s,
                        sample_every_s=SAMPLE_EVERY_S)
    for r in range(cfg.rounds):
        checkpoint(primary)
        with LagSampler(primary, standbys) as lag:
            run = primary.pgbench(CLIENTS, seconds=cfg.tpcb_s)
        b, s = lag.bytes, lag.seconds
        # The mean, not the median: a standby keeps up most of the time (median 0 here),
        # and what matters is how far and how often it falls behind.
        add_round(metric, statistics.mean(b[PLAIN_SLOT]), statistics.mean(b["cowfs_main"]),
                  primary_tps=run.tps, samples=len(b["cowfs_main"]),
                  plain_median_bytes=statistics.median(b[PLAIN_SLOT]),
                  cowfs_median_bytes=statistics.median(b["cowfs_main"]),
                  plain_max_bytes=max(b[PLAIN_SLOT]), cowfs_max_bytes=max(b["cowfs_main"]),
                  plain_replay_lag_s_median=statistics.median(s[PLAIN_SLOT]),
                  cowfs_replay_lag_s_median=statistics.median(s["cowfs_main"]),
                  plain_replay_lag_s_max=max(s[PLAIN_SLOT]), cowfs_replay_lag_s_max=max(s["cowfs_main"]))
        row = metric["rounds"][-1]
        log(f"replay_lag round {r}: primary {run.tps:.0f} TPS; mean lag plain {row['base']:.0f} B "
            f"(max {row['plain_max_bytes']}), cowfs {row['value']:.0f} B (max "
            f"{row['cowfs_max_bytes']}); replay_lag median/max plain "
            f"{row['plain_replay_lag_s_median']:.3f}/{row['plain_replay_lag_s_max']:.3f} s, cowfs "
            f"{row['cowfs_replay_lag_s_median']:.3f}/{row['cowfs_replay_lag_s_max']:.3f} s")
    return metric


def bench_follow(h: Harness, cfg: Config) -> list:
    primary = h.cluster(h.plain_side("plain-primary"), settings=settings(cfg)).server
    primary.pgbench_init(cfg.follow_scale)
    try:
        return bench_base_backup(h, cfg, primary) + bench_replay_lag(h, cfg, primary)
    finally:
        h.stop(primary)


GROUPS = {"follow": bench_follow}
ALIASES = {"base_backup": "follow", "base_backup_follow": "follow", "replay_lag": "follow"}
