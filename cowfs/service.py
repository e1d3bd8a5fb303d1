"""A systemd service per mounted volume: the unit template and its instances.

One template, ``cowfs-mount@.service``, serves every volume. An instance is
named after its mount point the way systemd names mount units
(``/srv/pg`` -> ``cowfs-mount@srv-pg.service``; the unit gets the path back
with ``%f``), and a drop-in beside it (``cowfs-mount@srv-pg.service.d/
cowfs.conf``) says which store and volume to mount there. The daemon runs in
the foreground as the service's main process:

* ``Type=notify``: systemd counts the unit as started when the daemon sends
  ``READY=1``, which it does only once the mount, its registry entry and its
  control socket are all up (`mounting.Readiness`); units ordered after it
  (PostgreSQL) start only then.
* Stop: systemd sends SIGTERM to the daemon alone (``KillMode=mixed``, so the
  ``fusermount3`` it runs is not killed); it unmounts, lets the kernel write
  back its cached pages, commits every buffered write, and exits 0, or 7 if
  that final commit failed (the unit then shows as failed).
* ``Restart=on-failure``: a crashed daemon leaves a dead mount
  ("Transport endpoint is not connected"); ``ExecStopPost`` detaches it so
  that the restart can mount again.

`install` and `remove` write and delete these files; they call ``systemctl``
only when systemd runs on this machine and the files go to its unit
directory.
"""

import glob
import os
import shutil
import subprocess
import sys
from typing import Optional

from .errors import ExistsError, NotFoundError, UsageError

TEMPLATE = "cowfs-mount@.service"
SYSTEM_UNIT_DIR = "/etc/systemd/system"
DROPIN_NAME = "cowfs.conf"
PG_DROPIN_PREFIX = "cowfs-mount@"          # PostgreSQL drop-ins we wrote: <pg unit>.d/cowfs-mount@X.conf

_TEMPLATE_TEXT = """\
# A cowfs volume mounted by its own daemon; written by `cowfs service install`.
# Each instance is named after its mount point (cowfs-mount@srv-pg.service
# mounts at /srv/pg); its drop-in cowfs-mount@<name>.service.d/{dropin}
# sets COWFS_STORE and COWFS_VOLUME.
[Unit]
Description=cowfs volume mounted at %f
After=local-fs.target
Before=remote-fs.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={python} -m cowfs mount ${{COWFS_STORE}} %f --volume ${{COWFS_VOLUME}} --foreground
# SIGTERM to the daemon alone: it unmounts, commits every buffered write, exits.
KillMode=mixed
TimeoutStartSec=5min
TimeoutStopSec=15min
# After a crash the mount point holds a dead mount; detach it so a restart can mount.
ExecStopPost=-{fusermount} -u -z %f
Restart=on-failure
RestartSec=5s

[Install]
WantedBy=multi-user.target
"""

_DROPIN_TEXT = """\
# Written by `cowfs service install`; remove with `cowfs service remove {mountpoint}`.
[Unit]
Description=cowfs volume {volume} of {store} mounted at {mountpoint}
RequiresMountsFor={store_escaped}

[Service]
Environment="COWFS_STORE={store_quoted}" "COWFS_VOLUME={volume}"
"""

_PG_DROPIN_TEXT = """\
# Written by `cowfs service install`: PostgreSQL starts once its data directory's
# cowfs volume is mounted and ready, and stops before it is unmounted.
[Unit]
Requires={unit}
After={unit}
"""


def escape_path(path: str) -> str:
    """`systemd-escape --path`: /srv/my pg -> srv-my\\x20pg."""
    trimmed = os.path.normpath(path).strip("/")
    if not trimmed:
        return "-"
    out = []
    for i, ch in enumerate(trimmed):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def unit_name(mountpoint: str) -> str:
    return f"cowfs-mount@{escape_path(mountpoint)}.service"


def template_text() -> str:
    """The unit template; ExecStart names this Python, so the service runs this cowfs."""
    return _TEMPLATE_TEXT.format(python=sys.executable, dropin=DROPIN_NAME,
                                 fusermount=shutil.which("fusermount3") or "/bin/fusermount3")


def _check_value(what: str, value: str) -> None:
    if any(ch in value for ch in '\n"\\%$'):
        raise UsageError(f"{what} {value!r} contains a character systemd units cannot carry "
                         "(newline, quote, backslash, % or $); pick another path")


def dropin_text(store: str, volume: str, mountpoint: str) -> str:
    for what, value in (("store path", store), ("volume", volume), ("mount point", mountpoint)):
        _check_value(what, value)
    return _DROPIN_TEXT.format(store=store, volume=volume, mountpoint=mountpoint,
                               store_quoted=store, store_escaped=store.replace(" ", "\\x20"))


def systemd_running() -> bool:
    """sd_booted(3): systemd is the init system of this machine."""
    return os.path.isdir("/run/systemd/system")


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def install(store: str, volume: str, mountpoint: str, unit_dir: str = SYSTEM_UNIT_DIR,
            pg_unit: Optional[str] = None, start: bool = True) -> dict:
    """Write the template (again: it names this cowfs) and the instance's drop-in.

    Returns what was done: unit, files, and whether systemctl enabled and
    started it (only with systemd running and the system unit directory).
    """
    name = unit_name(mountpoint)
    dropin = os.path.join(unit_dir, f"{name}.d", DROPIN_NAME)
    text = dropin_text(store, volume, mountpoint)
    if os.path.exists(dropin):
        with open(dropin) as f:
            if f.read() != text:
                raise ExistsError(f"{name} is installed with other settings; remove it first with "
                                  f"'cowfs service remove {mountpoint}'")
    files = [os.path.join(unit_dir, TEMPLATE), dropin]
    _write(files[0], template_text())
    _write(dropin, text)
    if pg_unit:
        files.append(os.path.join(unit_dir, f"{pg_unit}.d", f"{PG_DROPIN_PREFIX}{escape_path(mountpoint)}.conf"))
        _write(files[-1], _PG_DROPIN_TEXT.format(unit=name))
    managed = systemd_running() and os.path.abspath(unit_dir) == SYSTEM_UNIT_DIR
    if managed:
        _systemctl("daemon-reload")
        _systemctl("enable", *(["--now"] if start else []), name)
    return dict(unit=name, files=files, systemctl=managed, started=managed and start)


def remove(mountpoint: str, unit_dir: str = SYSTEM_UNIT_DIR) -> dict:
    """Stop and disable the instance (unmounting the volume), delete its files;
    the template goes with the last instance."""
    name = unit_name(mountpoint)
    dropin_dir = os.path.join(unit_dir, f"{name}.d")
    if not os.path.isdir(dropin_dir):
        raise NotFoundError(f"no cowfs service for {mountpoint} ({dropin_dir} does not exist); "
                            "'cowfs service list' shows the installed ones")
    managed = systemd_running() and os.path.abspath(unit_dir) == SYSTEM_UNIT_DIR
    if managed:
        _systemctl("disable", "--now", name)
    files = [dropin_dir]
    shutil.rmtree(dropin_dir)
    pattern = os.path.join(glob.escape(unit_dir), "*.d", glob.escape(f"{PG_DROPIN_PREFIX}{escape_path(mountpoint)}.conf"))
    for pg_dropin in glob.glob(pattern):
        os.unlink(pg_dropin)
        files.append(pg_dropin)
    if not installed(unit_dir):
        template = os.path.join(unit_dir, TEMPLATE)
        if os.path.exists(template):
            os.unlink(template)
            files.append(template)
    if managed:
        _systemctl("daemon-reload")
    return dict(unit=name, files=files, systemctl=managed)


def installed(unit_dir: str = SYSTEM_UNIT_DIR) -> list[dict]:
    """The instances installed in `unit_dir`: unit, store, volume, mountpoint."""
    rows = []
    for path in sorted(glob.glob(os.path.join(glob.escape(unit_dir), "cowfs-mount@?*.service.d", DROPIN_NAME))):
        settings = dict(unit=os.path.basename(os.path.dirname(path))[:-2])
        with open(path) as f:
            for line in f:
                if line.startswith("Description=cowfs volume "):
                    volume, _, rest = line.strip()[len("Description=cowfs volume "):].partition(" of ")
                    store, _, mountpoint = rest.rpartition(" mounted at ")
                    settings.update(volume=volume, store=store, mountpoint=mountpoint)
        rows.append(settings)
    return rows


def _systemctl(*args: str) -> None:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        from .errors import CowfsError
        raise CowfsError(f"systemctl {' '.join(args)} failed: {result.stderr.strip() or result.returncode}")
