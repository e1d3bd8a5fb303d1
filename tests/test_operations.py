"""Operations against live mounts: `cowfs status`, `cowfs metrics`, progress, logs.

Everything runs for real: the daemons, their control sockets, the CLI in
subprocesses; progress is checked in a real pseudo-terminal.
"""

import json
import logging
import os
import pty
import signal
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cowfs import errors, logs, progress
from helpers import REPO, Mount, cowfs, fsck_clean, wait_gone

FILES = 3
FILE_BYTES = 200_000


def _known_activity(mount: Mount) -> None:
    """FILES files of FILE_BYTES each, each fsynced once."""
    for i in range(FILES):
        with open(os.path.join(mount.path, f"f{i}"), "wb") as f:
            f.write(os.urandom(FILE_BYTES))
            f.flush()
            os.fsync(f.fileno())


def _status(store=None) -> dict:
    args = ["status"] + ([store] if store else []) + ["--json"]
    return json.loads(cowfs(*args, check=False).stdout)


def _metrics(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} through Prometheus' own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def test_status_and_metrics_of_a_live_mount_with_known_activity(mounted):
    _known_activity(mounted)
    cowfs("snapshot", mounted.store, "main@known")
    cowfs("policy", mounted.store, "main", "--every", "1h", "--keep", "5")
    report = _status(mounted.store)
    [row] = report["mounts"]
    assert (row["mountpoint"], row["volume"], row["pid"], row["state"]) == \
        (os.path.abspath(mounted.path), "main", mounted.pid, "mounted")
    assert row["uptime_s"] >= 0 and row["started"].endswith("Z")
    figures = row["figures"]
    assert figures["written_bytes_total"] >= FILES * FILE_BYTES
    assert figures["fsyncs_total"] >= FILES
    assert figures["flush_jobs_total"] >= 1 and figures["dirty_bytes"] == 0
    assert figures["errors_total"] == 0 and row["last_error"] is None
    assert row["fsync_latency"]["count"] == figures["fsyncs_total"]
    assert row["last_snapshot"]["name"] in ("known",) or row["last_snapshot"]["name"].startswith("auto-")
    assert row["schedule"].startswith("every 1h") and row["next_snapshot"].endswith("Z")
    assert report["unmounted"] == []

    cowfs("scrub", mounted.store)
    text = cowfs("metrics", mounted.store).stdout
    samples = _metrics(text)
    labels = frozenset(dict(store=mounted.store, volume="main", mountpoint=os.path.abspath(mounted.path)).items())
    store_label = frozenset(dict(store=mounted.store).items())
    assert samples[("cowfs_volume_up", labels)] == 1
    assert samples[("cowfs_volume_written_bytes_total", labels)] >= FILES * FILE_BYTES
    assert samples[("cowfs_volume_flush_jobs_total", labels)] >= 1
    count = samples[("cowfs_fsync_latency_seconds_count", labels)]
    assert count >= FILES
    assert samples[("cowfs_fsync_latency_seconds_bucket", labels | {("le", "+Inf")})] == count
    assert samples[("cowfs_stored_bytes", store_label)] >= FILES * FILE_BYTES
    assert samples[("cowfs_dedup_ratio", store_label)] >= 1.0
    assert samples[("cowfs_volume_logical_bytes", frozenset(dict(store=mounted.store, volume="main").items()))] \
        == FILES * FILE_BYTES
    assert samples[("cowfs_scrub_last_damaged_chunks", store_label)] == 0
    assert samples[("cowfs_scrub_last_bytes", store_label)] >= FILES * FILE_BYTES


def test_metrics_textfile_is_written_whole(mounted, workdir):
    out = os.path.join(workdir, "cowfs.prom")
    cowfs("metrics", mounted.store, "--output", out)
    with open(out) as f:
        assert ("cowfs_volume_up", frozenset(dict(store=mounted.store, volume="main",
                                                  mountpoint=os.path.abspath(mounted.path)).items())) \
            in _metrics(f.read())
    assert [n for n in os.listdir(workdir) if n.startswith("cowfs.prom")] == ["cowfs.prom"]
    result = cowfs("metrics", mounted.store, "--output", os.path.join(workdir, "no", "x.prom"), check=False)
    assert result.returncode == errors.EXIT_USAGE and "does not exist" in result.stderr


def test_status_of_a_dead_mount_and_of_an_unmounted_volume(store, workdir):
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    pid = mount.pid
    try:
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        result = cowfs("status", store, check=False)
        assert result.returncode == errors.EXIT_FAILURE
        assert "dead" in result.stdout and f"fusermount3 -u -z {os.path.abspath(mount.path)}" in result.stdout
        [row] = _status(store)["mounts"]
        assert row["state"] == "dead" and row["pid"] == pid
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mount.path], capture_output=True)
    report = _status(store)
    assert report["mounts"] == []
    [row] = report["unmounted"]
    assert row["volume"] == "main" and "did not end cleanly" in row["why"]
    assert row["action"] == f"cowfs mount {store} MOUNTPOINT --volume main"
    fsck_clean(store)


def test_status_of_a_missing_store_is_one_line(workdir):
    result = cowfs("status", os.path.join(workdir, "nothing"), check=False)
    assert result.returncode == errors.EXIT_NOT_FOUND and len(result.stderr.strip().splitlines()) == 1


# --- progress ----------------------------------------------------------------------------------

def _run_in_pty(args) -> tuple[int, str]:
    """Run `cowfs ARGS` with stdout and stderr on a new pseudo-terminal."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cowfs", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:              # EIO: the other side is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


@pytest.fixture
def filled_store(mounted):
    _known_activity(mounted)
    mounted.umount()
    return mounted.store


def test_progress_stays_out_of_json_and_is_plain_lines_in_a_log(filled_store):
    result = cowfs("scrub", filled_store, "--json")
    assert json.loads(result.stdout)["damaged"] == [] and result.stderr == ""
    code, screen = _run_in_pty(["scrub", filled_store, "--json"])
    assert code == 0 and "\r" not in screen.replace("\r\n", "\n") and "B/s" not in screen
    plain = cowfs("scrub", filled_store)                     # stderr is a pipe here: plain lines
    assert "\r" not in plain.stderr and "scrub: 100% (" in plain.stderr and "done in" in plain.stderr
    code, screen = _run_in_pty(["fsck", filled_store, "--verify-data"])
    assert code == 0 and "fsck: verifying data" in screen and "B/s" in screen, screen


def test_plain_progress_lines_say_rate_and_time_left():
    class Log(list):
        def write(self, text):
            self.append(text)

        def flush(self):
            pass

        def isatty(self):
            return False
    stream = Log()
    with progress.Progress("copy", total=4096, stream=stream, plain_every_s=0) as bar:
        bar.update(1024)
        bar.advance(1024)
    assert all(line.endswith("\n") for line in stream)
    assert stream[0].startswith("copy: 25% (1.0 KiB of 4.0 KiB, ") and "s left" in stream[0]
    assert "done in" in stream[-1]
    quiet = Log()
    with progress.Progress("copy", total=10, stream=quiet, quiet=True) as bar:
        bar.update(10)
    assert quiet == []


# --- logs ----------------------------------------------------------------------------------------

def test_daemon_log_rotates_by_size_one_line_per_event(workdir):
    path = os.path.join(workdir, "vol.log")
    logs.configure(path, max_bytes=2000)
    saved = os.dup(1), os.dup(2)             # configure points stdout/stderr at the log
    try:
        log = logging.getLogger("cowfs.test")
        for i in range(300):                 # ~20 KB: more than the log and its 3 backups hold
            log.info("event %d", i)
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("failed step")
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        logs.configure(None)
    names = sorted(n for n in os.listdir(workdir) if n.startswith("vol.log"))
    assert names == ["vol.log", "vol.log.1", "vol.log.2", "vol.log.3"], names
    with open(path) as f:
        lines = f.read().splitlines()
    assert all(line[:4].isdigit() and line[10] == "T" and " cowfs.test " in line for line in lines)
    assert "failed step | Traceback" in lines[-1] and "boom | second line" in lines[-1]
    assert logs.errors.count >= 1 and logs.errors.last == "failed step"


def test_destroy_removes_the_logs_of_a_volume(store, workdir):
    cowfs("clone", store, "main", "other")
    mount = Mount(store, os.path.join(workdir, "mnt"), volume="other").mount()
    mount.umount()
    run = os.path.join(store, "run")
    for extra in ("other.log.1", "other@s.log", "other2.log"):
        open(os.path.join(run, extra), "w").close()
    assert os.path.exists(os.path.join(run, "other.log"))
    cowfs("destroy", store, "other")
    assert sorted(n for n in os.listdir(run) if n.endswith(".log") or ".log." in n) == ["other2.log"]
