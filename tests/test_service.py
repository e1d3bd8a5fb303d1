"""The systemd unit: its files, `systemd-analyze verify`, and its commands run as systemd runs them.

systemd is not PID 1 on the test machines, so no unit is started by
systemd itself here. What is tested instead: the generated files (and
systemd's own verifier on them, where installed), and the unit's ExecStart
and ExecStopPost command lines taken from the generated files, expanded the
way systemd expands them (%f, ${VAR} from the drop-in), run with a notify
socket this test binds, stopped with SIGTERM to the main process as
KillMode=mixed does, and restarted after a crash.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess

import pytest

from cowfs import errors, service
from helpers import Mount, cowfs, fsck_clean, mount_entry, wait_gone
from test_cli_errors import assert_one_line_error

TIMEOUT_S = 120         # only against a hang


@pytest.fixture
def installed(store, workdir):
    """`cowfs service install STORE main MNT` into a unit directory of our own."""
    unit_dir = os.path.join(workdir, "units")
    mnt = os.path.join(workdir, "pg data")                       # a space, escaped as systemd does
    os.mkdir(mnt)
    result = cowfs("service", "install", store, "main", mnt, "--unit-dir", unit_dir,
                   "--postgres-unit", "postgresql@14-main.service")
    assert "systemd does not manage" in result.stdout or "enabled" in result.stdout
    return unit_dir, mnt, service.unit_name(mnt)


def _unit_settings(unit_dir: str, unit: str) -> dict:
    """Key -> list of values over the template and the instance's drop-ins, like systemd."""
    settings: dict = {}
    paths = [os.path.join(unit_dir, service.TEMPLATE)]
    dropins = os.path.join(unit_dir, unit + ".d")
    paths += [os.path.join(dropins, n) for n in sorted(os.listdir(dropins))]
    for path in paths:
        with open(path) as f:
            for line in f:
                if "=" in line and not line.startswith(("#", "[")):
                    key, _, value = line.strip().partition("=")
                    settings.setdefault(key, []).append(value)
    return settings


def _expand(command: str, settings: dict, mountpoint: str) -> list:
    """systemd's expansion of an Exec line: "-" prefix, %f, ${VAR} (one argument each)."""
    env = {}
    for value in settings.get("Environment", []):
        for assignment in shlex.split(value):
            key, _, val = assignment.partition("=")
            env[key] = val
    words = shlex.split(command.lstrip("-"))
    return [mountpoint if w == "%f" else re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w) for w in words]


def test_install_writes_the_template_the_instance_and_the_postgres_ordering(installed, store):
    unit_dir, mnt, unit = installed
    assert unit == f"cowfs-mount@{service.escape_path(mnt)}.service" and "\\x20data" in unit
    settings = _unit_settings(unit_dir, unit)
    assert settings["Type"] == ["notify"] and settings["KillMode"] == ["mixed"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["RequiresMountsFor"] == [store]
    with open(os.path.join(unit_dir, "postgresql@14-main.service.d", f"cowfs-mount@{service.escape_path(mnt)}.conf")) as f:
        pg = f.read()
    assert f"Requires={unit}" in pg and f"After={unit}" in pg
    rows = json.loads(cowfs("service", "list", "--unit-dir", unit_dir, "--json").stdout)
    assert rows == [dict(unit=unit, volume="main", store=store, mountpoint=mnt)]


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="systemd-escape is not installed")
def test_instance_names_match_systemd_escape():
    for path in ("/srv/pg", "/srv/pg data/x", "/mnt/.hidden/a-b", "/tmp/ü"):
        expected = subprocess.run(["systemd-escape", "--path", path], capture_output=True, text=True,
                                  check=True).stdout.strip()
        assert service.escape_path(path) == expected, path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(installed):
    unit_dir, _mnt, unit = installed
    env = dict(os.environ, SYSTEMD_UNIT_PATH=unit_dir + ":")
    for target in (os.path.join(unit_dir, service.TEMPLATE), unit):
        result = subprocess.run(["systemd-analyze", "verify", target], capture_output=True, text=True,
                                env=env, cwd=unit_dir, timeout=TIMEOUT_S)
        assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_the_units_commands_start_notify_stop_and_recover_a_crash(installed, store, workdir):
    unit_dir, mnt, unit = installed
    settings = _unit_settings(unit_dir, unit)
    start = _expand(settings["ExecStart"][0], settings, mnt)
    stop_post = _expand(settings["ExecStopPost"][0], settings, mnt)
    notify_path = os.path.join(workdir, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(TIMEOUT_S)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    procs = []
    try:
        # Start: the service counts as started at READY=1.
        procs.append(subprocess.Popen(start, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE))
        assert b"READY=1" in sock.recv(4096)
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"s" * 100_000)                          # buffered: the stop must commit it
        # Stop: SIGTERM to the main process only (KillMode=mixed).
        procs[0].send_signal(signal.SIGTERM)
        assert b"STOPPING=1" in sock.recv(4096)
        assert procs[0].wait(timeout=TIMEOUT_S) == 0
        assert mount_entry(mnt) is None
        subprocess.run(stop_post, capture_output=True)      # ExecStopPost: harmless after a clean stop
        # A crash, then ExecStopPost and the restart systemd would do.
        procs.append(subprocess.Popen(start, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE))
        assert b"READY=1" in sock.recv(4096)
        procs[1].kill()
        wait_gone(procs[1].pid)
        procs[1].wait()
        subprocess.run(stop_post, capture_output=True)
        assert mount_entry(mnt) is None, "ExecStopPost left the dead mount"
        procs.append(subprocess.Popen(start, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE))
        assert b"READY=1" in sock.recv(4096)
        with open(os.path.join(mnt, "f"), "rb") as f:
            assert f.read() == b"s" * 100_000
        procs[2].send_signal(signal.SIGTERM)
        assert procs[2].wait(timeout=TIMEOUT_S) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if mount_entry(mnt) is not None:
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        sock.close()
    fsck_clean(store)


def test_remove_deletes_every_file_and_install_refuses_other_settings(installed, store, workdir):
    unit_dir, mnt, unit = installed
    result = cowfs("service", "install", store, "other", mnt, "--unit-dir", unit_dir, check=False)
    assert_one_line_error(result, errors.EXIT_NOT_FOUND, "no volume named 'other'")
    cowfs("clone", store, "main", "other")
    result = cowfs("service", "install", store, "other", mnt, "--unit-dir", unit_dir, check=False)
    assert_one_line_error(result, errors.EXIT_EXISTS, "cowfs service remove")
    cowfs("service", "remove", mnt, "--unit-dir", unit_dir)
    left = [os.path.join(d, n) for d, _s, names in os.walk(unit_dir) for n in names]
    assert left == [], left
    assert_one_line_error(cowfs("service", "remove", mnt, "--unit-dir", unit_dir, check=False),
                          errors.EXIT_NOT_FOUND, "no cowfs service")
    assert_one_line_error(cowfs("service", "install", store, "main", os.path.join(workdir, "nope"),
                                "--unit-dir", unit_dir, check=False), errors.EXIT_NOT_FOUND, "mkdir -p")
    assert_one_line_error(cowfs("service", check=False), errors.EXIT_USAGE, "install, remove or list")


def test_service_mount_and_plain_mount_share_one_lock(installed, store, workdir):
    """A volume mounted by hand cannot be mounted again by its service (one writer)."""
    unit_dir, mnt, unit = installed
    settings = _unit_settings(unit_dir, unit)
    other = Mount(store, os.path.join(workdir, "by-hand")).mount()
    try:
        result = subprocess.run(_expand(settings["ExecStart"][0], settings, mnt), capture_output=True,
                                text=True, timeout=TIMEOUT_S)
        assert result.returncode == errors.EXIT_BUSY and "volume main is in use" in result.stderr
        assert mount_entry(mnt) is None
    finally:
        other.close()
