"""A write probe that proves no committed transaction is lost.

The ledger client inserts numbered rows into ``cowfs_ledger``, one row per
transaction, and records a number only once psql has printed the line that
follows its INSERT: psql runs the script in order and commits each
statement on its own, so that line means the COMMIT returned. When the
server goes away (a cutover stops it), psql exits; the client reconnects
until a server answers again and goes on with the next number. The number in
flight at that moment was never acknowledged, so it may or may not be in the
table; every acknowledged number must be.

    python -m cowfs.pg.ledger write  --bin DIR --host SOCKET_DIR --port N --acked FILE
    python -m cowfs.pg.ledger verify --bin DIR --host SOCKET_DIR --port N --acked FILE

``write`` runs until SIGTERM/SIGINT and appends each acknowledged number to
FILE. ``verify`` checks that every number in FILE is in the table (exit 0)
or names the missing ones (exit 1). The tests and tools/demo.sh use it.
"""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

TABLE = "cowfs_ledger"
CREATE_SQL = f"CREATE TABLE IF NOT EXISTS {TABLE} (n bigint PRIMARY KEY, at timestamptz DEFAULT now())"
RECONNECT_PAUSE_S = 0.05


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


class Ledger:
    """Writes numbered rows in a background thread; `acked` holds the committed numbers."""

    def __init__(self, bin_dir: str, host: str, port: int, database: str = "postgres",
                 acked_path: Optional[str] = None):
        self.bin_dir, self.host, self.port, self.database = bin_dir, host, port, database
        self.acked: list = []
        self.reconnects = 0
        self._acked_file = open(acked_path, "a") if acked_path else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ledger", daemon=True)
        self._next = 1

    def start(self) -> "Ledger":
        run_sql(self.bin_dir, self.host, self.port, CREATE_SQL, self.database)
        self._next = int(run_sql(self.bin_dir, self.host, self.port,
                                 f"SELECT coalesce(max(n), 0) + 1 FROM {TABLE}", self.database))
        self._thread.start()
        return self

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(timeout=60)
        if self._acked_file:
            self._acked_file.close()
        return self.acked

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._session()
            if not self._stop.is_set():
                self.reconnects += 1
                time.sleep(RECONNECT_PAUSE_S)

    def _session(self) -> None:
        """One psql connection: insert and acknowledge until it dies or we stop."""
        proc = subprocess.Popen(_psql_command(self.bin_dir, self.host, self.port, self.database),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, bufsize=1, **_spawn_kwargs())
        try:
            while not self._stop.is_set():
                n = self._next
                self._next += 1                 # an unacknowledged number is never reused
                proc.stdin.write(f"INSERT INTO {TABLE} (n) VALUES ({n});\n\\echo ack {n}\n")
                proc.stdin.flush()
                if proc.stdout.readline().strip() != f"ack {n}":
                    return                      # connection lost: n may or may not be committed
                self.acked.append(n)
                if self._acked_file:
                    self._acked_file.write(f"{n}\n")
                    self._acked_file.flush()
        except (BrokenPipeError, OSError):
            return
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.wait(timeout=30)


def missing_rows(bin_dir: str, host: str, port: int, acked: list, database: str = "postgres") -> list:
    """The acknowledged numbers that are not in the table."""
    present = set(int(x) for x in run_sql(bin_dir, host, port, f"SELECT n FROM {TABLE}",
                                          database).split())
    return sorted(set(acked) - present)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cowfs.pg.ledger", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("write", "verify"))
    parser.add_argument("--bin", required=True, help="PostgreSQL bin directory (for psql)")
    parser.add_argument("--host", required=True, help="socket directory of the server")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--acked", required=True, help="file of acknowledged numbers")
    parser.add_argument("--database", default="postgres")
    args = parser.parse_args(argv)
    if args.action == "verify":
        with open(args.acked) as f:
            acked = [int(line) for line in f if line.strip()]
        missing = missing_rows(args.bin, args.host, args.port, acked, args.database)
        if missing:
            print(f"ledger: {len(missing)} of {len(acked)} acknowledged rows are MISSING: "
                  f"{missing[:20]}", file=sys.stderr)
            return 1
        print(f"ledger: all {len(acked)} acknowledged rows are present")
        return 0
    ledger = Ledger(args.bin, args.host, args.port, args.database, acked_path=args.acked).start()
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    done.wait()
    ledger.stop()
    print(f"ledger: {len(ledger.acked)} rows acknowledged, {ledger.reconnects} reconnects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
