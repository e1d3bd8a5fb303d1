"""The switch: the following server takes the live endpoint, the serving one follows it.

Used by `cutover --online` (old -> new) and `rollback-cutover --online`
(new -> old); A is the server that serves now, B the one that follows it.

    before the pause
      catch-up        a handover row per database on A; wait until B applied it
                      (A serves on meanwhile)
      return-link     per database, a slot on B and a disabled subscription on A
                      aimed at B's side port (it needs to reach B to learn the
                      tables); B's slot also decodes what B applies from A until
                      the swap, so A's subscription will start past that
      checkpoint      on A and B, so that their shutdowns below write little
    clients wait (PgBouncer PAUSE) from here ...
      pause           PAUSE returns once every transaction through PgBouncer
                      ended; past --pause-limit: RESUME, give up
      fence           A refuses writes from clients that bypass PgBouncer
                      (default_transaction_read_only) and we wait for their
                      running transactions, within the same limit
      drain           per database a handover row on A; once B shows it, B has
                      applied every commit of A
      sequences       A's sequence states onto B (replication carries rows only)
      hand-over       B's subscriptions disabled (they would reach B itself
                      next); B's WAL position now is where A's subscriptions
                      start (their origins advanced to it): all before it came
                      from A
      stop-A          fast shutdown
      B-takes-live-endpoint   B restarts on the live port, socket directory
                      and listen addresses
      resume          RESUME: clients go on, on B
    ... to here (write_pause_s)
      A-to-side-port  A starts on its side port
      A-follows       A's subscriptions aimed at the live endpoint, enabled;
                      B's old subscriptions and A's old slots dropped

Up to stop-A, giving up changes nothing: A's fence is lifted, PgBouncer
resumed, the return link dropped. After it, a failure puts B back on its
side port, A back on the live endpoint, B's subscriptions on again, and
resumes; the cutover window is as before the switch.

Without PgBouncer there is no pause: clients of A get read-only errors from
the fence, then connection errors until B listens; write_pause_s is then
that time, and the report says so.
"""

import time
from typing import Optional

from ..errors import CowfsError
from . import replication
from .pgbouncer import PgBouncerConsole
from .report import Report
from .server import PgError, PgServer
from .window import SWITCH_POLL_S, Window
from .workspace import stop_quietly

CREATE_SLOT_TIMEOUT_S = 60.0


class Switch:
    def __init__(self, window: Window, report: Report, console: Optional[PgBouncerConsole],
                 pause_limit_s: float, catch_up_timeout_s: float):
        self.w, self.report, self.console, self.limit_s = window, report, console, pause_limit_s
        self.catch_up_timeout_s = catch_up_timeout_s
        self.a_key, self.b_key = window.serving, window.following
        self.a, self.b = window.server(self.a_key), window.server(self.b_key)
        self.to_b = window.links_to(self.b_key)       # slots on A, subscriptions on B (now)
        self.to_a = window.links_to(self.a_key)       # slots on B, subscriptions on A (after)
        self.paused_at: Optional[float] = None
        self.deadline = 0.0

    def _step(self, name: str):
        return self.report.step(name.format(A=self.a_key, B=self.b_key))

    def run(self) -> dict:
        """Switch; facts for the report (write_pause_s, replication_lag_at_switch...)."""
        try:
            self._prepare_return_link()
            facts = self._hold_and_drain()
        except BaseException:
            self._give_up()
            raise
        try:
            self._swap()
        except BaseException:
            self._swap_back()
            raise
        # B serves from here on: nothing below may undo that, not even Ctrl-C.
        self._resume_after_swap()
        facts["write_pause_s"] = round(time.monotonic() - self.paused_at, 3)
        facts["clients_saw"] = (f"a wait in PgBouncer of at most {facts['write_pause_s']:.2f} s"
                                if self.console else
                                f"errors for {facts['write_pause_s']:.2f} s (read-only, then "
                                "connection refused): no --pgbouncer")
        self.w.serving = self.b_key
        self.w.switches.append(dict(to=self.b_key, time=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime()), **facts))
        self.w.save()
        self._follow()
        return facts

    # --- before the pause ------------------------------------------------------------------

    def _prepare_return_link(self) -> None:
        with self._step("catch-up") as step:
            # Lag left for the pause would be waited for with clients held.
            lag = replication.lag_bytes(self.a, self.to_b, replication.current_lsn(self.a))
            waited_s = self._wait_applied(self.catch_up_timeout_s)
            step.detail = (f"{self.b_key} had not confirmed {lag} bytes; it applied a handover "
                           f"row after {waited_s:.2f} s while {self.a_key} served")
        with self._step("return-link") as step:
            for i, db in enumerate(self.w.databases):
                replication.create_slot(self.b, db, self.to_a[i], CREATE_SLOT_TIMEOUT_S)
                replication.subscribe(self.a, db, self.to_a[i], self.w.side_conninfo(self.b_key, db),
                                      enabled=False)
            step.detail = (f"slots {', '.join(self.to_a)} on {self.b_key}; disabled subscriptions "
                           f"on {self.a_key}, aimed at {self.b_key}'s side port for now")
        with self._step("checkpoint"):
            replication.checkpoint(self.a)
            replication.checkpoint(self.b)

    # --- clients wait ------------------------------------------------------------------------

    def _remaining_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def _hold_and_drain(self) -> dict:
        self.paused_at = time.monotonic()
        self.deadline = self.paused_at + self.limit_s
        with self._step("pause") as step:
            if self.console is None:
                step.detail = "no --pgbouncer: clients are not held"
            else:
                waited_s = self.console.pause(self.limit_s)
                step.detail = f"PgBouncer paused after {waited_s:.2f} s"
        with self._step("fence") as step:
            replication.fence(self.a, self._remaining_s())
            step.detail = f"{self.a_key} refuses writes (default_transaction_read_only)"
        with self._step("drain") as step:
            lsn = replication.current_lsn(self.a)
            lag = replication.lag_bytes(self.a, self.to_b, lsn)
            catch_up_s = round(self._wait_applied(self._remaining_s()), 3)
            step.detail = (f"{self.b_key} had not confirmed {lag} bytes before {lsn}; it applied "
                           f"the handover rows after {catch_up_s} s")
        with self._step("sequences") as step:
            copied = sum(replication.copy_sequences(self.a, self.b, db) for db in self.w.databases)
            step.detail = f"{copied} sequences set on {self.b_key} as on {self.a_key}"
        # A restarts writable (as a follower, or as the server again if we give up later).
        replication.unfence(self.a, reload=False)
        return dict(replication_lag_at_switch=dict(bytes=lag, catch_up_s=catch_up_s, lsn=lsn))

    def _wait_applied(self, timeout_s: float) -> float:
        """A handover row per database on A; seconds until B applied them all."""
        started = time.monotonic()
        marks = [replication.mark(self.a, db) for db in self.w.databases]
        for db, n in zip(self.w.databases, marks):
            replication.wait_marked(self.b, db, n, max(0.0, started + timeout_s - time.monotonic()))
        return time.monotonic() - started

    def _give_up(self) -> None:
        """Nothing changed but the return link and the fence: undo them, let clients go on."""
        problems = []
        for undo in (lambda: replication.unfence(self.a, reload=True), self._resume_quietly,
                     self._drop_return_link):
            try:
                undo()
            except PgError as exc:
                problems.append(str(exc))
        if problems:
            self.report.remains.extend(problems)

    def _drop_return_link(self) -> None:
        for i, db in enumerate(self.w.databases):
            replication.unsubscribe(self.a, db, self.to_a[i])
        for name in replication.existing_slots(self.b, self.to_a):
            replication.drop_slot(self.b, name)

    # --- the swap -------------------------------------------------------------------------

    def _swap(self) -> None:
        with self._step("hand-over") as step:
            for i, db in enumerate(self.w.databases):
                replication.disable(self.b, db, self.to_b[i])
            lsn = replication.current_lsn(self.b)
            for i, db in enumerate(self.w.databases):
                replication.start_at(self.a, db, self.to_a[i], lsn)
            step.detail = f"{self.a_key} will follow {self.b_key} from {lsn}"
        with self._step("stop-{A}") as step:
            self.a.stop("fast", poll_s=SWITCH_POLL_S)
            step.detail = "fast shutdown"
        with self._step("{B}-takes-live-endpoint") as step:
            self.b.stop("fast", poll_s=SWITCH_POLL_S)
            self.w.serving = self.b_key
            self.w.start_serving(self.b)
            step.detail = (f"PostgreSQL {self.b.server_version()} on port {self.w.port}, "
                           f"socket directory {self.w.socket_dir}")

    def _swap_back(self) -> None:
        """After stop-A failed somewhere: A serves again, B follows as before; clients go on."""
        with self.report.step("switch-back") as step:
            self.w.serving = self.a_key
            stop_quietly(self.b)
            b = self.w.server(self.b_key)
            self.w.start_following(self.b_key, b)
            if not self.a.is_running():
                self.w.start_serving(self.w.server(self.a_key))
            self.a, self.b = self.w.server(self.a_key), b
            replication.unfence(self.a, reload=True)
            for i, db in enumerate(self.w.databases):
                replication.repoint(b, db, self.to_b[i], self.w.endpoint_conninfo(db))
            self._resume_quietly()
            self._drop_return_link()
            step.detail = f"{self.a_key} serves again; {self.b_key} follows it as before"

    def _resume(self) -> None:
        with self._step("resume") as step:
            if self.console is None:
                step.detail = "no --pgbouncer"
            else:
                self.console.resume()
                step.detail = f"clients go on, on {self.b_key}"

    def _resume_after_swap(self) -> None:
        try:
            self._resume()
        except BaseException as exc:
            try:
                self._resume_quietly()
            except BaseException:
                self.report.remains.append(f"PgBouncer is still PAUSED ({exc}): run RESUME on "
                                           "its console now")

    def _resume_quietly(self) -> None:
        if self.console is not None:
            self.console.resume()

    # --- after: A follows B --------------------------------------------------------------------

    def _follow(self) -> None:
        """A follows B. A failure here leaves the switch done: reported, repaired by `follow`."""
        try:
            with self._step("{A}-to-side-port") as step:
                ensure_following(self.w)
                step.detail = f"port {self.w.side(self.a_key).side_port} in {self.w.run_dir}"
            with self._step("{A}-follows") as step:
                step.detail = follow(self.w)
        except CowfsError as exc:
            self.report.remains.append(
                f"{self.b_key} serves, but {self.a_key} does not follow it yet ({exc}); "
                "rollback-cutover and finish-cutover retry that first")


def ensure_following(window: Window) -> PgServer:
    """The following server, started on its side port if it is not running."""
    key = window.following
    server = window.server(key)
    if not server.is_running():
        window.start_following(key, server)
    return server


def follow(window: Window) -> str:
    """Make the following server follow the serving one; a detail line. Idempotent.

    Its subscriptions are aimed at the live endpoint and enabled; what
    carried changes the other way before the last switch (subscriptions on
    the serving server, slots on the following one) is dropped.
    """
    follower_key, serving_key = window.following, window.serving
    follower, serving = ensure_following(window), window.server(serving_key)
    to_follower, to_serving = window.links_to(follower_key), window.links_to(serving_key)
    for i, db in enumerate(window.databases):
        replication.repoint(follower, db, to_follower[i], window.endpoint_conninfo(db))
        replication.unsubscribe(serving, db, to_serving[i])
    for name in replication.existing_slots(follower, to_serving):
        replication.drop_slot(follower, name)
    return (f"subscriptions {', '.join(to_follower)} on {follower_key} enabled; "
            f"{', '.join(to_serving)} dropped")
