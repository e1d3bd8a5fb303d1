"""An open-loop ledger: the write probe that proves no acknowledged commit is lost or doubled.

Writers run transactions on a fixed schedule (``rate_per_s``), whatever the
server does; each transaction

    inserts row n (n = 1, 2, 3 ... never reused) into cowfs_ledger, with a
    value of the sequence cowfs_ledger_seq (a UNIQUE column: a sequence that
    went back after a switch fails the insert, a client error),
    adds 1 to cowfs_ledger_counter.applied (so applied = count(*) holds only
    if every transaction was applied exactly once).

A number counts as acknowledged once psql printed the line that follows
its COMMIT. Its *commit wait* is the time from when it was scheduled to that
line: a pause of the server or of PgBouncer shows as long waits of every
transaction scheduled meanwhile (that is the point of an open loop; a
closed loop would just send fewer). A reader beside the writers counts the
rows over and over; the count a client sees must never go down.

A psql that fails (ON_ERROR_STOP) is an error: its transaction may or may
not have committed, and the writer reconnects and goes on.

    python -m cowfs.pg.ledger write  --bin DIR --host SOCKET_DIR --port N --acked FILE
    python -m cowfs.pg.ledger verify --bin DIR --host SOCKET_DIR --port N --acked FILE

``write`` runs until SIGTERM/SIGINT, appends each acknowledged number to
FILE and prints its figures; ``verify`` checks that every number in FILE is
in the table and that counter and sequence agree (exit 0), or says what is
wrong (exit 1). The tests and tools/demo.sh use it.
"""

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

TABLE = "cowfs_ledger"
COUNTER = "cowfs_ledger_counter"
SEQUENCE = "cowfs_ledger_seq"
CREATE_SQL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (n bigint PRIMARY KEY, seq bigint NOT NULL UNIQUE,
                                    at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {COUNTER} (id int PRIMARY KEY, applied bigint NOT NULL);
INSERT INTO {COUNTER} VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE SEQUENCE IF NOT EXISTS {SEQUENCE};
"""
RECONNECT_PAUSE_S = 0.05
READ_INTERVAL_S = 0.05
RATE_PER_S = 50.0
WRITERS = 4


def _psql_command(bin_dir: str, host: str, port: int, database: str) -> list:
    return [os.path.join(bin_dir, "psql"), "-h", host, "-p", str(port), "-U", "postgres",
            "-d", database, "-XAtq", "-v", "ON_ERROR_STOP=1", "-f", "-"]


def _spawn_kwargs() -> dict:
    """psql refuses nothing as root, but the socket may only be open to postgres: run as it."""
    kwargs = dict(env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}, cwd="/")
    if os.geteuid() == 0:
        kwargs["user"] = "postgres"
    return kwargs


def run_sql(bin_dir: str, host: str, port: int, sql: str, database: str = "postgres") -> str:
    result = subprocess.run(_psql_command(bin_dir, host, port, database), input=sql,
                            capture_output=True, text=True, timeout=300, **_spawn_kwargs())
    if result.returncode != 0:
        raise RuntimeError(f"psql failed: {result.stderr.strip()}")
    return result.stdout


class _Session:
    """One psql process fed by a pipe; `send` returns its answer line, None once it died."""

    def __init__(self, command: list):
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1,
                                     **_spawn_kwargs())

    def send(self, sql: str, marker: str) -> Optional[list]:
        """The lines psql printed before ``marker``; None if psql failed on the way."""
        try:
            self.proc.stdin.write(f"{sql}\n\\echo {marker}\n")
            self.proc.stdin.flush()
            lines = []
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    return None
                if line.rstrip("\n") == marker:
                    return lines
                lines.append(line.rstrip("\n"))
        except (BrokenPipeError, OSError, ValueError):
            return None

    def close(self) -> str:
        """End psql; what it wrote to stderr (its error, if it failed)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return err.strip()


@dataclass
class Figures:
    acked: list = field(default_factory=list)       # acknowledged numbers
    errors: list = field(default_factory=list)      # one line per failed psql
    reconnects: int = 0
    max_wait_s: float = 0.0                         # longest commit wait (scheduled -> acked)
    reads: int = 0
    read_errors: list = field(default_factory=list)
    count_went_down: int = 0                        # reader saw fewer rows than before


class Ledger:
    """Open-loop writers and a reader in background threads."""

    def __init__(self, bin_dir: str, host: str, port: int, database: str = "postgres",
                 acked_path: Optional[str] = None, rate_per_s: float = RATE_PER_S,
                 writers: int = WRITERS, reader: bool = True):
        self.command = _psql_command(bin_dir, host, port, database)
        self.bin_dir, self.host, self.port, self.database = bin_dir, host, port, database
        self.rate_per_s, self.writers = rate_per_s, writers
        self.figures = Figures()
        self._acked_file = open(acked_path, "a") if acked_path else None
        self._lock = threading.Lock()
        self._tickets: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._schedule, daemon=True)]
        self._threads += [threading.Thread(target=self._write, daemon=True) for _ in range(writers)]
        if reader:
            self._threads.append(threading.Thread(target=self._read, daemon=True))
        self._next = 1

    @property
    def acked(self) -> list:
        return self.figures.acked

    @property
    def reconnects(self) -> int:
        return self.figures.reconnects

    def start(self) -> "Ledger":
        run_sql(self.bin_dir, self.host, self.port, CREATE_SQL, self.database)
        self._next = int(run_sql(self.bin_dir, self.host, self.port,
                                 f"SELECT coalesce(max(n), 0) + 1 FROM {TABLE}", self.database))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> Figures:
        self._stop.set()
        for _ in range(self.writers):
            self._tickets.put(None)
        for thread in self._threads:
            thread.join(timeout=120)
        if self._acked_file:
            self._acked_file.close()
        return self.figures

    def _schedule(self) -> None:
        """A ticket (n, scheduled time) every 1/rate s, whether or not writers keep up."""
        started = time.monotonic()
        for i in range(sys.maxsize):
            due = started + i / self.rate_per_s
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            self._tickets.put((self._next + i, due))

    def _write(self) -> None:
        session = _Session(self.command)
        while True:
            ticket = self._tickets.get()
            if ticket is None or self._stop.is_set():
                break
            n, due = ticket
            sql = (f"BEGIN;\nINSERT INTO {TABLE} (n, seq) VALUES ({n}, nextval('{SEQUENCE}'));\n"
                   f"UPDATE {COUNTER} SET applied = applied + 1 WHERE id = 1;\nCOMMIT;")
            if session.send(sql, f"ack {n}") is not None:
                self._acknowledge(n, time.monotonic() - due)
                continue
            self._failed(session.close(), self.figures.errors)
            time.sleep(RECONNECT_PAUSE_S)
            session = _Session(self.command)
        session.close()

    def _acknowledge(self, n: int, wait_s: float) -> None:
        with self._lock:
            self.figures.acked.append(n)
            self.figures.max_wait_s = max(self.figures.max_wait_s, wait_s)
            if self._acked_file:
                self._acked_file.write(f"{n}\n")
                self._acked_file.flush()

    def _failed(self, error: str, into: list) -> None:
        with self._lock:
            into.append(error.splitlines()[-1] if error else "psql ended")
            self.figures.reconnects += 1

    def _read(self) -> None:
        session, seen = _Session(self.command), 0
        while not self._stop.wait(READ_INTERVAL_S):
            lines = session.send(f"SELECT count(*) FROM {TABLE};", "read")
            if lines is None:
                self._failed(session.close(), self.figures.read_errors)
                session = _Session(self.command)
                continue
            count = int(lines[-1])
            with self._lock:
                self.figures.reads += 1
                self.figures.count_went_down += count < seen
            seen = max(seen, count)
        session.close()


def missing_rows(bin_dir: str, host: str, port: int, acked: list, database: str = "postgres") -> list:
    """The acknowledged numbers that are not in the table."""
    present = set(int(x) for x in run_sql(bin_dir, host, port, f"SELECT n FROM {TABLE}",
                                          database).split())
    return sorted(set(acked) - present)


def state(bin_dir: str, host: str, port: int, database: str = "postgres") -> dict:
    """rows, applied (counter), max_seq and the sequence's last_value, on one server."""
    row = run_sql(bin_dir, host, port, f"""
        SELECT (SELECT count(*) FROM {TABLE}), (SELECT applied FROM {COUNTER} WHERE id = 1),
               (SELECT coalesce(max(seq), 0) FROM {TABLE}),
               (SELECT coalesce(last_value, 0) FROM pg_sequences WHERE sequencename = '{SEQUENCE}')
    """, database).strip()
    rows, applied, max_seq, last_value = map(int, row.split("|"))
    return dict(rows=rows, applied=applied, max_seq=max_seq, last_value=last_value)


def problems(bin_dir: str, host: str, port: int, acked: list, database: str = "postgres",
             sequence: bool = True) -> list:
    """What is wrong with the ledger on one server: lost rows, doubled applies, a sequence behind.

    ``sequence``: check the sequence too (on a server that serves; one that
    follows by logical replication gets sequence states only when it takes over).
    """
    found = []
    missing = missing_rows(bin_dir, host, port, acked, database)
    if missing:
        found.append(f"{len(missing)} of {len(acked)} acknowledged rows are MISSING: {missing[:20]}")
    s = state(bin_dir, host, port, database)
    if s["applied"] != s["rows"]:
        found.append(f"the counter says {s['applied']} transactions applied, the table has "
                     f"{s['rows']} rows")
    if sequence and s["last_value"] < s["max_seq"]:
        found.append(f"sequence {SEQUENCE} is at {s['last_value']}, behind the used value {s['max_seq']}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cowfs.pg.ledger", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("write", "verify"))
    parser.add_argument("--bin", required=True, help="PostgreSQL bin directory (for psql)")
    parser.add_argument("--host", required=True, help="socket directory of the server or PgBouncer")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--acked", required=True, help="file of acknowledged numbers")
    parser.add_argument("--database", default="postgres")
    parser.add_argument("--rate", type=float, default=RATE_PER_S, help="transactions per second")
    args = parser.parse_args(argv)
    if args.action == "verify":
        with open(args.acked) as f:
            acked = [int(line) for line in f if line.strip()]
        found = problems(args.bin, args.host, args.port, acked, args.database)
        for problem in found:
            print(f"ledger: {problem}", file=sys.stderr)
        if not found:
            s = state(args.bin, args.host, args.port, args.database)
            print(f"ledger: all {len(acked)} acknowledged rows present, each applied once "
                  f"({s['rows']} rows, counter {s['applied']}), sequence at {s['last_value']} "
                  f">= every used value")
        return 1 if found else 0
    ledger = Ledger(args.bin, args.host, args.port, args.database, acked_path=args.acked,
                    rate_per_s=args.rate).start()
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    done.wait()
    f = ledger.stop()
    print(f"ledger: {len(f.acked)} commits acknowledged at {args.rate:g}/s, longest commit wait "
          f"{f.max_wait_s:.3f} s, {len(f.errors)} client errors, {f.reads} reads "
          f"({len(f.read_errors)} failed, count went down {f.count_went_down} times)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
