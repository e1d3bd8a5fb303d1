"""Command line of the snapshot lifecycle (policy, hold, release, diff, prune, scrub).

Parsing and output only; the work is done by `admin`, `policy`, `diff` and
`scrub`. `cli.main` adds these parsers and handlers and turns every
`CowfsError` into one line on stderr with its exit code.
"""

import json
import sys

from . import errors
from .cli_common import command_registry, human, with_store

COMMANDS: dict = {}
_command = command_registry(COMMANDS)


def add_commands(sub) -> None:
    """Add the lifecycle commands to the top-level subparsers."""
    _add_policy(sub)
    _add_holds(sub)
    _add_prune(sub)
    _add_diff(sub)
    _add_scrub(sub)


# --- parsers ---------------------------------------------------------------------------------

def _add_policy(sub) -> None:
    p = sub.add_parser(
        "policy", help="schedule automatic snapshots of a volume, with retention",
        description="Set, change, remove (--off) or show the snapshot schedule of a volume. "
                    "The daemon that mounts VOL takes a snapshot named auto-<UTC time> every "
                    "DURATION and then removes the automatic snapshots no --keep rule keeps. "
                    "Manual, held and clone-dependent snapshots are never removed. Changes take "
                    "effect within a second, without remounting. Without VOL: show all schedules.",
        epilog="Examples: cowfs policy /srv/cowfs live --every 1h --keep 24 --keep-daily 7 "
               "--keep-weekly 4;  cowfs policy /srv/cowfs live --off;  cowfs policy /srv/cowfs")
    p.add_argument("store", metavar="STORE")
    p.add_argument("volume", metavar="VOL", nargs="?", help="volume to schedule (omit to show all)")
    p.add_argument("--every", metavar="DURATION",
                   help="interval between snapshots: 1s, 15m, 1h, 1d, 1w or combined (1h30m)")
    p.add_argument("--keep", type=int, default=0, metavar="N", help="keep the N newest automatic snapshots")
    for rule, what in (("hourly", "UTC hour"), ("daily", "UTC day"), ("weekly", "ISO week"),
                       ("monthly", "month")):
        p.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N",
                       help=f"keep the newest snapshot of each of the last N {what}s that have one")
    p.add_argument("--off", action="store_true", help="remove the schedule (snapshots stay)")
    p.add_argument("--json", action="store_true", help="machine-readable output when showing")


def _add_holds(sub) -> None:
    p = sub.add_parser(
        "hold", help="protect VOL@SNAP from destroy and pruning (with a reason)",
        description="Put a hold on a snapshot: 'cowfs destroy' refuses it, pruning skips it, and "
                    "its volume cannot be destroyed, until 'cowfs release'. 'cowfs hold STORE' "
                    "lists every hold with its reason.",
        epilog="Example: cowfs hold /srv/cowfs live@auto-20261122T100000.000Z "
               "--reason 'last good state before the failed migration'")
    p.add_argument("store", metavar="STORE")
    p.add_argument("target", metavar="VOL@SNAP", nargs="?", help="snapshot to hold (omit to list holds)")
    p.add_argument("--reason", default="", metavar="TEXT", help="why it is kept (shown by list and hold)")
    p.add_argument("--json", action="store_true", help="machine-readable output when listing")

    p = sub.add_parser("release", help="remove the hold of VOL@SNAP",
                       description="Remove the hold of a snapshot; it can then be destroyed, and "
                                   "pruned if it is automatic.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("target", metavar="VOL@SNAP")


def _add_prune(sub) -> None:
    p = sub.add_parser(
        "prune", help="remove automatic snapshots the schedule no longer keeps (--dry-run: preview)",
        description="Apply the retention rules of VOL's schedule now. With --dry-run nothing is "
                    "changed: the snapshots that would go are listed with the exact bytes their "
                    "removal frees together. Safe while VOL is mounted; a snapshot mounted "
                    "read-only is skipped. The freed space is back when the command returns.",
        epilog="Example: cowfs prune /srv/cowfs live --dry-run")
    p.add_argument("store", metavar="STORE")
    p.add_argument("volume", metavar="VOL")
    p.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_diff(sub) -> None:
    p = sub.add_parser(
        "diff", help="what changed between VOL@A and VOL@B (or the live VOL)",
        description="List the paths that differ between two points of one volume: added (+), "
                    "removed (-), modified (M, with the changed byte ranges), renamed (R) and "
                    "type changes (T). B may be the volume itself (its current state; a mounted "
                    "volume is flushed first). The cost grows with the amount of change, not with "
                    "the volume size. Directories are listed only when their own mode, owner or "
                    "xattrs changed.",
        epilog="Example: cowfs diff /srv/cowfs live@auto-20261122T090000.000Z live")
    p.add_argument("store", metavar="STORE")
    p.add_argument("a", metavar="VOL@A")
    p.add_argument("b", metavar="VOL@B|VOL")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_scrub(sub) -> None:
    p = sub.add_parser(
        "scrub", help="re-read and verify every stored chunk; name the files a damaged one hurts",
        description="Read every chunk of every pack back from disk and compare it with its "
                    "checksum. Each damaged chunk is reported with every volume, snapshot and "
                    "file path that refers to it. Exit 0 when everything is intact, 1 when "
                    "anything is damaged. Safe while volumes are mounted. Progress goes to stderr.",
        epilog="Example: cowfs scrub /srv/cowfs --json > scrub.json")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")


# --- commands ------------------------------------------------------------------------------------

@_command("policy")
def cmd_policy(args) -> int:
    from . import admin, policy, reports
    if args.volume is None:
        if args.every or args.off:
            raise errors.UsageError("name the volume: cowfs policy STORE VOL --every 1h --keep 24")
        return _show_policies(args, with_store(args, reports.policies))
    if args.off:
        if args.every:
            raise errors.UsageError("give either --every (set a schedule) or --off (remove it), not both")
        with_store(args, lambda store: admin.set_policy(store, args.volume, None))
        print(f"schedule of {args.volume} turned off; its automatic snapshots stay until destroyed")
        return 0
    if not args.every:
        raise errors.UsageError(f"give --every DURATION (e.g. --every 1h --keep 24) or --off; "
                                f"'cowfs policy {args.store}' shows the schedules")
    new = policy.Policy(every_s=policy.parse_duration(args.every), keep_last=args.keep,
                        keep_hourly=args.keep_hourly, keep_daily=args.keep_daily,
                        keep_weekly=args.keep_weekly, keep_monthly=args.keep_monthly).check()
    result = with_store(args, lambda store: admin.set_policy(store, args.volume, new))
    print(f"schedule of {result['volume']}: {result['schedule']}")
    return 0


def _show_policies(args, rows: list[dict]) -> int:
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no schedules; set one with 'cowfs policy STORE VOL --every 1h --keep 24'")
        return 0
    print(f"{'VOLUME':<24} {'LAST AUTOMATIC SNAPSHOT':<24} SCHEDULE")
    for row in rows:
        print(f"{row['volume']:<24} {row['last_auto'] or '-':<24} {row['summary']}")
    return 0


@_command("hold")
def cmd_hold(args) -> int:
    from . import admin, reports
    if args.target is None:
        rows = [r for r in with_store(args, reports.listing) if r.get("held")]
        if args.json:
            print(json.dumps([dict(name=r["name"], reason=r["hold_reason"], since=r["held_since"])
                              for r in rows], indent=1))
            return 0
        print(f"{'SNAPSHOT':<48} {'HELD SINCE':<21} REASON")
        for row in rows:
            print(f"{row['name']:<48} {row['held_since']:<21} {row['hold_reason'] or '-'}")
        return 0
    r = with_store(args, lambda store: admin.hold(store, args.target, args.reason))
    if r["was_held"]:
        print(f"snapshot {r['target']} was already held; reason now: {r['reason'] or '(none)'}")
    else:
        print(f"snapshot {r['target']} is held; it cannot be destroyed or pruned until released")
    return 0


@_command("release")
def cmd_release(args) -> int:
    from . import admin
    r = with_store(args, lambda store: admin.release(store, args.target))
    print(f"released snapshot {r['target']}")
    return 0


@_command("prune")
def cmd_prune(args) -> int:
    from . import admin
    report = with_store(args, lambda store: admin.prune(store, args.volume, args.dry_run))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    verb = "would destroy" if args.dry_run else "destroyed"
    for row in report["destroy"]:
        print(f"{verb} {row['name']}  (created {row['created']})")
    for row in report["skipped"]:
        print(f"skipped {row['name']}: {row['why']}")
    count, size = len(report["destroy"]), report["frees_bytes"]
    if args.dry_run:
        print(f"prune {report['volume']}: would destroy {count} snapshots, freeing {size} bytes ({human(size)})")
    else:
        print(f"prune {report['volume']}: destroyed {count} snapshots, freed {size} bytes ({human(size)})")
    return 0


@_command("diff")
def cmd_diff(args) -> int:
    from . import admin
    report = with_store(args, lambda store: admin.diff(store, args.a, args.b))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for change in report["changes"]:
        print(_diff_line(change))
    counts = ", ".join(f"{n} {what}" for what, n in report["counts"].items())
    print(f"diff {report['from']} -> {report['to']}: {counts or 'no changes'}", file=sys.stderr)
    return 0


_DIFF_MARKS = {"added": "+", "removed": "-", "modified": "M", "renamed": "R", "type": "T"}


def _diff_line(change: dict) -> str:
    mark = _DIFF_MARKS[change["change"]]
    path = change["path"] if change["change"] != "renamed" else f"{change['path']} -> {change['new_path']}"
    details = "; ".join(change.get("details", []))
    return f"{mark} {change['type']:<9} {path}" + (f"   ({details})" if details else "")


@_command("scrub")
def cmd_scrub(args) -> int:
    from . import progress, scrub
    with progress.Progress("scrub", quiet=args.json) as bar:
        def on_progress(done_bytes, total_bytes, _done_chunks, _total_chunks):
            bar.total = total_bytes        # grows if chunks are written meanwhile
            bar.update(done_bytes)
        report = with_store(args, lambda store: scrub.scrub(store, on_progress))
    if args.json:
        print(json.dumps(report, indent=1))
        return errors.EXIT_FAILURE if report["damaged"] else 0
    for damaged in report["damaged"]:
        print(f"DAMAGED chunk {damaged['chunk_id']} in pack {damaged['pack']} at offset "
              f"{damaged['offset']}: {damaged['problem']}")
        for ref in damaged["refs"]:
            print(f"    {ref['point']}: {ref['path']} (bytes {ref['offset']}..{ref['end']})")
        if not damaged["refs"]:
            print("    no volume or snapshot refers to it any more")
    verdict = "DAMAGED" if report["damaged"] else "intact"
    print(f"scrub: {report['chunks']} chunks, {report['bytes']} bytes read; {len(report['damaged'])} "
          f"damaged; store {verdict}", file=sys.stderr)
    return errors.EXIT_FAILURE if report["damaged"] else 0
