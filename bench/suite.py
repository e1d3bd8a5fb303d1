"""The cowfs benchmark suite: every workload on a plain directory and on cowfs, as ratios.

    bash tools/bench.sh                       # set up, then everything (about 24 minutes)
    .venv/bin/python bench/suite.py --quick   # tiny sizes, one round: a smoke run
    .venv/bin/python bench/suite.py --only pgbench,seqio --rounds 5
    .venv/bin/python bench/suite.py --only tpcb,seq_write --rounds 1 --profile

Each workload runs on a plain directory and on a cowfs mount of a store in
the same directory of the same disk (``--dir``, default /var/tmp), in the
same run, interleaved round by round (A B, then B A, ...). The figure of a
round is the ratio cowfs / plain of that round; the suite reports the
median over rounds and compares it with the targets of issue 7
(`report.TARGETS`). Outputs, in ``--out`` (default bench/results/):
suite-<UTC date>.json, suite-<UTC date>.md and suite-<UTC date>-*.png.

Groups (``--only`` takes group or figure names): initdb; pgbench (pgbench_init,
tpcb, select_only); seqio (seq_write, seq_read); randio (rand_8k, fio);
snapshot (snapshot_latency, clone_latency: bench/snapshot_bench.py);
clone_load (live_with_clone); snapshots24 (stored bytes per snapshot vs WAL);
chunks (TPC-B and sequential write at chunk sizes 8-64 KiB); flushes
(flushes_per_commit: device flushes per single-client TPC-B commit, on a loop
device of its own) and clone_ready (clone_to_ready: crash recovery of one
crash image on a cowfs clone vs a plain copy), both in bench/durability_bench.py.
The daemons' peak RSS (VmHWM) is sampled throughout. The load average at the
start and end goes into the results (the machine is shared).

``--profile`` attaches py-spy (record, raw format, idle samples included) to
the daemon during the first cowfs run of each workload and summarizes the
stacks into the report; profiled figures are slower than unprofiled ones.

Everything started is cleaned up on failure or Ctrl-C: servers stopped,
volumes unmounted (lazily as a last resort), helper processes ended by pid.
Needs root (drop_caches, PostgreSQL as user postgres on allow_other mounts).
"""

import argparse
import os
import signal
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import durability_bench  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402
from harness import REPO, Harness, log  # noqa: E402

GROUPS = {**workloads.GROUPS, **durability_bench.GROUPS}
ALIASES = {**workloads.ALIASES, **durability_bench.ALIASES}
ORDER = list(GROUPS)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (smoke run)")
    parser.add_argument("--rounds", type=int, help="rounds per workload (default 3, quick 1)")
    parser.add_argument("--only", help="comma-separated groups or figure names")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"),
                        help="directory for the results (default bench/results)")
    parser.add_argument("--dir", default="/var/tmp",
                        help="where the plain directories and stores go (default /var/tmp)")
    parser.add_argument("--store-dir", help="EXPERIMENT: put the cowfs stores here instead (e.g. "
                        "/dev/shm, to see what the device flushes cost); not a valid comparison")
    parser.add_argument("--profile", action="store_true", help="attach py-spy to the daemon in the first cowfs run of "
                        "each workload (slows those runs)")
    parser.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="PostgreSQL setting for every server (repeatable), e.g. wal_init_zero=off")
    parser.add_argument("--mount-arg", action="append", default=[], metavar="ARG",
                        help="extra 'cowfs mount' argument for every read-write mount (repeatable), "
                             "e.g. --mount-arg=--no-xattrs or --mount-arg=--log-size=0")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--stem", help="file name stem (default suite-<UTC date>)")
    return parser.parse_args(argv)


def resolve(only) -> list:
    if not only:
        return ORDER
    wanted = set()
    for name in only.split(","):
        name = name.strip()
        group = ALIASES.get(name, name)
        if group not in GROUPS:
            raise SystemExit(f"suite: unknown benchmark {name!r}; known: "
                             f"{', '.join(ORDER + sorted(ALIASES))}")
        wanted.add(group)
    return [g for g in ORDER if g in wanted]


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = workloads.Config.quick() if args.quick else workloads.Config()
    if args.rounds:
        cfg.rounds = args.rounds
    groups = resolve(args.only)
    cfg.pg_settings = tuple(args.pg_setting)
    harness.MOUNT_ARGS[:] = args.mount_arg
    if os.geteuid() != 0:
        log("not root: caches cannot be dropped and PostgreSQL cannot switch users; expect failures")
    signal.signal(signal.SIGTERM, _sigterm)
    # Ctrl-C must clean up even when started from a shell that ignores SIGINT (background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stem = args.stem or time.strftime("suite-%Y%m%d", time.gmtime())
    started = time.time()
    load_start = os.getloadavg()
    metrics, extras, errors = [], [], {}
    interrupted = False
    h = Harness(args.dir, profile_dir=os.path.join(args.out, f"{stem}-profiles") if args.profile else None,
                store_dir=args.store_dir)
    try:
        for group in groups:
            log(f"== {group}")
            t0 = time.time()
            try:
                out = GROUPS[group](h, cfg)
            except Exception as exc:              # noqa: BLE001 -- report it, run the rest
                traceback.print_exc()
                errors[group] = f"{type(exc).__name__}: {exc}"
                h.release()
                continue
            for item in out:
                (metrics if "rounds" in item else extras).append(item)
            log(f"== {group} done in {time.time() - t0:.0f} s")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        h.close(keep=args.keep)
    result = build_result(args, cfg, groups, metrics, extras, errors, h, started, interrupted)
    result["notes"]["load_average"] = dict(start=[round(x, 2) for x in load_start],
                                           end=[round(x, 2) for x in os.getloadavg()])
    result["notes"]["mount_args"] = args.mount_arg
    paths = report.write_outputs(result, args.out, stem)
    print(report.markdown(result))
    log("results: " + ", ".join(paths))
    return 130 if interrupted else (1 if errors else 0)


def build_result(args, cfg, groups, metrics, extras, errors, h, started, interrupted) -> dict:
    summary = [report.evaluate(m) for m in metrics]
    if h.rss.peaks:
        summary.append(report.evaluate_rss(h.rss.peaks))
    profiles = {}
    for key, path in h.profiles.items():
        try:
            profiles[key] = report.summarize_profile(path)
        except OSError as exc:
            profiles[key] = dict(error=str(exc))
    config = dict(vars(cfg), quick=args.quick, groups=groups, profile=args.profile,
                  store_dir=args.store_dir)
    return dict(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        duration_s=round(time.time() - started),
        machine=report.machine(), git=report.git_state(REPO), config=config,
        notes=dict(shared="The machine was shared with other engineers' test runs during the "
                          "measurement, so figures are noisy; plain and cowfs runs are "
                          "interleaved and ratios are medians of per-round ratios.",
                   interrupted=interrupted),
        summary=summary, metrics=metrics, extras=extras,
        rss={str(pid): p for pid, p in h.rss.peaks.items()}, profiles=profiles, errors=errors)


if __name__ == "__main__":
    sys.exit(main())
