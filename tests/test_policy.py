"""Schedules, retention, holds and pruning: on a real mount, and with an injected clock."""

import json
import os
import threading
import time

import pytest

from cowfs import admin, errors, policy, schema, scheduling, volumes
from cowfs.errors import FsError
from cowfs.filesystem import Filesystem
from cowfs.store import Store
from helpers import Mount, cowfs, fsck_clean


def listing(store) -> dict:
    return {row["name"]: row for row in json.loads(cowfs("list", store, "--json").stdout)}


def autos(store, vol="main") -> dict:
    return {name: row for name, row in listing(store).items()
            if name.startswith(f"{vol}@") and row["auto"]}


def unheld_autos(store) -> dict:
    return {name: row for name, row in autos(store).items() if not row["held"]}


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def write_files(store_path: str, files: dict) -> None:
    """Write files of the unmounted volume 'main' through the filesystem API, in-process."""
    store = Store.open(store_path)
    try:
        with store.env.begin() as txn:
            vol_id = volumes.volume_id(txn, store.env, "main")
        with store.lock_volume(vol_id, "main", "test writer"):
            fs = Filesystem(store, vol_id)
            for name, data in files.items():
                try:
                    inode = fs.lookup(schema.ROOT_INO, name.encode())
                except FsError:
                    inode = fs.make(schema.ROOT_INO, name.encode(), 0o100644, 0, 0)
                fh = fs.open(inode.ino, writable=True)
                fs.write(inode.ino, 0, data)
                fs.release(fh)
            fs.flush_all()
    finally:
        store.close()


# --- pure functions --------------------------------------------------------------------------

def test_durations_parse_down_to_one_second_and_refuse_nonsense():
    assert [policy.parse_duration(t) for t in ("1s", "15m", "1h", "1d", "2w", "1h30m")] == \
        [1, 900, 3600, 86400, 14 * 86400, 5400]
    assert policy.format_duration(5400) == "1h30m"
    for bad in ("", "0s", "5", "1x", "h1", "1.5h", "-1s"):
        with pytest.raises(errors.UsageError):
            policy.parse_duration(bad)


def test_auto_names_are_unique_at_one_second_schedules():
    t = policy.utc_ns(2026, 11, 22, 19, 35, 0)
    names = {policy.auto_name(t + i * 1_000_000) for i in range(1000)}
    assert len(names) == 1000
    assert policy.auto_name(t) == "auto-20261122T193500.000Z"


def test_schedule_is_due_after_a_period_and_after_the_clock_went_back():
    hourly = policy.Policy(every_s=3600, keep_last=1)
    last = policy.utc_ns(2026, 6, 1, 12)
    assert policy.is_due(hourly, None, last)
    assert not policy.is_due(hourly, last, last + 3599 * 10**9)
    assert policy.is_due(hourly, last, last + 3600 * 10**9)
    assert policy.is_due(hourly, last, last - 10**9), "a clock set back must not stop snapshots"


def test_retention_rules_keep_newest_of_each_period():
    times = [policy.utc_ns(2026, 1, 1) + h * 3600 * 10**9 for h in range(0, 24 * 10, 6)]
    rule = policy.Policy(every_s=21600, keep_last=1, keep_daily=3)
    kept = sorted(times[i] for i in policy.retained(times, rule))
    # Newest of the last 3 days (Jan 10 is the last day: 00, 06, 12, 18 h).
    assert kept == [policy.utc_ns(2026, 1, 8, 18), policy.utc_ns(2026, 1, 9, 18), policy.utc_ns(2026, 1, 10, 18)]


# --- calendar retention with an injected clock ---------------------------------------------------

def test_calendar_retention_with_injected_clock(store):
    cowfs("policy", store, "main", "--every", "6h", "--keep", "2", "--keep-daily", "3",
          "--keep-weekly", "2", "--keep-monthly", "3")
    cowfs("snapshot", store, "main@manual")
    s = Store.open(store)
    try:
        now_ns, end_ns, taken = policy.utc_ns(2026, 1, 1), policy.utc_ns(2026, 3, 1), []
        while now_ns <= end_ns:
            # Ticks every 3 h: only every other one is due.
            name = scheduling.run_schedule(s, "main", now_ns)
            if name is not None:
                taken.append(name)
            if now_ns == policy.utc_ns(2026, 1, 2, 12):
                admin.hold(s, f"main@{name}", "kept by hand")
            now_ns += 3 * 3600 * 10**9
    finally:
        s.close()
    assert len(taken) == 59 * 4 + 1
    expected = {policy.auto_name(policy.utc_ns(*t)) for t in [
        (2026, 3, 1, 0),      # newest; newest of March, of ISO week 9 and of its day
        (2026, 2, 28, 18),    # keep 2; newest of Feb 28 and of February
        (2026, 2, 27, 18),    # third day
        (2026, 2, 22, 18),    # newest of ISO week 8 (ends Sunday Feb 22)
        (2026, 1, 31, 18),    # newest of January
        (2026, 1, 2, 12)]}    # held
    rows = listing(store)
    assert {n.split("@")[1] for n, r in rows.items() if r.get("auto")} == expected
    assert rows["main@manual"]["auto"] is False
    assert rows[f"main@{policy.auto_name(policy.utc_ns(2026, 1, 2, 12))}"]["hold_reason"] == "kept by hand"
    fsck_clean(store)


# --- pruning: exact bytes, never manual / held / clone-dependent --------------------------------

def store_df(store: str) -> dict:
    """`cowfs df --json` without the filesystem's free space (other processes change it)."""
    report = json.loads(cowfs("df", store, "--json").stdout)
    del report["filesystem"]
    return report


def test_prune_dry_run_shows_exact_bytes_for_the_set(store):
    cowfs("policy", store, "main", "--every", "1h", "--keep", "10")
    clock = policy.utc_ns(2026, 5, 1)
    names = []
    for step in range(7):
        files = {"churn": os.urandom(2 * 8192)}      # in one snapshot only
        if step == 3 or step == 5:
            files["shared"] = os.urandom(8192)      # step 3's bytes: in snapshots 3 and 4 only
        write_files(store, files)
        s = Store.open(store)
        try:
            names.append(scheduling.run_schedule(s, "main", clock + step * 3600 * 10**9))
        finally:
            s.close()
    cowfs("snapshot", store, "main@manual")
    cowfs("hold", store, f"main@{names[1]}", "--reason", "audit")
    cowfs("clone", store, f"main@{names[2]}", "c1")
    cowfs("policy", store, "main", "--every", "1h", "--keep", "2")
    before = store_df(store)
    preview = json.loads(cowfs("prune", store, "main", "--dry-run", "--json").stdout)
    assert [r["name"] for r in preview["destroy"]] == [f"main@{n}" for n in (names[0], names[3], names[4])]
    assert store_df(store) == before, "a dry run changed the store"
    individual = sum(i["frees_bytes"] for i in before["items"] if i["name"] in {r["name"] for r in preview["destroy"]})
    done = json.loads(cowfs("prune", store, "main", "--json").stdout)
    after = store_df(store)
    assert done["frees_bytes"] == preview["frees_bytes"] == before["chunk_bytes"] - after["chunk_bytes"]
    assert preview["frees_bytes"] > individual, "the set frees what the snapshots share"
    rows = listing(store)
    for kept in ("main@manual", f"main@{names[1]}", f"main@{names[2]}", f"main@{names[5]}", f"main@{names[6]}"):
        assert kept in rows
    assert cowfs("prune", store, "main", "--dry-run").stdout.strip().endswith("would destroy 0 snapshots, freeing 0 bytes (0 B)")
    fsck_clean(store)


# --- the daemon's schedule on a mounted volume under writes -------------------------------------

def test_every_second_keep_five_on_a_mounted_volume_under_writes(store, mounted):
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            with open(f"{mounted.path}/w{n % 50}", "wb") as f:
                f.write(os.urandom(20_000))
            n += 1
            time.sleep(0.02)
    thread = threading.Thread(target=writer)
    cowfs("snapshot", store, "main@manual")
    cowfs("hold", store, "main@manual", "--reason", "manual and held")
    cowfs("policy", store, "main", "--every", "1s", "--keep", "5")
    thread.start()
    try:
        first = wait_for(lambda: sorted(autos(store)), 5, "the first automatic snapshot")[0]
        cowfs("hold", store, first, "--reason", "first one")
        time.sleep(15)
        rows = unheld_autos(store)
        assert 4 <= len(rows) <= 6, sorted(rows)
        newest_ns = max(r["created_ns"] for r in rows.values())
        assert time.time_ns() - newest_ns <= 2 * 10**9
        assert listing(store)[first]["held"] and "main@manual" in listing(store)
        locks = [n for n in os.listdir(os.path.join(store, "run")) if n.startswith("snap-")]
        assert len(locks) <= 2, f"lock files of pruned snapshots pile up: {locks}"
        # A policy change takes effect without a remount.
        cowfs("policy", store, "main", "--every", "1s", "--keep", "2")
        wait_for(lambda: len(unheld_autos(store)) <= 3, 10, "pruning down to 2")
    finally:
        stop.set()
        thread.join()
        cowfs("policy", store, "main", "--off", check=False)
    shown = json.loads(cowfs("policy", store, "--json").stdout)
    assert shown == []
    assert listing(store)["main@manual"]["hold_reason"] == "manual and held"


def test_pruning_skips_a_snapshot_mounted_read_only_until_unmounted(store, mounted, workdir):
    with open(f"{mounted.path}/data", "wb") as f:
        f.write(b"seen by the first automatic snapshot")
    cowfs("policy", store, "main", "--every", "1s", "--keep", "10")
    first = wait_for(lambda: sorted(autos(store)), 5, "the first automatic snapshot")[0]
    readonly = Mount(store, os.path.join(workdir, "ro"), first)
    try:
        readonly.mount()
        cowfs("policy", store, "main", "--every", "1s", "--keep", "1")
        wait_for(lambda: len(autos(store)) <= 2, 10, "pruning down to the newest and the mounted one")
        assert first in autos(store)
        with open(f"{readonly.path}/data", "rb") as f:
            # Written (not fsynced) before the schedule existed: rule 5 puts it in.
            assert f.read() == b"seen by the first automatic snapshot"
        readonly.umount()
        wait_for(lambda: first not in autos(store), 10, "the unmounted snapshot to be pruned")
    finally:
        readonly.close()
        cowfs("policy", store, "main", "--off", check=False)


# --- holds -------------------------------------------------------------------------------------------

def test_held_snapshot_cannot_be_destroyed_until_released(store):
    cowfs("snapshot", store, "main@s1")
    cowfs("hold", store, "main@s1", "--reason", "before the upgrade")
    before = listing(store)
    assert before["main@s1"]["held"] and before["main@s1"]["hold_reason"] == "before the upgrade"
    for target in ("main@s1", "main"):
        result = cowfs("destroy", store, target, check=False)
        assert result.returncode == errors.EXIT_BUSY
        assert result.stderr.count("\n") == 1 and "before the upgrade" in result.stderr
        assert "cowfs release" in result.stderr and "Traceback" not in result.stderr
    assert listing(store) == before
    shown = cowfs("hold", store).stdout
    assert "main@s1" in shown and "before the upgrade" in shown
    cowfs("rename", store, "main@s1", "s2")
    assert listing(store)["main@s2"]["held"], "a rename keeps the hold"
    cowfs("release", store, "main@s2")
    cowfs("destroy", store, "main@s2")
    assert "main@s2" not in listing(store)
    fsck_clean(store)


# --- bad input -----------------------------------------------------------------------------------------

def test_lifecycle_commands_refuse_bad_input(store):
    cowfs("snapshot", store, "main@s1")
    cases = [
        (("policy", store, "main", "--every", "0s", "--keep", "1"), errors.EXIT_USAGE, "zero"),
        (("policy", store, "main", "--every", "5x", "--keep", "1"), errors.EXIT_USAGE, "invalid duration"),
        (("policy", store, "main", "--every", "1h"), errors.EXIT_USAGE, "--keep"),
        (("policy", store, "main", "--every", "1h", "--keep", "-1"), errors.EXIT_USAGE, "between"),
        (("policy", store, "main", "--every", "1h", "--off"), errors.EXIT_USAGE, "not both"),
        (("policy", store, "main"), errors.EXIT_USAGE, "--every"),
        (("policy", store, "main", "--off"), errors.EXIT_USAGE, "no schedule"),
        (("policy", store, "nope", "--every", "1h", "--keep", "1"), errors.EXIT_NOT_FOUND, "no volume named"),
        (("prune", store, "main"), errors.EXIT_USAGE, "no schedule"),
        (("prune", store, "main", "--dry-run"), errors.EXIT_USAGE, "no schedule"),
        (("hold", store, "main"), errors.EXIT_USAGE, "VOLUME@NAME"),
        (("hold", store, "main@nothing"), errors.EXIT_NOT_FOUND, "no snapshot"),
        (("release", store, "main@s1"), errors.EXIT_NOT_FOUND, "not held"),
        (("policy", os.path.join(store, "missing")), errors.EXIT_NOT_FOUND, "does not exist"),
    ]
    before = listing(store)
    for args, code, text in cases:
        result = cowfs(*args, check=False)
        assert result.returncode == code, (args, result.stderr)
        assert result.stderr.startswith("cowfs: ") and result.stderr.count("\n") == 1, (args, result.stderr)
        assert text in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    assert listing(store) == before
    assert json.loads(cowfs("policy", store, "--json").stdout) == []
    for command in ("policy", "hold", "release", "prune", "diff", "scrub"):
        assert "Example" in cowfs(command, "--help").stdout or command == "release"
