"""Command line of operations: status, metrics, service. Parsing and output only.

The work is done by `status`, `metrics` and `service`; `cli.main` adds these
parsers and handlers and turns every `CowfsError` into one line on stderr.
"""

import json
import os
import sys

from . import errors
from .cli_common import command_registry, human

COMMANDS: dict = {}
_command = command_registry(COMMANDS)


def add_commands(sub) -> None:
    p = sub.add_parser(
        "status", help="mounted volumes: daemon, uptime, buffered bytes, flushes, snapshots, errors",
        description="Every mounted cowfs volume (of STORE, if given) with its mount point, daemon "
                    "pid and uptime, the figures its daemon reports (buffered bytes, flushes, "
                    "fsyncs, bytes written, errors...), the last and next scheduled snapshot, and "
                    "anything wrong with it and what to do. With STORE, its volumes that are not "
                    "mounted are listed too, with why (their log or service) and how to mount "
                    "them. Exit 0 when every mount is healthy, 1 when one is dead, stopped or "
                    "not answering.",
        epilog="Examples: cowfs status;  cowfs status /srv/cowfs --json")
    p.add_argument("store", metavar="STORE", nargs="?", help="only this store (and its unmounted volumes)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "metrics", help="Prometheus text format of a store and its mounts (node_exporter textfile)",
        description="Print the figures of STORE and its mounted volumes in Prometheus' text "
                    "format: flushes, fsync latency histogram, bytes written and stored, dedup "
                    "ratio, space per volume, the last scrub. With --output the file is written "
                    "atomically, as node_exporter's textfile collector needs. Reads the chunk "
                    "index and each volume's records (like 'cowfs df'): run it every minute or "
                    "so, e.g. from a systemd timer or cron.",
        epilog="Example: cowfs metrics /srv/cowfs --output /var/lib/node_exporter/textfile/cowfs.prom")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--output", metavar="FILE", help="write FILE atomically instead of printing")

    p = sub.add_parser(
        "service", help="systemd service per mounted volume: install, remove, list",
        description="Mount a volume at boot as the systemd service cowfs-mount@<mount point>, "
                    "which counts as started only once the mount is ready, commits every buffered "
                    "write when stopped, and restarts after a crash. Order PostgreSQL after it with "
                    "--postgres-unit (or see docs/operations.md).")
    service_sub = p.add_subparsers(dest="service_command", metavar="SUBCOMMAND", parser_class=type(p))
    q = service_sub.add_parser("install", help="write the unit for STORE VOL at MOUNTPOINT, enable and start it",
                               description="Write cowfs-mount@.service and the instance's settings, "
                                           "then (when systemd runs here) enable and start it.",
                               epilog="Example: cowfs service install /srv/cowfs live /srv/pg "
                                      "--postgres-unit postgresql@14-main.service")
    q.add_argument("store", metavar="STORE")
    q.add_argument("volume", metavar="VOL")
    q.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    q.add_argument("--postgres-unit", metavar="UNIT",
                   help="PostgreSQL's unit: it then requires this mount and starts after it is ready")
    q.add_argument("--no-start", action="store_true", help="enable only; do not start now")
    _unit_dir_option(q)
    q = service_sub.add_parser("remove", help="stop (unmount) and remove the service of MOUNTPOINT")
    q.add_argument("mountpoint", metavar="MOUNTPOINT")
    _unit_dir_option(q)
    q = service_sub.add_parser("list", help="the installed cowfs services")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    _unit_dir_option(q)


def _unit_dir_option(p) -> None:
    from .service import SYSTEM_UNIT_DIR
    p.add_argument("--unit-dir", default=SYSTEM_UNIT_DIR, metavar="DIR",
                   help=f"where unit files go (default {SYSTEM_UNIT_DIR}; another directory only "
                        "writes the files, e.g. to inspect them)")


# --- status ----------------------------------------------------------------------------------

@_command("status")
def cmd_status(args) -> int:
    from . import status
    if args.store is not None:
        from .cli_common import with_store
        with_store(args, lambda store: None)            # a missing store is an error, not "nothing mounted"
    report = status.gather(args.store)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_status(report)
    return 0 if status.healthy(report) else errors.EXIT_FAILURE


def _print_status(report: dict) -> None:
    if not report["mounts"] and not report["unmounted"]:
        print("no cowfs volume is mounted")
    for m in report["mounts"]:
        print(f"{m['volume']} of {m['store']} at {m['mountpoint']}: {m['state']}"
              + (f", pid {m['pid']}, up {_duration(m['uptime_s'])}" if m["uptime_s"] is not None else ""))
        if m["problem"]:
            print(f"    problem: {m['problem']}")
            print(f"    do: {m['action']}")
        _print_snapshot_facts(m)
        for name, value in sorted(m["figures"].items()):
            shown = human(value) if name.endswith("bytes") or name.endswith("bytes_total") else value
            print(f"    {name:<32} {shown}")
        if m.get("fsync_latency") and m["fsync_latency"]["count"]:
            lat = m["fsync_latency"]
            print(f"    {'fsync latency (mean)':<32} {lat['sum_s'] / lat['count'] * 1000:.2f} ms over {lat['count']}")
        if m.get("last_error"):
            print(f"    last error: {m['last_error']}")
    for v in report["unmounted"]:
        print(f"{v['volume']} of {v['store']}: not mounted; {v['why']}")
        print(f"    do: {v['action']}")
        _print_snapshot_facts(v)


def _print_snapshot_facts(row: dict) -> None:
    if "snapshots" not in row:
        return
    last = row["last_snapshot"]
    print(f"    snapshots: {row['snapshots']}, last " + (f"{last['name']} ({last['created']})" if last else "none")
          + (f"; next scheduled {row['next_snapshot']} ({row['schedule']})" if row["schedule"] else
             "; no schedule"))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


# --- metrics ----------------------------------------------------------------------------------

@_command("metrics")
def cmd_metrics(args) -> int:
    from . import metrics
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise errors.UsageError(f"cannot write --output {args.output}: its directory does not exist")
    families = metrics.gather(args.store)
    if args.output:
        metrics.write_textfile(families, args.output)
    else:
        sys.stdout.write(metrics.render(families).decode())
    return 0


# --- service ---------------------------------------------------------------------------------

@_command("service")
def cmd_service(args) -> int:
    from . import service
    if args.service_command is None:
        raise errors.UsageError("give a subcommand: install, remove or list (see 'cowfs service --help')")
    if args.service_command == "list":
        rows = service.installed(args.unit_dir)
        if args.json:
            print(json.dumps(rows, indent=1))
        for row in [] if args.json else rows:
            print(f"{row['unit']:<40} {row.get('volume')} of {row.get('store')} at {row.get('mountpoint')}")
        return 0
    if args.service_command == "remove":
        done = service.remove(os.path.abspath(args.mountpoint), args.unit_dir)
        print(f"removed {done['unit']}" + (" (stopped and disabled)" if done["systemctl"] else ""))
        return 0
    return _install(args, service)


def _install(args, service) -> int:
    from . import volumes
    from .cli_common import with_store
    store = os.path.abspath(args.store)
    mnt = os.path.abspath(args.mountpoint)
    with_store(args, lambda s: _volume_exists(s, args.volume, volumes))
    if not os.path.isdir(mnt):
        raise errors.NotFoundError(f"mount point {mnt} does not exist; create it with 'mkdir -p {mnt}'")
    done = service.install(store, args.volume, mnt, args.unit_dir, args.postgres_unit, start=not args.no_start)
    print(f"installed {done['unit']}: " + ", ".join(done["files"]))
    if done["started"]:
        print(f"enabled and started; 'systemctl status {done['unit']}' shows it")
    elif done["systemctl"]:
        print(f"enabled; start it with 'systemctl start {done['unit']}'")
    else:
        print(f"systemd does not manage {args.unit_dir} here (not running, or another directory); "
              f"where it does: systemctl daemon-reload && systemctl enable --now {done['unit']}")
    return 0


def _volume_exists(store, name: str, volumes) -> None:
    with store.env.begin() as txn:
        volumes.volume_id(txn, store.env, name)
