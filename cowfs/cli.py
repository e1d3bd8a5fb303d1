"""Command line: argument parsing and output only.

Every failure a user can cause ends as one line ``cowfs: <what failed; what
to do>`` on stderr and the exit code of its error class (`errors`).
"""

import argparse
import logging
import os
import subprocess
import sys

from . import errors, schema
from .errors import CowfsError, UsageError

_SIZE_UNITS = {"": 1, "K": 1024, "KI": 1024, "KIB": 1024, "M": 1 << 20, "MI": 1 << 20, "MIB": 1 << 20}


def parse_size(text: str) -> int:
    """'8192', '8K', '8KiB', '1M' -> bytes."""
    digits = text.rstrip("KkMmIiBb")
    unit = text[len(digits):].upper()
    if not digits.isdigit() or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 8192, 8K, 64KiB, 1M)")
    return int(digits) * _SIZE_UNITS[unit]


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
    parser.add_argument("--version", action="version", version="cowfs 0.1.0 (store format "
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
    p.add_argument("--volume", default="main", metavar="NAME", help="volume to mount (default: main)")
    p.add_argument("--foreground", action="store_true",
                   help="serve in this process until unmounted (for service managers); "
                        "logs go to stderr")
    p.add_argument("--commit-interval", type=float, default=5.0, metavar="SECONDS",
                   help="commit buffered writes at least this often (default 5); fsync "
                        "always commits at once")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

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
    return parser


def cmd_init(args) -> int:
    from . import volumes
    from .store import Store
    store = Store.create(args.store, args.chunk_size)
    try:
        with store.env.begin(write=True) as txn:
            volumes.create_empty(txn, store.env, "main")
    finally:
        store.close()
    print(f"created store {os.path.abspath(args.store)} (chunk size {args.chunk_size} bytes) "
          "with empty volume 'main'")
    return 0


def cmd_mount(args) -> int:
    from . import volumes
    volumes.check_name(args.volume)
    if args.foreground:
        from . import daemon
        return daemon.run(args.store, args.mountpoint, args.volume, args.ready_fd, args.commit_interval)
    return _spawn_daemon(args)


def _spawn_daemon(args) -> int:
    """Start `cowfs mount --foreground` detached and wait until it says how it went."""
    run_dir = os.path.join(os.path.abspath(args.store), "run")
    log_path = os.path.join(run_dir, f"{args.volume}.log") if os.path.isdir(run_dir) else os.devnull
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "cowfs", "mount", args.store, args.mountpoint, "--volume", args.volume,
           "--foreground", "--ready-fd", str(write_fd), "--commit-interval", str(args.commit_interval)]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=log_file, start_new_session=True)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.read().decode(errors="replace").strip()
    if answer == "OK":
        return 0
    if answer.startswith("ERR "):
        code, _, message = answer[4:].partition(" ")
        print(f"cowfs: {message}", file=sys.stderr)
        return int(code)
    proc.wait()
    print(f"cowfs: the mount daemon exited with status {proc.returncode} before the mount was "
          f"ready; see {log_path}", file=sys.stderr)
    return errors.EXIT_FAILURE


def cmd_umount(args) -> int:
    from . import daemon
    daemon.unmount(args.mountpoint)
    return 0


def cmd_fsck(args) -> int:
    from . import fsck
    report = fsck.run(args.store, verify_data=args.verify_data)
    for problem in report.problems:
        print(problem)
    summary = ", ".join(f"{n} {what}" for what, n in sorted(report.counts.items()))
    if report.problems:
        print(f"fsck: {len(report.problems)} problems found ({summary})", file=sys.stderr)
        return errors.EXIT_FAILURE
    print(f"fsck: store is consistent ({summary})")
    return 0


COMMANDS = {"init": cmd_init, "mount": cmd_mount, "umount": cmd_umount, "fsck": cmd_fsck}


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return errors.EXIT_USAGE
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        return COMMANDS[args.command](args)
    except CowfsError as exc:
        print(f"cowfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
