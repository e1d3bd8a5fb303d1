"""`cowfs send` against `tar` of the same data directory, and incremental size against the WAL.

A PostgreSQL 14 cluster (`pgbench -i -s SCALE`) lives on a cowfs mount.
Snapshot s1; pgbench runs LOAD_S seconds; snapshot s2. The WAL PostgreSQL
wrote between the two snapshots is measured from the server's LSNs.

* Throughput: a full stream of s1 written to a file on the same disk, with
  the page cache dropped first, against `tar -cf` of the same data directory
  (a plain copy of s1 on the same disk: what backing up without cowfs reads),
  and against `tar` through a read-only mount of s1. Median of ROUNDS rounds,
  interleaved. Reported as MiB/s of the data directory's logical size.
* Size: the incremental stream s1 -> s2 against the WAL written in between
  and against the full stream (the volume).
* Receive: the full and the incremental stream into a second store on the
  same disk, timed.

    .venv/bin/python bench/send_bench.py [--scale 20] [--load-s 30] [--rounds 3] [--dir /var/tmp]

Writes bench/results/send-<date>.json and .md (--stem to name them otherwise).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import MIB, REPO, Mount, cowfs_cli, drop_caches, log, pg_bin_dir  # noqa: E402

from cowfs.pg import PgServer, free_port  # noqa: E402


def timed(func) -> float:
    drop_caches()
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def run(*cmd) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def tree_bytes(path: str) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _dirs, files in os.walk(path) for f in files)


def build(work: str, args) -> tuple[str, dict]:
    """Store with main@s1 and main@s2 of a cluster under load; returns (store, WAL figures)."""
    store = os.path.join(work, "store")
    cowfs_cli("init", store)
    mount = Mount(store, os.path.join(work, "mnt")).mount()
    server = PgServer(pg_bin_dir("14"), os.path.join(mount.path, "pgdata"))
    try:
        server.initdb()
        server.start(free_port(), os.path.join(work, "pgrun"))
        log(f"pgbench -i -s {args.scale}")
        server.pgbench_init(args.scale)
        server.psql("CHECKPOINT")
        lsn1 = server.psql("SELECT pg_current_wal_lsn()")
        cowfs_cli("snapshot", store, "main@s1")
        log(f"pgbench {args.load_s} s")
        result = server.pgbench(4, seconds=args.load_s, extra_args=["-n"])
        lsn2 = server.psql("SELECT pg_current_wal_lsn()")
        cowfs_cli("snapshot", store, "main@s2")
        wal = int(server.psql(f"SELECT pg_wal_lsn_diff('{lsn2}', '{lsn1}')"))
        return store, dict(wal_bytes=wal, pgbench_transactions=result.transactions)
    finally:
        server.stop("fast")
        mount.close()


def throughput(work: str, store: str, rounds: int) -> dict:
    """Seconds per round: full send, tar of a plain copy, tar through a read-only mount."""
    snap = Mount(store, os.path.join(work, "s1"), "main@s1").mount()
    plain = os.path.join(work, "plain-pgdata")
    try:
        run("cp", "-a", os.path.join(snap.path, "pgdata"), plain)
        logical = tree_bytes(plain)
        out = os.path.join(work, "out")
        times = dict(send=[], tar_plain=[], tar_cowfs=[])
        for n in range(rounds):
            for name, cmd in (("send", [sys.executable, "-m", "cowfs", "send", store, "main@s1", "-o", out, "--json"]),
                              ("tar_plain", ["tar", "-cf", out, "-C", plain, "."]),
                              ("tar_cowfs", ["tar", "-cf", out, "-C", os.path.join(snap.path, "pgdata"), "."])):
                if os.path.exists(out):
                    os.unlink(out)
                times[name].append(timed(lambda: subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)))
            log(f"round {n + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    finally:
        snap.close()
        shutil.rmtree(plain, ignore_errors=True)
    return dict(logical_bytes=logical, seconds=times,
                mib_s={k: round(logical / MIB / statistics.median(v), 1) for k, v in times.items()})


def incremental(work: str, store: str) -> dict:
    full, inc = os.path.join(work, "s1.cows"), os.path.join(work, "s2.cows")
    cowfs_cli("send", store, "main@s1", "-o", full)
    cowfs_cli("send", store, "main@s2", "--from", "main@s1", "-o", inc)
    second = os.path.join(work, "second")
    cowfs_cli("init", second)
    cowfs_cli("destroy", second, "main")
    receive_full = timed(lambda: cowfs_cli("receive", second, "--input", full))
    receive_inc = timed(lambda: cowfs_cli("receive", second, "--input", inc))
    same = all(cowfs_cli("digest", s, snap).stdout.split()[0] == cowfs_cli("digest", store, snap).stdout.split()[0]
               for s in (second,) for snap in ("main@s1", "main@s2"))
    return dict(full_stream_bytes=os.path.getsize(full), incremental_stream_bytes=os.path.getsize(inc),
                receive_full_s=round(receive_full, 2), receive_incremental_s=round(receive_inc, 2),
                digests_equal=same)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=20)
    parser.add_argument("--load-s", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp", help="where the stores go (the disk measured)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--stem", default=f"send-{time.strftime('%Y%m%d', time.gmtime())}",
                        help="file names of the results (STEM.json, STEM.md)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="cowfs-send-bench-", dir=args.dir)
    os.chmod(work, 0o755)
    try:
        store, wal = build(work, args)
        speed = throughput(work, store, args.rounds)
        sizes = incremental(work, store)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), config=vars(args),
                  git=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, cwd=REPO).stdout.strip(),
                  load_avg=os.getloadavg(), **wal, **speed, **sizes)
    report["incremental_per_wal_byte"] = round(sizes["incremental_stream_bytes"] / wal["wal_bytes"], 3)
    report["incremental_per_full"] = round(sizes["incremental_stream_bytes"] / sizes["full_stream_bytes"], 4)
    stem = os.path.join(args.out, args.stem)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    mib = r["mib_s"]
    return (f"# cowfs send, {r['date']} (commit {r['git']}, load average {r['load_avg'][0]:.1f})\n\n"
            f"pgbench scale {r['config']['scale']}: data directory {r['logical_bytes'] / MIB:.0f} MiB, "
            f"full stream {r['full_stream_bytes'] / MIB:.0f} MiB; median of {r['config']['rounds']} rounds, "
            "page cache dropped before each.\n\n"
            "| what | MiB/s of the data directory | ratio to tar of a plain copy |\n|---|---|---|\n"
            f"| cowfs send (full) | {mib['send']} | {mib['send'] / mib['tar_plain']:.2f} |\n"
            f"| tar, plain copy on the same disk | {mib['tar_plain']} | 1.00 |\n"
            f"| tar through a read-only cowfs mount | {mib['tar_cowfs']} | {mib['tar_cowfs'] / mib['tar_plain']:.2f} |\n\n"
            f"pgbench {r['config']['load_s']} s between s1 and s2 ({r['pgbench_transactions']} transactions): "
            f"WAL written {r['wal_bytes'] / MIB:.1f} MiB, incremental stream "
            f"{r['incremental_stream_bytes'] / MIB:.1f} MiB ({r['incremental_per_wal_byte']} per WAL byte, "
            f"{100 * r['incremental_per_full']:.1f} % of the full stream). Receive into a second store: "
            f"full {r['receive_full_s']} s, incremental {r['receive_incremental_s']} s; digests equal: "
            f"{r['digests_equal']}.\n")


if __name__ == "__main__":
    sys.exit(main())
