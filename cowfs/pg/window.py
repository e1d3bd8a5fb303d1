"""The open window of an online cutover: two servers, one serving, one following.

From the moment an online cutover starts replicating until `finish-cutover`
closes it, there are two clusters of one database: the *old* one (the
pre-upgrade version, on the live volume at the live mount point) and the
*new* one (the upgraded clone, at its own mount point). One of them
*serves*: it listens on the live endpoint (port, socket directory, listen
addresses), where PgBouncer and every client connect. The other one
*follows*: it listens on a side port in a socket directory only its OS user
may enter (fenced from applications) and receives every change of the
serving one through logical replication, so either can take over without
losing a write.

The record of the window is a JSON file at the root of the live volume,
``MNT/.cowfs-cutover.json``, written atomically after every switch; the
later commands (`rollback-cutover --online`, `finish-cutover`) start from it.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..errors import NotFoundError, UsageError
from .replication import conninfo, link_name
from .server import PgServer

RECORD_NAME = ".cowfs-cutover.json"
SIDES = ("old", "new")

# Starts and stops while clients wait look for the server this often (pg_ctl: 100 ms).
SWITCH_POLL_S = 0.01
# For the whole window: both servers decode or apply changes.
WINDOW_SETTINGS = {"wal_level": "logical"}
# The follower never archives: its WAL would land in the serving server's archive.
FOLLOWER_SETTINGS = {**WINDOW_SETTINGS, "archive_mode": "off"}


@dataclass
class Side:
    """One of the two clusters."""

    major: str
    bin_dir: str
    volume: str
    mountpoint: str
    side_port: int            # where it listens while it follows


@dataclass
class Window:
    store: str
    volume: str                   # the live volume (the old cluster)
    pgdata: str
    port: int                     # the live endpoint, served by whichever serves
    socket_dir: str
    listen_addresses: str
    run_dir: str                  # side sockets and the servers' logs
    databases: list
    old: Side
    new: Side
    serving: str = "old"
    state: str = "open"           # open | finished
    switches: list = field(default_factory=list)
    mode: str = "online"

    # --- the two servers ---------------------------------------------------------------------

    def side(self, key: str) -> Side:
        return self.old if key == "old" else self.new

    @property
    def following(self) -> str:
        return "new" if self.serving == "old" else "old"

    def server(self, key: str) -> PgServer:
        """A handle on one cluster, aimed where it listens now (live endpoint or side port)."""
        side = self.side(key)
        if key == self.serving:
            # Where the offline cutover logs too: the window's directory goes at finish.
            port, socket_dir = self.port, self.socket_dir
            log_path = os.path.join(socket_dir, f"postgresql-{port}.log")
        else:
            port, socket_dir = side.side_port, self.run_dir
            log_path = os.path.join(self.run_dir, f"pg{side.major}-{key}.log")
        server = PgServer(side.bin_dir, os.path.join(side.mountpoint, self.pgdata),
                          log_path=log_path)
        server.port, server.socket_dir = port, socket_dir
        return server

    def start_serving(self, server: PgServer) -> None:
        server.start(self.port, self.socket_dir, settings=WINDOW_SETTINGS,
                     listen_addresses=self.listen_addresses, poll_s=SWITCH_POLL_S)

    def start_following(self, key: str, server: PgServer) -> None:
        server.start(self.side(key).side_port, self.run_dir, settings=FOLLOWER_SETTINGS)

    def links_to(self, key: str) -> list:
        """Slot (on the other side) and subscription (on ``key``) names, one per database."""
        return [link_name(self.side(key).major, i) for i in range(len(self.databases))]

    def endpoint_conninfo(self, database: str) -> str:
        return conninfo(self.socket_dir, self.port, database)

    def side_conninfo(self, key: str, database: str) -> str:
        return conninfo(self.run_dir, self.side(key).side_port, database)

    # --- the record ------------------------------------------------------------------------------

    @property
    def record_path(self) -> str:
        return os.path.join(self.old.mountpoint, RECORD_NAME)

    def save(self) -> None:
        """Write the record; a crash leaves the previous whole record or this one."""
        tmp = f"{self.record_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.record_path)

    def summary(self) -> dict:
        """The report's facts about the window: who serves, names, side port."""
        return dict(serving=f"{self.serving} (PostgreSQL {self.side(self.serving).major})",
                    slots=self.links_to(self.following),
                    subscriptions=self.links_to(self.following),
                    publication="cowfs_cutover",
                    old_side_port=self.old.side_port, new_side_port=self.new.side_port,
                    new_volume=self.new.volume, new_mountpoint=self.new.mountpoint,
                    logs=self.run_dir)


def load(mountpoint: str) -> Optional[dict]:
    """The raw record at a mount point (online or offline), or None when there is none."""
    try:
        with open(os.path.join(mountpoint, RECORD_NAME)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise NotFoundError(f"cannot read {os.path.join(mountpoint, RECORD_NAME)}: {exc}") from None


def open_window(mountpoint: str) -> Window:
    """The open online cutover window recorded at ``mountpoint``; a one-line error otherwise."""
    record = load(mountpoint)
    if record is None:
        raise NotFoundError(f"{mountpoint} holds no cutover record ({RECORD_NAME}); no online "
                            "cutover of this volume is open")
    if record.get("mode") != "online":
        raise UsageError(f"the cutover recorded at {mountpoint} was offline; roll it back without "
                         "--online")
    if record.get("state") != "open":
        raise UsageError(f"the online cutover recorded at {mountpoint} is {record.get('state')}; "
                         "nothing to switch or finish")
    record["old"], record["new"] = Side(**record["old"]), Side(**record["new"])
    return Window(**record)
