"""Command line of the PostgreSQL workflows (`cowfs pg ...`): parsing and output only.

Each workflow returns a `cowfs.pg.report.Report`; this module prints it as
text on stdout, writes it as JSON with ``--json FILE``, and turns its outcome
into the exit code (0 only when every step passed).
"""

import argparse
import os
import sys

from .errors import EXIT_FAILURE, EXIT_OK, UsageError

_PG_HELP = ("PostgreSQL workflows on cowfs volumes: rehearse a major-version upgrade on an "
            "instant clone while the live cluster serves, cut over with no lost write, roll "
            "back by a restart, bisect snapshots to find when something broke.")

_BIN_HELP = "bin directory of PostgreSQL {what} (holding postgres, pg_ctl, psql{extra})"


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (1-65535)")
    return int(text)


def add_commands(sub) -> None:
    """Add the `pg` command and its subcommands to the top-level subparsers."""
    p = sub.add_parser("pg", help="PostgreSQL: rehearse-upgrade, cutover, rollback-cutover, bisect",
                       description=_PG_HELP,
                       epilog="Step by step with examples: docs/postgres.md. As root, every "
                              "PostgreSQL program runs as the owner of the data directory.")
    pg_sub = p.add_subparsers(dest="pg_command", metavar="SUBCOMMAND", parser_class=type(p))
    _add_rehearse(pg_sub)
    _add_cutover(pg_sub)
    _add_rollback(pg_sub)
    _add_bisect(pg_sub)


def _common(p, *, pgdata=True, json_out=True) -> None:
    p.add_argument("store", metavar="STORE", help="the cowfs store")
    p.add_argument("volume", metavar="VOL", help="the volume holding the live data directory")
    if pgdata:
        p.add_argument("--pgdata", required=True, metavar="PATH",
                       help="data directory relative to the volume root, e.g. pgdata")
    if json_out:
        p.add_argument("--json", metavar="FILE", dest="json_path",
                       help="also write the report as JSON to FILE")


def _add_rehearse(pg_sub) -> None:
    p = pg_sub.add_parser(
        "rehearse-upgrade", help="upgrade a clone of VOL, verify it; the live cluster is untouched",
        description="Snapshot VOL (mounted or not; the live server keeps running), clone it, mount "
                    "the clone, start the old server on it (crash recovery) and stop it cleanly, "
                    "run pg_upgrade --check and pg_upgrade --link, start the new server and "
                    "verify: pg_amcheck on every database, every table's row count equal to the "
                    "one before, and --check-sql true. The clone is snapshotted after every "
                    "step (CLONE@step-N-NAME) so the state before a failing step can be cloned "
                    "and started. Exit 0 only if every step passed.",
        epilog="Example: cowfs pg rehearse-upgrade /srv/cowfs live --pgdata pgdata "
               "--old-bin /usr/lib/postgresql/14/bin --new-bin /usr/lib/postgresql/16/bin "
               "--check-sql checks.sql --json rehearsal.json")
    _common(p)
    p.add_argument("--old-bin", required=True, metavar="DIR", help=_BIN_HELP.format(what="now", extra=""))
    p.add_argument("--new-bin", required=True, metavar="DIR",
                   help=_BIN_HELP.format(what="to upgrade to", extra=", pg_upgrade, pg_amcheck"))
    p.add_argument("--check-sql", metavar="FILE",
                   help="SQL run on the upgraded cluster; its last result must be true")
    p.add_argument("--database", default="postgres", metavar="NAME",
                   help="database --check-sql runs in (default: postgres)")
    p.add_argument("--port", type=_port, metavar="N",
                   help="port for the rehearsal's servers (default: a free one); they listen "
                        "on a Unix socket in a workspace under /tmp only")
    p.add_argument("--clone-name", metavar="NAME",
                   help="name of the clone volume (default: VOL-rehearsal-<time>)")
    p.add_argument("--keep", action="store_true",
                   help="leave the clone mounted (and the new server running if all passed) "
                        "for inspection; without it the clone is unmounted but kept")


def _add_cutover(pg_sub) -> None:
    p = pg_sub.add_parser(
        "cutover", help="stop live, upgrade a clone the rehearsed way, serve it at MNT as VOL",
        description="Stop the live server (fast shutdown), snapshot VOL, clone it, upgrade and "
                    "verify the clone the rehearsed way, unmount VOL, rename it to "
                    "VOL-pre-upgrade, rename the clone to VOL, mount it at MNT and start the new "
                    "server with the live server's port, socket directory, listen addresses and "
                    "configuration files. If anything fails before the live volume is "
                    "unmounted, the old server is started again on the untouched live volume. "
                    "Reports the downtime (live stopped -> new server accepting connections).",
        epilog="Example: cowfs pg cutover /srv/cowfs live --pgdata pgdata --mountpoint /mnt/pg "
               "--old-bin /usr/lib/postgresql/14/bin --new-bin /usr/lib/postgresql/16/bin")
    _common(p)
    p.add_argument("--mountpoint", required=True, metavar="MNT", help="where VOL is mounted now")
    p.add_argument("--old-bin", required=True, metavar="DIR", help=_BIN_HELP.format(what="now", extra=""))
    p.add_argument("--new-bin", required=True, metavar="DIR",
                   help=_BIN_HELP.format(what="to upgrade to", extra=", pg_upgrade, pg_amcheck"))
    p.add_argument("--port", type=_port, metavar="N",
                   help="port of the live server (default: read from its postmaster.pid)")
    p.add_argument("--socket-dir", metavar="DIR",
                   help="socket directory of the live server (default: from its postmaster.pid)")
    p.add_argument("--keep-old-as", metavar="NAME",
                   help="name for the pre-upgrade volume (default: VOL-pre-upgrade)")
    p.add_argument("--check-sql", metavar="FILE",
                   help="SQL run on the upgraded clone before it goes live; must return true")
    p.add_argument("--database", default="postgres", metavar="NAME",
                   help="database --check-sql runs in (default: postgres)")
    p.add_argument("--verify", choices=("full", "light"), default="full",
                   help="full (default): row counts of every table and pg_amcheck before going "
                        "live, as in the rehearsal; light: only the new server's start and "
                        "--check-sql, for clusters too big to read whole during the downtime "
                        "(rehearse with full verification first)")


def _add_rollback(pg_sub) -> None:
    p = pg_sub.add_parser(
        "rollback-cutover", help="serve the pre-upgrade volume at MNT again with the old server",
        description="Undo a cutover: stop the new server, unmount MNT, rename VOL to "
                    "VOL-upgraded-<time> (kept, so the rollback can be undone too), rename the "
                    "pre-upgrade volume back to VOL, mount it at MNT and start the old server "
                    "on the port and socket directory the cutover recorded. Writes made after "
                    "the cutover stay only in VOL-upgraded-<time>.",
        epilog="Example: cowfs pg rollback-cutover /srv/cowfs live --mountpoint /mnt/pg "
               "--old-bin /usr/lib/postgresql/14/bin")
    _common(p, pgdata=False)
    p.add_argument("--mountpoint", required=True, metavar="MNT", help="where VOL is mounted now")
    p.add_argument("--old-bin", required=True, metavar="DIR", help=_BIN_HELP.format(what="before the "
                   "upgrade", extra=""))
    p.add_argument("--port", type=_port, metavar="N",
                   help="port for the old server (default: the one the cutover recorded)")


def _add_bisect(pg_sub) -> None:
    p = pg_sub.add_parser(
        "bisect", help="find the first snapshot of VOL where a check turns false",
        description="Binary search over VOL's snapshots in time order: for each candidate, "
                    "clone it, mount the clone, start a server on it (crash recovery), run the "
                    "check SQL (true = good, false = bad), stop, unmount and destroy the clone. "
                    "Assumes good snapshots come before bad ones. Reports the last good and the "
                    "first bad snapshot with their times. Starts at most ceil(log2(N+1)) servers "
                    "for N candidate snapshots. A check that errors stops the search.",
        epilog="Example: cowfs pg bisect /srv/cowfs live --pgdata pgdata --bin "
               "/usr/lib/postgresql/14/bin --check \"SELECT count(*) = 0 FROM orders WHERE "
               "total < 0\" --from hourly-0800 --to hourly-1700")
    _common(p)
    p.add_argument("--bin", required=True, metavar="DIR",
                   help=_BIN_HELP.format(what="that serves the snapshots", extra=""))
    p.add_argument("--check", required=True, metavar="SQL",
                   help="SQL whose last result is true on a good snapshot, false on a bad one")
    p.add_argument("--database", default="postgres", metavar="NAME",
                   help="database the check runs in (default: postgres)")
    p.add_argument("--from", dest="from_snapshot", metavar="SNAP",
                   help="first snapshot to consider (default: the oldest)")
    p.add_argument("--to", dest="to_snapshot", metavar="SNAP",
                   help="last snapshot to consider (default: the newest)")
    p.add_argument("--port", type=_port, metavar="N", help="port for the probe servers")


def _emit(report, args) -> int:
    # JSON first: a script reading it must get it even if our stdout is gone.
    if getattr(args, "json_path", None):
        report.write_json(args.json_path)
    try:
        print(report.text(), flush=True)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`, or it was interrupted); the
        # outcome still goes out as the exit code.
        sys.stdout = open(os.devnull, "w")
    return EXIT_OK if report.ok else EXIT_FAILURE


def _check_json_path(args) -> None:
    """Refuse an unwritable --json target before any work starts (nothing changed yet)."""
    path = getattr(args, "json_path", None)
    if path and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        raise UsageError(f"cannot write --json {path}: its directory does not exist or is not "
                         "writable")


def cmd_pg(args) -> int:
    handlers = {"rehearse-upgrade": _rehearse, "cutover": _cutover,
                "rollback-cutover": _rollback, "bisect": _bisect}
    if args.pg_command is None:
        raise UsageError("give a subcommand: rehearse-upgrade, cutover, rollback-cutover or bisect "
                         "(see 'cowfs pg --help')")
    _check_json_path(args)
    return handlers[args.pg_command](args)


def _rehearse(args) -> int:
    from .pg.rehearse import RehearsalOptions, rehearse
    return _emit(rehearse(RehearsalOptions(
        store=args.store, volume=args.volume, pgdata=args.pgdata, old_bin=args.old_bin,
        new_bin=args.new_bin, check_sql_path=args.check_sql, database=args.database,
        port=args.port, keep=args.keep, clone_name=args.clone_name)), args)


def _cutover(args) -> int:
    from .pg.cutover import CutoverOptions, cutover
    return _emit(cutover(CutoverOptions(
        store=args.store, volume=args.volume, pgdata=args.pgdata, mountpoint=args.mountpoint,
        old_bin=args.old_bin, new_bin=args.new_bin, port=args.port, socket_dir=args.socket_dir,
        keep_old_as=args.keep_old_as, check_sql_path=args.check_sql,
        database=args.database, verify=args.verify)), args)


def _rollback(args) -> int:
    from .pg.cutover import rollback_cutover
    return _emit(rollback_cutover(args.store, args.volume, args.mountpoint, args.old_bin,
                                  port=args.port), args)


def _bisect(args) -> int:
    from .pg.bisect import BisectOptions, bisect
    return _emit(bisect(BisectOptions(
        store=args.store, volume=args.volume, pgdata=args.pgdata, bin_dir=args.bin,
        check_sql=args.check, database=args.database, from_snapshot=args.from_snapshot,
        to_snapshot=args.to_snapshot, port=args.port)), args)


COMMANDS = {"pg": cmd_pg}
