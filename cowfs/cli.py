"""Command line: argument parsing and output only.

Every failure a user can cause ends as one line ``cowfs: <what failed; what
to do>`` on stderr and the exit code of its error class (`errors`).
"""

import argparse
import os
import sys

from . import __version__, errors, logs, schema
from .cli_common import human, with_store
from .errors import CowfsError, UsageError

_SIZE_UNITS = {"": 1, "K": 1024, "KI": 1024, "KIB": 1024, "M": 1 << 20, "MI": 1 << 20, "MIB": 1 << 20}


def parse_size(text: str) -> int:
    """'8192', '8K', '8KiB', '1M' -> bytes."""
    digits = text.rstrip("KkMmIiBb")
    unit = text[len(digits):].upper()
    if not digits.isdigit() or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 8192, 8K, 64KiB, 1M)")
    return int(digits) * _SIZE_UNITS[unit]


MIN_LOG_BYTES = 1 << 20


def parse_log_size(text: str) -> int:
    size = parse_size(text)
    if size and size < MIN_LOG_BYTES:
        raise argparse.ArgumentTypeError(f"{text}: an intent log needs at least 1M (or 0 for none)")
    return size


def parse_interval_s(text: str) -> float:
    """A commit interval in seconds: a finite number from 0.1 to 3600."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 3600:       # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"invalid interval {text!r}: give seconds from 0.1 to 3600")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cowfs",
        description="Copy-on-write filesystem for PostgreSQL data directories: file contents are "
                    "deduplicated chunks in pack files, metadata is versioned in LMDB, so "
                    "snapshots and clones cost the same whatever the size.",
        epilog="Typical start: cowfs init /srv/cowfs && mkdir -p /mnt/pg && "
               "cowfs mount /srv/cowfs /mnt/pg",
    )
    parser.add_argument("--version", action="version", version=f"cowfs {__version__} (store format "
                        f"{schema.FORMAT_VERSION})")
    parser.add_argument("--debug", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("init", help="create a store with one empty volume 'main'",
                       description="Create a store in a new or empty directory, with one empty "
                                   "volume named 'main'.")
    p.add_argument("store", metavar="STORE", help="directory to create the store in (new or empty)")
    p.add_argument("--chunk-size", type=parse_size, default=schema.DEFAULT_CHUNK_SIZE, metavar="SIZE",
                   help="bytes per chunk, a power of two from 4K to 1M (default %(default)s: "
                        "one PostgreSQL page, so page writes never read-modify-write)")

    p = sub.add_parser("mount", help="mount a volume (returns once the mount is usable)",
                       description="Mount a volume of STORE at MOUNTPOINT. A daemon serves the "
                                   "mount in the background; the command returns once the mount "
                                   "is usable. Other users (e.g. postgres) may use the mount; "
                                   "file modes and owners are enforced by the kernel.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    p.add_argument("--volume", default="main", metavar="NAME",
                   help="volume to mount (default: main); VOL@SNAP mounts a snapshot read-only")
    p.add_argument("--foreground", action="store_true",
                   help="serve in this process until unmounted (for service managers; logs go "
                        "to stderr; with $NOTIFY_SOCKET it sends systemd READY=1 once the mount "
                        "is fully up, see 'cowfs service')")
    p.add_argument("--commit-interval", type=parse_interval_s, default=5.0, metavar="SECONDS",
                   help="commit buffered writes at least this often (default 5); fsync "
                        "always commits at once")
    p.add_argument("--log-size", type=parse_log_size, default=None, metavar="SIZE",
                   help="size of the volume's intent log, which makes an fsync one device flush "
                        "(default 32M; made or resized at mount; 0: no log, every fsync commits "
                        "to the packs and LMDB, three device flushes)")
    p.add_argument("--no-xattrs", dest="xattrs", action="store_false",
                   help="no extended attributes on this mount (PostgreSQL uses none): the kernel "
                        "then stops asking for security.capability before every write(2), one "
                        "round trip to the daemon less per write")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log-file", help=argparse.SUPPRESS)     # set by the detached start

    p = sub.add_parser("umount", help="flush and unmount a mounted volume",
                       description="Unmount a cowfs mount; returns after the daemon committed "
                                   "every buffered write and exited.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")

    p = sub.add_parser("fsck", help="check a store for consistency (exit 0 only when clean)",
                       description="Check every record, chunk reference, reference count, pack "
                                   "location and directory tree of STORE. Prints one line per "
                                   "problem; exit 0 only when the store is consistent. Safe "
                                   "while volumes are mounted.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--verify-data", action="store_true",
                   help="also re-read every chunk and compare it with its checksum (slow)")
    _add_snapshot_commands(sub)
    for module in _command_modules():
        module.add_commands(sub)
    return parser


def _command_modules():
    """CLI modules of other areas; each has add_commands(sub) and COMMANDS."""
    from . import cli_lifecycle, cli_ops, cli_pg, cli_transfer
    return (cli_lifecycle, cli_pg, cli_ops, cli_transfer)


def _add_snapshot_commands(sub) -> None:
    p = sub.add_parser("snapshot", help="take a point-in-time snapshot VOL@SNAP (metadata only)",
                       description="Record the current state of VOL as snapshot SNAP. Costs the "
                                   "same whatever the volume size. If VOL is mounted, its daemon "
                                   "includes every write acknowledged before this command.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("target", metavar="VOL@SNAP")

    p = sub.add_parser("clone", help="writable volume from VOL@SNAP, or from VOL (snapshot now)",
                       description="Create volume NEWVOL that starts as SOURCE. SOURCE is VOL@SNAP, "
                                   "or VOL (a snapshot 'clone-NEWVOL' is taken first). Writes to "
                                   "either side are invisible to the other.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("new_volume", metavar="NEWVOL")

    p = sub.add_parser("list", help="volumes and snapshots with origin, time and space",
                       description="Volumes and their snapshots. LOGICAL: bytes of files; WRITTEN: "
                                   "bytes written since the previous snapshot; UNIQUE: bytes only "
                                   "it holds (what destroying it frees). NOTES: the origin of a "
                                   "clone, holds and their reasons, the clones a snapshot keeps "
                                   "alive, 'auto' for scheduled snapshots.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("destroy", help="remove snapshots (VOL@SNAP, VOL@A%%B, VOL@A,B) or an unmounted volume",
                       description="Remove a snapshot, a set of snapshots, or an unmounted volume "
                                   "with its snapshots. A set is names and ranges separated by "
                                   "commas; a range A%%B is every snapshot from A to B inclusive, "
                                   "by creation, a side left empty meaning the first or the last "
                                   "(as zfs destroy): the set goes in one transaction, all or "
                                   "none. Data a clone still needs stays (the snapshot just leaves "
                                   "the list). The freed space is back when the command returns.",
                       epilog="Examples: cowfs destroy /srv/cowfs main@before-upgrade; "
                              "cowfs destroy /srv/cowfs main@auto-20260101T000000Z%%auto-20260601T000000Z; "
                              "cowfs destroy /srv/cowfs main@%%auto-20260601T000000Z (everything up to it)")
    p.add_argument("store", metavar="STORE")
    p.add_argument("target", metavar="VOL|VOL@SNAP|VOL@A%B|VOL@A,B")

    p = sub.add_parser("rollback", help="return an unmounted volume to VOL@SNAP (undoable)",
                       description="Make unmounted VOL read as snapshot SNAP. Newer snapshots are "
                                   "kept, and the state before the rollback is kept as snapshot "
                                   "pre-rollback-<time>, so the rollback can itself be undone.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("target", metavar="VOL@SNAP")

    p = sub.add_parser("rename", help="rename a volume (OLD NEW) or a snapshot (VOL@OLD NEW)")
    p.add_argument("store", metavar="STORE")
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")

    p = sub.add_parser(
        "gc", help="reclaim pack space no longer referenced (safe while mounted, works when full)",
        description="Remove packs without live chunks, compact packs with at least --min-dead "
                    "dead space when their live part fits on the disk, and punch the dead ranges "
                    "of the others out in place. Needs no free space, so it works on a full "
                    "store; asks mounted volumes' daemons to close the packs they append to. "
                    "Deleting files and destroying snapshots already give most space back by "
                    "themselves; gc gets the rest. Exit code 7 when it freed nothing and the "
                    "store is full of live data: then delete files or destroy snapshots "
                    "('cowfs df STORE' names the snapshots that hold deleted data).")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--min-dead", type=float, default=0.25, metavar="FRACTION",
                   help="compact packs with at least this fraction of dead bytes (default 0.25)")

    p = sub.add_parser("df", help="space: free space levels, what snapshots hold, what destroying each item frees")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _say(args, func, words) -> int:
    """Run func(store), print what `words` makes of its result."""
    print(words(with_store(args, func)))
    return 0


def cmd_snapshot(args) -> int:
    from . import admin
    return _say(args, lambda store: admin.snapshot(store, args.target),
                lambda r: f"created snapshot {r['target']}")


def cmd_clone(args) -> int:
    from . import admin
    return _say(args, lambda store: admin.clone(store, args.source, args.new_volume),
                lambda r: f"created volume {r['volume']} from {r['origin']}"
                          + (f" (snapshot {r['origin']} taken now)" if r["snapshot_taken"] else ""))


def _destroyed_words(r: dict) -> str:
    """`cowfs destroy`'s sentence, also for snapshots that only lose their name."""
    if "destroyed" in r:                  # a set of snapshots
        names = r["destroyed"]
        text = (f"destroyed {len(names)} snapshot(s) of {r['volume']} ({names[0]} .. {names[-1]}), "
                f"freed {human(r['frees_bytes'])}")
        for name, clones in r["kept_for"].items():
            text += f"; {name} removed from the list, its data stays for clone(s) {', '.join(clones)}"
        return text
    if not r["kept_for"]:
        return f"destroyed {'snapshot' if '@' in r['target'] else 'volume'} {r['target']}"
    clones = ", ".join(r["kept_for"])
    if "@" in r["target"]:
        return f"snapshot {r['target']} removed from the list; its data stays for clone(s) {clones}"
    return f"destroyed volume {r['target']}; the data clone(s) {clones} need stays"


def cmd_destroy(args) -> int:
    from . import admin
    return _say(args, lambda store: admin.destroy(store, args.target), _destroyed_words)


def cmd_rollback(args) -> int:
    from . import admin
    return _say(args, lambda store: admin.rollback(store, args.target),
                lambda r: f"volume {r['volume']} rolled back to @{r['snapshot']}; the state before is "
                          f"snapshot {r['volume']}@{r['undo']}")


def cmd_rename(args) -> int:
    from . import admin
    return _say(args, lambda store: admin.rename(store, args.old, args.new),
                lambda r: f"renamed {r['kind']} {r['old']} to {r['new']}")


def cmd_list(args) -> int:
    import json
    from . import reports
    rows = with_store(args, reports.listing)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'NAME':<40} {'TYPE':<9} {'CREATED':<21} {'LOGICAL':>10} {'WRITTEN':>10} {'UNIQUE':>10}  "
          "ORIGIN / NOTES")
    for row in rows:
        print(f"{row['name']:<40} {row['type']:<9} {row['created']:<21} {human(row['logical_bytes']):>10} "
              f"{human(row['written_bytes']):>10} {human(row['unique_bytes']):>10}  {_list_notes(row)}")
    return 0


def _list_notes(row: dict) -> str:
    """Origin of a clone; why a snapshot stays: hold, dependent clones, schedule."""
    notes = [row["origin"] or "-"]
    if row.get("held"):
        notes.append(f"held: {row.get('hold_reason') or 'no reason given'}")
    if row.get("clones"):
        notes.append(f"clones: {', '.join(row['clones'])}")
    if row.get("auto"):
        notes.append("auto")
    return "; ".join(notes)


def cmd_gc(args) -> int:
    from . import admin, progress
    with progress.Progress("gc") as bar:
        def report(done_bytes: int, total_bytes: int) -> None:
            bar.total = total_bytes
            bar.update(done_bytes)
        result = with_store(args, lambda store: admin.collect_garbage(store, args.min_dead, report))
    skipped = result["packs_skipped_no_space"]
    full = result.pop("store_full")
    print(f"gc: packs {human(result['bytes_before'])} -> {human(result['bytes_after'])}; "
          f"{result['packs_removed']} packs removed, {result['packs_compacted']} compacted, "
          f"{result['chunks_moved']} chunks moved, {result['packs_punched']} punched "
          f"({human(result['bytes_punched'])} given back in place)"
          + (f"; {skipped} not compacted for lack of space" if skipped else ""))
    if full and result["bytes_after"] >= result["bytes_before"]:
        print("cowfs: gc freed nothing and the store is full of live data"
              + (f" ({skipped} pack(s) too full to compact)" if skipped else "")
              + "; delete files or destroy snapshots ('cowfs df STORE' shows what frees space)",
              file=sys.stderr)
        return errors.EXIT_IO
    return 0


def cmd_df(args) -> int:
    import json
    from . import reports
    report = with_store(args, reports.df)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    fs = report["filesystem"]
    print(f"filesystem     {human(fs['size_bytes'])}, {human(fs['free_bytes'])} free, of which "
          f"{human(fs['reserve_bytes'])} kept for deleting and {human(fs['grace_bytes'])} for "
          "finishing writes and crash recovery when the store fills")
    print(f"stored chunks  {human(report['chunk_bytes'])} in {report['chunks']} chunks; "
          f"packs on disk {human(report['pack_bytes'])} ({human(report['garbage_bytes'])} reclaimable "
          f"by gc); dedup ratio {report['dedup_ratio']}")
    held = [item for item in report["items"] if "@" in item["name"] and item["frees_bytes"]]
    print(f"held only by snapshots {human(report['snapshot_held_bytes'])}"
          + (f": destroying frees it, e.g. {', '.join(_largest(held))}" if held else ""))
    print(f"{'NAME':<50} {'DESTROY FREES':>14}")
    for item in report["items"]:
        print(f"{item['name']:<50} {human(item['frees_bytes']):>14}")
    return 0


def _largest(items: list[dict], count: int = 3) -> list[str]:
    ranked = sorted(items, key=lambda item: item["frees_bytes"], reverse=True)[:count]
    return [f"{item['name']} ({human(item['frees_bytes'])})" for item in ranked]


def cmd_init(args) -> int:
    from . import volumes
    from .store import Store
    path = os.path.abspath(args.store)
    ours = not os.path.exists(path)          # made by this command: ours to remove if it fails
    try:
        store = Store.create(path, args.chunk_size)
    except OSError as exc:
        if ours:
            import shutil
            shutil.rmtree(path, ignore_errors=True)
        raise errors.StoreIOError(f"cannot create a store in {path} ({exc.strerror or exc}); give a "
                                  "directory on a writable local filesystem") from exc
    try:
        with store.env.begin(write=True) as txn:
            volumes.create_empty(txn, store.env, "main")
    finally:
        store.close()
    print(f"created store {path} (chunk size {args.chunk_size} bytes) with empty volume 'main'")
    return 0


def cmd_mount(args) -> int:
    from . import mounting, snapshots
    snapshots.parse_target(args.volume)
    if args.foreground:
        from . import daemon
        logs.configure(args.log_file, args.debug)
        return daemon.run(args.store, args.mountpoint, args.volume, args.ready_fd, args.commit_interval,
                          args.log_size, args.xattrs)
    extra = [] if args.log_size is None else ["--log-size", str(args.log_size)]
    if not args.xattrs:
        extra.append("--no-xattrs")
    mounting.spawn(args.store, args.mountpoint, args.volume, args.commit_interval, extra)
    return 0


def cmd_umount(args) -> int:
    from . import mounting
    mounting.unmount(args.mountpoint)
    return 0


def cmd_fsck(args) -> int:
    from . import fsck, progress
    with progress.Progress("fsck: verifying data", quiet=not args.verify_data) as bar:
        def on_progress(done_bytes, total_bytes):
            bar.total = total_bytes        # unchanged after the first call: cheap
            bar.update(done_bytes)
        report = fsck.run(args.store, verify_data=args.verify_data, progress=on_progress)
    for problem in report.problems:
        print(problem)
    summary = ", ".join(f"{n} {what}" for what, n in sorted(report.counts.items()))
    if report.problems:
        print(f"fsck: {len(report.problems)} problems found ({summary})", file=sys.stderr)
        return errors.EXIT_FAILURE
    print(f"fsck: store is consistent ({summary})")
    return 0


COMMANDS = {"init": cmd_init, "mount": cmd_mount, "umount": cmd_umount, "fsck": cmd_fsck,
            "snapshot": cmd_snapshot, "clone": cmd_clone, "list": cmd_list, "destroy": cmd_destroy,
            "rollback": cmd_rollback, "rename": cmd_rename, "gc": cmd_gc, "df": cmd_df}


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return errors.EXIT_USAGE
        logs.configure(None, args.debug)
        handlers = dict(COMMANDS)
        for module in _command_modules():
            handlers.update(module.COMMANDS)
        return handlers[args.command](args)
    except CowfsError as exc:
        print(f"cowfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `cowfs df STORE | head`: the reader went away; no traceback, and
        # none at exit when Python flushes stdout again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return errors.EXIT_FAILURE
    except OSError as exc:
        # The last net for an operating-system error that no command turned
        # into a message of its own: one line, never a traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"cowfs: {args.command} failed: {exc.strerror or exc}{where}; check the path and its "
              "filesystem, then try again", file=sys.stderr)
        return errors.EXIT_IO


if __name__ == "__main__":
    sys.exit(main())
