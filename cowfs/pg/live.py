"""The live volume and the live server's endpoint: what both cutovers start from."""

import os
from dataclasses import dataclass
from typing import Callable, Optional

from .. import volumes
from ..errors import UsageError
from ..store import Store
from . import cluster
from .server import PgServer
from .report import Report
from .workspace import mounted_volume, terminate_cleanly


@dataclass
class CutoverInput:
    """What both cutovers are given; each adds its own options."""

    store: str
    volume: str
    pgdata: str
    mountpoint: str
    old_bin: str
    new_bin: str
    check_sql_path: Optional[str] = None
    database: str = "postgres"


@dataclass
class Endpoint:
    """Where clients reach the server: kept identical across cutover and rollback."""

    port: int
    socket_dir: str
    listen_addresses: str


def check_mounted_volume(store: Store, volume: str, mountpoint: str) -> str:
    """MNT, made absolute, if VOL of STORE is mounted there; a one-line error otherwise."""
    mnt = os.path.abspath(mountpoint)
    info = mounted_volume(mnt)
    if info is None or info.get("volume") != volume or info.get("store") != store.path:
        raise UsageError(f"{mnt} is not where volume {volume} of {store.path} is mounted; give "
                         f"--mountpoint of that volume ('cowfs mount {store.path} MNT --volume "
                         f"{volume}' mounts it)")
    return mnt


def volume_exists(store: Store, name: str) -> bool:
    with store.env.begin() as txn:
        return any(n == name for n, _ in volumes.list_volumes(txn, store.env))


def live_endpoint(live: PgServer, port: Optional[int] = None,
                  socket_dir: Optional[str] = None) -> Endpoint:
    """The live server's port, socket directory and listen addresses (``live`` aimed at them).

    Read from postmaster.pid and the server while it runs; ``port`` and
    ``socket_dir`` override, and are required when no server runs.
    """
    pid = cluster.read_pid_file(live.data_dir)
    running = pid is not None and live.is_running()
    port = port or (pid.port if running else None)
    socket_dir = socket_dir or (pid.socket_dir if running else None)
    if port is None or not socket_dir:
        raise UsageError(f"no server runs on {live.data_dir}, so its port and socket directory are "
                         "unknown; give --port and --socket-dir (they are kept for the new server)")
    listen = pid.listen_address if running else ""
    if running:
        live.port, live.socket_dir = port, socket_dir
        listen = live.psql("SHOW listen_addresses")
    return Endpoint(port=port, socket_dir=socket_dir, listen_addresses=listen)


def start_at(server: PgServer, endpoint: Endpoint, settings: Optional[dict] = None) -> None:
    server.start(endpoint.port, endpoint.socket_dir, settings=settings,
                 listen_addresses=endpoint.listen_addresses)


def on_store(store_path: str, workflow: Callable[[Store], Report]) -> Report:
    """Run a workflow on an open store; SIGTERM becomes an exception its cleanup handles."""
    store = Store.open(store_path)
    try:
        with terminate_cleanly():
            return workflow(store)
    finally:
        store.close()
