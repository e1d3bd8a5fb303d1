"""`cowfs pg bisect`: which snapshot first fails a check.

The candidates are VOL's named snapshots in time order, bounded by
``--from``/``--to`` (inclusive). The search assumes the check is monotone
over them: good ... good, bad ... bad. It keeps the invariant "everything at
or before `lo` is good, everything at or after `hi` is bad" with virtual
ends lo = -1 and hi = N, and probes the middle until they meet. So N
candidates need at most ceil(log2(N+1)) probes, each starting one server;
the ends are never probed on their own (a range that is all good or all bad
is reported as such).

A probe: clone the snapshot, mount the clone, start a server on it (crash
recovery of a snapshot taken while the live server ran; a standby's snapshot
is recovered and promoted, see standby.py), run the check
(true = good, false = bad), stop the server immediately (the clone is thrown
away, a checkpoint would be wasted), unmount and destroy the clone. A check
that fails with an error stops the search: a broken check must not be read
as "bad".
"""

import math
import os
import time
from dataclasses import dataclass
from typing import Optional

from .. import admin, snapshots, volumes
from ..errors import CowfsError, NotFoundError, UsageError
from ..store import Store
from . import cluster, standby
from .rehearse import stamp
from .report import Report, StepError
from .server import PgError, PgServer, free_port
from .upgrade import CLONE_SERVER_SETTINGS, check_pgdata
from .workspace import Workspace, terminate_cleanly


@dataclass
class BisectOptions:
    store: str
    volume: str
    pgdata: str
    bin_dir: str
    check_sql: str
    database: str = "postgres"
    from_snapshot: Optional[str] = None
    to_snapshot: Optional[str] = None
    port: Optional[int] = None


def max_probes(candidates: int) -> int:
    """The most servers a bisect over ``candidates`` snapshots starts."""
    return math.ceil(math.log2(candidates + 1))


def candidates(store: Store, volume: str, first: Optional[str], last: Optional[str]) -> list:
    """[(name, created_ns)] of VOL's named snapshots, oldest first, within [first, last]."""
    with store.env.begin() as txn:
        vol_id = volumes.volume_id(txn, store.env, volume)
        snaps = [(rec["name"], rec["created_ns"]) for _gen, rec in
                 snapshots.snapshots_of(txn, store.env, vol_id) if rec["name"]]
    names = [name for name, _ in snaps]
    lo = _index(names, first, volume, "--from") if first else 0
    hi = _index(names, last, volume, "--to") if last else len(snaps) - 1
    if not snaps or lo > hi:
        raise UsageError(f"no snapshots of {volume} to bisect between "
                         f"{first or 'the first'} and {last or 'the last'}; 'cowfs list "
                         f"{store.path}' shows them")
    return snaps[lo:hi + 1]


def _index(names: list, name: str, volume: str, option: str) -> int:
    name = name.split("@", 1)[1] if "@" in name else name
    if name not in names:
        raise NotFoundError(f"{option} {name}: volume {volume} has no such snapshot; "
                            "'cowfs list STORE' shows them")
    return names.index(name)


def bisect(opts: BisectOptions) -> Report:
    pgdata = check_pgdata(opts.pgdata)
    PgServer(opts.bin_dir, "/")              # a bin dir without a server fails here, early
    if not opts.check_sql.strip():
        raise UsageError("--check is empty; give SQL that returns true on a good snapshot")
    store = Store.open(opts.store)
    try:
        snaps = candidates(store, opts.volume, opts.from_snapshot, opts.to_snapshot)
        with terminate_cleanly():
            return _Bisect(store, opts, pgdata, snaps).run()
    finally:
        store.close()


class _Bisect:
    def __init__(self, store: Store, opts: BisectOptions, pgdata: str, snaps: list):
        self.store, self.opts, self.pgdata, self.snaps = store, opts, pgdata, snaps
        self.report = Report("bisect")
        self.ws = Workspace()
        self.servers_started = 0
        self.probes = []

    def run(self) -> Report:
        lo, hi = -1, len(self.snaps)
        try:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self._probe(mid):
                    lo = mid
                else:
                    hi = mid
        except CowfsError as exc:
            if self.report.failed_step is None:
                self.report.error = str(exc)
        finally:
            self.report.remains.extend(self.ws.close(keep_logs=not self.report.ok))
            if not self.report.ok:
                self.report.facts["logs"] = self.ws.run_dir
        self._conclude(lo, hi)
        return self.report

    def _probe(self, index: int) -> bool:
        name, _created = self.snaps[index]
        clone = f"{self.opts.volume}-bisect-{stamp()}"
        with self.report.step(f"probe {name}") as step:
            admin.clone(self.store, f"{self.opts.volume}@{name}", clone)
            try:
                good, output = self._check_on(clone)
            finally:
                admin.destroy(self.store, clone)
            step.detail = f"{'good' if good else 'bad'} (check said {output[-80:] or 'nothing'!r})"
        self.probes.append(dict(snapshot=name, created=_iso(self.snaps[index][1]),
                                result="good" if good else "bad"))
        return good

    def _check_on(self, clone: str) -> tuple:
        mnt = self.ws.mount(self.store.path, clone)
        try:
            data_dir = os.path.join(mnt, self.pgdata)
            cluster.data_dir_major(data_dir)
            cluster.forget_stale_pid_file(data_dir)
            server = self.ws.started(PgServer(self.opts.bin_dir, data_dir))
            self.servers_started += 1
            standby.start_clone(server, self.opts.port or free_port(), self.ws.run_dir,
                                CLONE_SERVER_SETTINGS, mnt)
            try:
                output = server.psql(self.opts.check_sql, database=self.opts.database)
            except PgError as exc:
                raise StepError(f"the check failed with an error, not false: {exc}") from None
            finally:
                server.stop("immediate")
                self.ws.servers.remove(server)
        finally:
            self.ws.unmount(mnt)
        last = output.strip().splitlines()[-1].strip() if output.strip() else ""
        if last not in ("t", "f"):
            raise StepError(f"the check must return true or false; its last line was {last!r}")
        return last == "t", output.strip()

    def _conclude(self, lo: int, hi: int) -> None:
        facts = self.report.facts
        facts["candidates"] = len(self.snaps)
        facts["servers_started"] = self.servers_started
        facts["max_servers"] = max_probes(len(self.snaps))
        facts["probes"] = self.probes
        if not self.report.ok:
            return
        facts["last_good"] = self._describe(lo) if lo >= 0 else None
        facts["first_bad"] = self._describe(hi) if hi < len(self.snaps) else None
        if hi == len(self.snaps):
            facts["verdict"] = "every snapshot in the range is good"
        elif lo < 0:
            facts["verdict"] = "every snapshot in the range is bad: the change is older than the range"
        else:
            facts["verdict"] = (f"the check turns false between {self.snaps[lo][0]} and "
                                f"{self.snaps[hi][0]}")

    def _describe(self, index: int) -> dict:
        name, created_ns = self.snaps[index]
        return dict(snapshot=f"{self.opts.volume}@{name}", created=_iso(created_ns))


def _iso(ns: int) -> str:
    seconds, rest_ns = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest_ns // 1_000_000:03d}Z"
