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
            "instant clone while the live cluster serves; cut over while it keeps serving "
            "(clients wait about a second in PgBouncer) with no lost write; roll back the same "
            "way; bisect snapshots to find when something broke.")

_BIN_HELP = "bin directory of PostgreSQL {what} (holding postgres, pg_ctl, psql{extra})"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: give positive seconds")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (1-65535)")
    return int(text)


def add_commands(sub) -> None:
    """Add the `pg` command and its subcommands to the top-level subparsers."""
    p = sub.add_parser("pg", help="PostgreSQL: rehearse-upgrade, cutover, rollback-cutover, "
                                  "finish-cutover, bisect",
                       description=_PG_HELP,
                       epilog="Step by step with examples: docs/postgres.md. As root, every "
                              "PostgreSQL program runs as the owner of the data directory.")
    pg_sub = p.add_subparsers(dest="pg_command", metavar="SUBCOMMAND", parser_class=type(p))
    _add_rehearse(pg_sub)
    _add_cutover(pg_sub)
    _add_rollback(pg_sub)
    _add_finish(pg_sub)
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
        "cutover", help="serve VOL upgraded: online (live keeps serving) or --offline (stop, upgrade)",
        description="Online (the default): while the live server keeps serving, prepare it for "
                    "logical replication (publication, one slot per database, DDL blocked), "
                    "snapshot and clone VOL, upgrade the clone with pg_upgrade --link and start "
                    "it on a side port, let it catch up through PostgreSQL's logical "
                    "replication, then switch: PgBouncer PAUSE, wait until the new server has "
                    "every commit, copy sequences, move the new server to the live port and "
                    "socket directory, RESUME. Clients wait about a second instead of seeing "
                    "errors. Afterwards the old server follows the new one on a side port, so "
                    "'rollback-cutover --online' loses no write; 'finish-cutover' closes the "
                    "window. Refuses in one line, before changing anything, what logical "
                    "replication cannot carry (see docs/postgres.md). "
                    "--offline: stop the live server, upgrade a clone, serve it at MNT as VOL "
                    "(the old volume stays as VOL-pre-upgrade); the downtime is reported. If "
                    "anything fails, the live server serves again as before.",
        epilog="Example: cowfs pg cutover /srv/cowfs live --pgdata pgdata --mountpoint /mnt/pg "
               "--old-bin /usr/lib/postgresql/14/bin --new-bin /usr/lib/postgresql/18/bin "
               "--pgbouncer 'host=/var/run/postgresql port=6432 user=postgres'")
    _common(p)
    p.add_argument("--mountpoint", required=True, metavar="MNT", help="where VOL is mounted now")
    p.add_argument("--old-bin", required=True, metavar="DIR", help=_BIN_HELP.format(what="now", extra=""))
    p.add_argument("--new-bin", required=True, metavar="DIR",
                   help=_BIN_HELP.format(what="to upgrade to", extra=", pg_upgrade, vacuumdb"))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--online", dest="offline", action="store_false",
                      help="keep the live server serving; switch behind PgBouncer (default)")
    mode.add_argument("--offline", dest="offline", action="store_true",
                      help="stop-the-world cutover, for clusters the online one refuses")
    p.set_defaults(offline=False)
    p.add_argument("--check-sql", metavar="FILE",
                   help="SQL run on the upgraded server before any client reaches it; its last "
                        "result must be true")
    p.add_argument("--database", default="postgres", metavar="NAME",
                   help="database --check-sql runs in (default: postgres)")
    online = p.add_argument_group("online cutover")
    online.add_argument("--pgbouncer", metavar="CONNINFO",
                        help="libpq conninfo of the admin console of the PgBouncer your clients "
                             "use (transaction pooling), e.g. 'host=/run/pgbouncer port=6432 "
                             "user=postgres'; without it clients see a few seconds of errors")
    online.add_argument("--pause-limit", type=_seconds, default=5.0, metavar="SECONDS",
                        help="longest time clients may be held; a switch that would take longer "
                             "(a long transaction through PgBouncer, a lagging replica) gives up "
                             "and changes nothing (default: 5)")
    online.add_argument("--catch-up-timeout", type=_seconds, default=3600.0, metavar="SECONDS",
                        help="how long the new server may take to catch up before the switch "
                             "(default: 3600)")
    online.add_argument("--new-volume", metavar="NAME",
                        help="name of the upgraded clone (default: VOL-pg<NEW>)")
    online.add_argument("--new-mountpoint", metavar="DIR",
                        help="where the upgraded clone is mounted (default: MNT-pg<NEW>)")
    offline = p.add_argument_group("offline cutover")
    offline.add_argument("--port", type=_port, metavar="N",
                         help="port of the live server (default: read from its postmaster.pid)")
    offline.add_argument("--socket-dir", metavar="DIR",
                         help="socket directory of the live server (default: from postmaster.pid)")
    offline.add_argument("--keep-old-as", metavar="NAME",
                         help="name for the pre-upgrade volume (default: VOL-pre-upgrade)")
    offline.add_argument("--verify", choices=("full", "light"), default="full",
                         help="full (default): pg_amcheck on the new server once it serves; "
                              "light: none (the rehearsal ran it on the same data)")


def _add_rollback(pg_sub) -> None:
    p = pg_sub.add_parser(
        "rollback-cutover", help="serve the pre-upgrade version at the live endpoint again",
        description="Online (a cutover --online whose window is open): the same switch back: "
                    "PgBouncer PAUSE, wait until the old server has every commit made on the "
                    "new one, copy sequences, the old server takes the live port, RESUME; no "
                    "write is lost, and the new server follows the old one until "
                    "finish-cutover. Offline: stop the new server, unmount MNT, rename VOL to "
                    "VOL-upgraded-<time> (kept), rename the pre-upgrade volume back to VOL, "
                    "mount it at MNT and start the old server; writes made after the cutover "
                    "stay only in VOL-upgraded-<time>.",
        epilog="Examples: cowfs pg rollback-cutover /srv/cowfs live --mountpoint /mnt/pg --online "
               "--pgbouncer 'host=/var/run/postgresql port=6432 user=postgres' | "
               "cowfs pg rollback-cutover /srv/cowfs live --mountpoint /mnt/pg "
               "--old-bin /usr/lib/postgresql/14/bin")
    _common(p, pgdata=False)
    p.add_argument("--mountpoint", required=True, metavar="MNT", help="where VOL is mounted now")
    p.add_argument("--online", action="store_true",
                   help="switch back an online cutover (its record at MNT says so)")
    p.add_argument("--pgbouncer", metavar="CONNINFO", help="as for cutover --online")
    p.add_argument("--pause-limit", type=_seconds, default=5.0, metavar="SECONDS",
                   help="as for cutover --online (default: 5)")
    p.add_argument("--catch-up-timeout", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="as for cutover --online (default: 3600)")
    p.add_argument("--old-bin", metavar="DIR", help=_BIN_HELP.format(what="before the upgrade",
                   extra="") + "; offline only")
    p.add_argument("--port", type=_port, metavar="N",
                   help="offline: port for the old server (default: the one the cutover recorded)")


def _add_finish(pg_sub) -> None:
    p = pg_sub.add_parser(
        "finish-cutover", help="close an online cutover's window: keep what serves, stop the other",
        description="Close the window an online cutover opened: drop the replication between "
                    "the two servers (subscriptions, slots, publication), lift the DDL block, "
                    "stop the server that follows and unmount its volume (kept). Whichever "
                    "version serves now stays: the new one after a cutover, the old one after "
                    "a rollback. Going back after this needs a new cutover.",
        epilog="Example: cowfs pg finish-cutover /srv/cowfs live")
    _common(p, pgdata=False)
    p.add_argument("--mountpoint", metavar="MNT",
                   help="where VOL is mounted (default: found from VOL's daemon)")


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
                "rollback-cutover": _rollback, "finish-cutover": _finish, "bisect": _bisect}
    if args.pg_command is None:
        raise UsageError("give a subcommand: rehearse-upgrade, cutover, rollback-cutover, "
                         "finish-cutover or bisect (see 'cowfs pg --help')")
    _check_json_path(args)
    return handlers[args.pg_command](args)


def _rehearse(args) -> int:
    from .pg.rehearse import RehearsalOptions, rehearse
    return _emit(rehearse(RehearsalOptions(
        store=args.store, volume=args.volume, pgdata=args.pgdata, old_bin=args.old_bin,
        new_bin=args.new_bin, check_sql_path=args.check_sql, database=args.database,
        port=args.port, keep=args.keep, clone_name=args.clone_name)), args)


def _cutover(args) -> int:
    if args.offline:
        from .pg.cutover import CutoverOptions, cutover
        _only_with(args, "--offline", pgbouncer="--pgbouncer", new_volume="--new-volume",
                   new_mountpoint="--new-mountpoint")
        return _emit(cutover(CutoverOptions(
            store=args.store, volume=args.volume, pgdata=args.pgdata, mountpoint=args.mountpoint,
            old_bin=args.old_bin, new_bin=args.new_bin, port=args.port, socket_dir=args.socket_dir,
            keep_old_as=args.keep_old_as, check_sql_path=args.check_sql,
            database=args.database, verify=args.verify)), args)
    from .pg.online import OnlineOptions, cutover_online
    _only_with(args, "--online", port="--port", socket_dir="--socket-dir",
               keep_old_as="--keep-old-as")
    return _emit(cutover_online(OnlineOptions(
        store=args.store, volume=args.volume, pgdata=args.pgdata, mountpoint=args.mountpoint,
        old_bin=args.old_bin, new_bin=args.new_bin, pgbouncer=args.pgbouncer,
        new_volume=args.new_volume, new_mountpoint=args.new_mountpoint,
        pause_limit_s=args.pause_limit, catch_up_timeout_s=args.catch_up_timeout,
        check_sql_path=args.check_sql, database=args.database)), args)


def _only_with(args, mode: str, **options) -> None:
    """Refuse options that belong to the other kind of cutover (they would be ignored)."""
    given = [flag for name, flag in options.items() if getattr(args, name) is not None]
    if given:
        other = "--offline" if mode == "--online" else "the online cutover (the default)"
        raise UsageError(f"{', '.join(given)} only applies to {other}, not {mode}")


def _rollback(args) -> int:
    if args.online:
        from .pg.online import rollback_online
        _only_with(args, "--online", old_bin="--old-bin", port="--port")
        return _emit(rollback_online(args.store, args.volume, args.mountpoint, args.pgbouncer,
                                     pause_limit_s=args.pause_limit,
                                     catch_up_timeout_s=args.catch_up_timeout), args)
    from .pg.cutover import rollback_cutover
    if args.pgbouncer is not None:
        raise UsageError("--pgbouncer applies to rolling back an online cutover: add --online")
    return _emit(rollback_cutover(args.store, args.volume, args.mountpoint, args.old_bin,
                                  port=args.port), args)


def _finish(args) -> int:
    from .pg.online import finish_cutover
    return _emit(finish_cutover(args.store, args.volume, args.mountpoint), args)


def _bisect(args) -> int:
    from .pg.bisect import BisectOptions, bisect
    return _emit(bisect(BisectOptions(
        store=args.store, volume=args.volume, pgdata=args.pgdata, bin_dir=args.bin,
        check_sql=args.check, database=args.database, from_snapshot=args.from_snapshot,
        to_snapshot=args.to_snapshot, port=args.port)), args)


COMMANDS = {"pg": cmd_pg}
