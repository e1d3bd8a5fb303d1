"""Command line of copies to another store: send, receive, digest.

Parsing and output only; the work is done by `send`, `receive` and
`admin.content_digest`. Progress goes to stderr (see `progress`); a
summary goes to stdout, or to stderr when stdout carries the stream.
"""

import json
import os
import sys

from . import errors
from .cli_common import command_registry, human, with_store
from .progress import Progress

COMMANDS: dict = {}
_command = command_registry(COMMANDS)


def add_commands(sub) -> None:
    p = sub.add_parser(
        "send", help="write snapshot VOL@SNAP (or what changed since --from) as a stream",
        description="Write a stream of snapshot VOL@SNAP to stdout or --output FILE, for "
                    "'cowfs receive' on another store (through ssh, a compressor, a file). With "
                    "--from VOL@BASE, an older snapshot that the receiver already has (of the same "
                    "volume, or of the volume it was cloned from), only what changed in between is "
                    "sent: the stream's size follows "
                    "the change, not the volume. Every part of the stream is checksummed and it "
                    "carries the snapshot's content digest, which the receiver checks. The "
                    "snapshots are protected from destroy while they are sent. Progress goes to "
                    "stderr; the summary to stdout with --output, else to stderr.",
        epilog="Examples: cowfs send /srv/cowfs live@mon | ssh backup cowfs receive /srv/cowfs;  "
               "cowfs send /srv/cowfs live@tue --from live@mon --output /backup/live-tue.cows")
    p.add_argument("store", metavar="STORE")
    p.add_argument("target", metavar="VOL@SNAP", help="the snapshot to send")
    p.add_argument("--from", dest="base", metavar="VOL@BASE",
                   help="send only the changes since this older snapshot (same volume, or its origin's)")
    p.add_argument("--output", "-o", metavar="FILE", help="write the stream to FILE (must not exist)")
    p.add_argument("--json", action="store_true", help="summary as JSON, and no progress")

    p = sub.add_parser(
        "receive", help="create a snapshot (and its volume if new) from a 'cowfs send' stream",
        description="Read a stream of 'cowfs send' from stdin or --input FILE. A full stream "
                    "creates volume VOL (default: the sender's volume name) holding the snapshot. "
                    "An incremental one adds the snapshot to VOL, which must hold the base "
                    "snapshot, not be mounted, and not have changed since the base (its head "
                    "becomes the new snapshot); if VOL does not exist, it is made a clone of the "
                    "base snapshot here (sender's volume name, same digest) and takes the "
                    "changes. Nothing is visible until the whole stream was "
                    "read, every checksum and the content digest matched, and the one commit "
                    "that creates the snapshot is done: a damaged, truncated or interrupted "
                    "receive leaves nothing behind and can simply be run again. Chunks the store "
                    "already holds are not stored twice. Exit codes: 8 damaged or truncated stream "
                    "(send it again), 4 received already, 3 base snapshot missing, 5 volume "
                    "mounted, 1 volume changed since the base or base of other content.",
        epilog="Examples: ssh live cowfs send /srv/cowfs live@mon | cowfs receive /srv/cowfs;  "
               "cowfs receive /srv/cowfs live-copy --input /backup/live-mon.cows")
    p.add_argument("store", metavar="STORE")
    p.add_argument("volume", metavar="VOL", nargs="?", help="volume to receive into (default: the sender's name)")
    p.add_argument("--input", "-i", metavar="FILE", help="read the stream from FILE instead of stdin")
    p.add_argument("--json", action="store_true", help="summary as JSON, and no progress")

    p = sub.add_parser(
        "digest", help="content digest of VOL@SNAP (or of VOL now): equal trees, equal digests",
        description="Print one value over the whole tree of a snapshot: every name, attribute, "
                    "xattr and chunk id. Two snapshots with the same digest read the same, on any "
                    "store: a received snapshot has its sender's, a clone nobody wrote to has its "
                    "origin's. Cached per snapshot and kept in O(changes) from the one before. "
                    "VOL alone is the volume's current state (a mounted volume is flushed first).",
        epilog="Example: cowfs digest /srv/cowfs live@mon")
    p.add_argument("store", metavar="STORE")
    p.add_argument("target", metavar="VOL@SNAP|VOL")
    p.add_argument("--json", action="store_true", help="machine-readable output")


@_command("send")
def cmd_send(args) -> int:
    from . import send
    if args.output is None and sys.stdout.isatty():
        raise errors.UsageError("the stream would go to the terminal; pipe it (| cowfs receive ...), "
                                "redirect it (> FILE) or give --output FILE")
    try:
        out = sys.stdout.buffer if args.output is None else _new_file(args.output)
    except FileExistsError:
        raise errors.ExistsError(f"{args.output} exists; give a new file name (a stream is never "
                                 "written over a file)") from None
    try:
        with Progress("send", quiet=args.json) as progress:
            summary = with_store(args, lambda store: send.send(
                store, args.target, out, args.base, on_bytes=progress.advance,
                on_start=_total_setter(progress)))
    except BrokenPipeError:
        # The reader (a receive that refused the stream, ssh...) went away. No
        # second error when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise errors.CowfsError("the reader of the stream stopped before its end (see its own "
                                "error); the stream was not sent whole") from None
    except BaseException:
        if args.output is not None:
            out.close()
            os.unlink(args.output)          # no half stream left behind
        raise
    if args.output is not None:
        out.close()
    _summary(args, summary, sys.stdout if args.output else sys.stderr,
             f"sent {summary['snapshot']}"
             + (f" (changes since {summary['base']})" if summary["base"] else " (full)"))
    return 0


def _total_setter(progress: Progress):
    """on_start of send/receive: the size estimate, known once the header is."""
    def set_total(total_bytes: int) -> None:
        progress.total = total_bytes or None
    return set_total


def _new_file(path: str):
    from .send import open_output
    try:
        return open_output(path)
    except (FileNotFoundError, NotADirectoryError):
        raise errors.NotFoundError(f"cannot create {path}: its directory does not exist") from None


@_command("receive")
def cmd_receive(args) -> int:
    from . import receive
    if args.input is None and sys.stdin.isatty():
        raise errors.UsageError("give the stream on stdin (cowfs send ... | cowfs receive STORE) "
                                "or with --input FILE")
    try:
        inp = sys.stdin.buffer if args.input is None else open(args.input, "rb")
    except FileNotFoundError:
        raise errors.NotFoundError(f"stream file {args.input} does not exist") from None
    try:
        with Progress("receive", quiet=args.json) as progress:
            summary = with_store(args, lambda store: receive.receive(
                store, inp, args.volume, on_bytes=progress.advance, on_start=_total_setter(progress)))
    finally:
        if args.input is not None:
            inp.close()
    _summary(args, summary, sys.stdout, f"received {summary['snapshot']}"
             + (f" (changes since {summary['base']})" if summary["base"] else " (new volume)"))
    return 0


def _summary(args, summary: dict, stream, title: str) -> None:
    if args.json:
        print(json.dumps(summary, indent=1), file=stream)
        return
    seconds = max(summary["duration_s"], 1e-3)
    line = (f"{title}: {human(summary['stream_bytes'])} in {summary['duration_s']:.1f} s "
            f"({human(int(summary['stream_bytes'] / seconds))}/s), {summary['records']} records, "
            f"{summary['chunks']} chunks")
    if "stored_bytes" in summary:
        line += f" ({summary['chunks_stored']} not held here before: {human(summary['stored_bytes'])} stored)"
    print(f"{line}; digest {summary['digest']}", file=stream)


@_command("digest")
def cmd_digest(args) -> int:
    from . import admin
    result = with_store(args, lambda store: admin.content_digest(store, args.target))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{result['digest']}  {result['name']}")
    return 0
