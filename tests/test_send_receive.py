"""cowfs send / receive between two real stores: exact copies, digests, refusals, crashes.

One source store is built once per module through a real mount (files of
several chunk frames, a hard link, a symlink, an xattr, a file unlinked while
open at snapshot time) with snapshots s1 and s2, and its streams are written
to files once. Every test receives into stores of its own. Every damaged or
interrupted receive must leave the receiving store as it was (fsck clean, no
volume, snapshot, chunk or pack added) and a second, intact receive must work.
"""

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios

import pytest

from cowfs import errors, faults
from helpers import REPO, Mount, cowfs, fsck_clean, make_workdir, remove_workdir, tree_snapshot
from test_cli_errors import assert_one_line_error

BIG_FILE_BYTES = 9 << 20        # three chunk frames of 4 MiB at least


@pytest.fixture(scope="module")
def source():
    """A store with main@s1 and main@s2, and the streams s1 (full) and s1->s2 (incremental) as files."""
    workdir = make_workdir()
    store = os.path.join(workdir, "src")
    cowfs("init", store)
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    try:
        root = mount.path
        os.makedirs(f"{root}/base/16384")
        with open(f"{root}/base/16384/big", "wb") as f:
            f.write(os.urandom(BIG_FILE_BYTES))
        with open(f"{root}/base/16384/same", "wb") as f:
            f.write(b"\x07" * 100_000)             # identical chunks: sent once
        os.link(f"{root}/base/16384/same", f"{root}/hardlink")
        os.symlink("base/16384/big", f"{root}/symlink")
        os.setxattr(f"{root}/base", "user.note", b"kept")
        open_but_unlinked = os.open(f"{root}/temp", os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(open_but_unlinked, b"in the snapshot, under no name")
        os.unlink(f"{root}/temp")
        cowfs("snapshot", store, "main@s1")
        os.close(open_but_unlinked)
        with open(f"{root}/base/16384/big", "r+b") as f:
            f.seek(5 << 20)
            f.write(os.urandom(20_000))            # three chunks change
        os.rename(f"{root}/symlink", f"{root}/symlink2")
        os.unlink(f"{root}/hardlink")
        with open(f"{root}/new", "wb") as f:
            f.write(b"new file")
        cowfs("snapshot", store, "main@s2")
    finally:
        mount.close()
    streams = dict(full=os.path.join(workdir, "s1.cows"), inc=os.path.join(workdir, "s2.cows"))
    cowfs("send", store, "main@s1", "--output", streams["full"])
    cowfs("send", store, "main@s2", "--from", "main@s1", "--output", streams["inc"])
    yield dict(store=store, workdir=workdir, **streams)
    fsck_clean(store)
    remove_workdir(workdir)


def new_store(workdir, name="dst", *init_args) -> str:
    """An empty store (no volume): what a backup machine starts with."""
    path = os.path.join(workdir, name)
    cowfs("init", path, *init_args)
    cowfs("destroy", path, "main")
    return path


def receive(store, stream, *args, check=True, **kwargs):
    return cowfs("receive", store, *args, "--input", stream, check=check, **kwargs)


def listing(store) -> dict:
    return {row["name"]: row for row in json.loads(cowfs("list", store, "--json").stdout)}


def digest_of(store, target) -> str:
    return json.loads(cowfs("digest", store, target, "--json").stdout)["digest"]


def state(store) -> tuple:
    """What a failed receive must not change: names, chunks, pack files and their disk use."""
    packs = os.path.join(store, "packs")
    pack_files = sorted((name, os.stat(os.path.join(packs, name)).st_blocks) for name in os.listdir(packs))
    df = json.loads(cowfs("df", store, "--json").stdout)
    return sorted(listing(store)), df["chunks"], df["chunk_bytes"], pack_files


# --- round trip -------------------------------------------------------------------------------------

def test_full_then_incremental_gives_the_same_trees_and_digests(source, workdir):
    dst = new_store(workdir)
    full = json.loads(receive(dst, source["full"], "--json").stdout)
    assert full["snapshot"] == "main@s1" and full["type"] == "full"
    assert full["chunks_stored"] == full["chunks"] > BIG_FILE_BYTES // 8192
    inc = json.loads(receive(dst, source["inc"], "--json").stdout)
    assert inc["base"] == "main@s1" and inc["records"] < 20 and inc["chunks"] <= 4
    for snap in ("main@s1", "main@s2"):
        assert digest_of(dst, snap) == digest_of(source["store"], snap) == listing(dst)[snap]["digest"]
    assert digest_of(dst, "main@s1") != digest_of(dst, "main@s2")
    assert os.path.getsize(source["inc"]) < os.path.getsize(source["full"]) / 50, \
        "the incremental stream follows the change (~20 KB), not the volume (~9 MB)"
    fsck_clean(dst)       # the unlinked-open inode of s1 is an orphan here too, then gone in s2

    mounts = [Mount(source["store"], os.path.join(workdir, "m-src"), "main@s2"),
              Mount(dst, os.path.join(workdir, "m-dst"), "main@s2")]
    try:
        for m in mounts:
            m.mount()
        assert tree_snapshot(mounts[0].path) == tree_snapshot(mounts[1].path)
        assert os.getxattr(f"{mounts[1].path}/base", "user.note") == b"kept"
    finally:
        for m in mounts:
            m.close()
    cowfs("clone", dst, "main@s2", "copy")
    assert digest_of(dst, "copy") == digest_of(dst, "main@s2"), "a clone nobody wrote to has its origin's digest"
    for store in (dst, source["store"]):      # every cached digest recomputed from the records
        assert "cached digests" in cowfs("fsck", store, "--verify-data").stdout
    fsck_clean(dst)


def test_receive_stores_no_chunk_the_store_already_holds(source, workdir):
    dst = new_store(workdir)
    receive(dst, source["full"], "first")
    before = json.loads(cowfs("df", dst, "--json").stdout)
    again = json.loads(receive(dst, source["full"], "second", "--json").stdout)
    after = json.loads(cowfs("df", dst, "--json").stdout)
    assert again["chunks_stored"] == 0 and again["stored_bytes"] == 0
    assert (after["chunks"], after["chunk_bytes"]) == (before["chunks"], before["chunk_bytes"])
    assert after["pack_bytes"] == before["pack_bytes"]
    assert digest_of(dst, "first@s1") == digest_of(dst, "second@s1")
    fsck_clean(dst)


def test_stream_through_a_pipe_and_a_compressor(source, workdir):
    dst = new_store(workdir)
    cowfs_cmd = f"{sys.executable} -m cowfs"
    piped = subprocess.run(["bash", "-o", "pipefail", "-c",
                            f"{cowfs_cmd} send {source['store']} main@s1 | gzip -1 | gunzip | "
                            f"{cowfs_cmd} receive {dst} piped"], cwd=REPO, capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    assert digest_of(dst, "piped@s1") == digest_of(source["store"], "main@s1")
    fsck_clean(dst)


# --- damaged streams ---------------------------------------------------------------------------------

def frames(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each frame of a stream."""
    out, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos + 1:pos + 5], "little")
        out.append((pos, pos + 5 + length + 16))
        pos += 5 + length + 16
    return out


def damage(data: bytes, how: str, other: bytes) -> bytes:
    spans = frames(data)
    first_chunks, last = spans[1], spans[-1]
    if how == "truncated-in-header":
        return data[:20]
    if how == "truncated-mid-chunks":
        return data[:spans[2][1] + 1000]          # two chunk frames whole, the third cut
    if how == "truncated-before-end":
        return data[:last[0]]
    if how == "bit-flip-in-chunk":
        pos = first_chunks[0] + 5000
        return data[:pos] + bytes([data[pos] ^ 1]) + data[pos + 1:]
    if how == "bit-flip-in-records":
        pos = spans[-2][0] + 30
        return data[:pos] + bytes([data[pos] ^ 0x40]) + data[pos + 1:]
    if how == "frames-swapped":
        a, b = spans[1], spans[2]
        return data[:a[0]] + data[b[0]:b[1]] + data[a[0]:a[1]] + data[b[1]:]
    if how == "frame-replayed":
        a = spans[1]
        return data[:a[1]] + data[a[0]:a[1]] + data[a[1]:]
    if how == "frame-from-another-stream":
        theirs = frames(other)[1]
        return data[:first_chunks[0]] + other[theirs[0]:theirs[1]] + data[first_chunks[1]:]
    if how == "data-after-end":
        return data + b"\0" * 10
    if how == "not-a-stream":
        return b"PGDMP" + data[5:]
    if how == "future-version":
        return data[:7] + b"\x02" + data[8:]
    raise AssertionError(how)


DAMAGE = ["truncated-in-header", "truncated-mid-chunks", "truncated-before-end", "bit-flip-in-chunk",
          "bit-flip-in-records", "frames-swapped", "frame-replayed", "frame-from-another-stream",
          "data-after-end", "not-a-stream", "future-version"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_stream_is_refused_and_leaves_nothing_behind(source, workdir, how):
    with open(source["full"], "rb") as f:
        data = f.read()
    other = os.path.join(workdir, "other.cows")
    cowfs("send", source["store"], "main@s2", "--output", other)   # another stream of the same data
    with open(other, "rb") as f:
        bad = damage(data, how, f.read())
    bad_path = os.path.join(workdir, "bad.cows")
    with open(bad_path, "wb") as f:
        f.write(bad)
    dst = new_store(workdir)
    before = state(dst)
    assert_one_line_error(receive(dst, bad_path, check=False), errors.EXIT_STREAM)
    assert state(dst) == before
    fsck_clean(dst)
    receive(dst, source["full"])           # the intact stream, retried, works
    assert digest_of(dst, "main@s1") == digest_of(source["store"], "main@s1")
    fsck_clean(dst)


def test_replayed_stream_and_missing_or_different_base_are_refused(source, workdir):
    dst = new_store(workdir)
    assert_one_line_error(receive(dst, source["inc"], check=False), errors.EXIT_NOT_FOUND,
                          "receive the full stream of main@s1 first")
    receive(dst, source["full"])
    before = state(dst)
    assert_one_line_error(receive(dst, source["full"], check=False), errors.EXIT_EXISTS, "already exists")
    assert_one_line_error(receive(dst, source["full"], "main", check=False), errors.EXIT_EXISTS)
    receive(dst, source["inc"])
    assert_one_line_error(receive(dst, source["inc"], check=False), errors.EXIT_EXISTS, "received already")
    # A volume named like the sender's, with a snapshot s1 of other content.
    other = new_store(workdir, "other")
    cowfs("init", os.path.join(workdir, "unrelated"))
    cowfs("snapshot", os.path.join(workdir, "unrelated"), "main@s1")
    unrelated_full = os.path.join(workdir, "unrelated.cows")
    cowfs("send", os.path.join(workdir, "unrelated"), "main@s1", "--output", unrelated_full)
    receive(other, unrelated_full)
    assert_one_line_error(receive(other, source["inc"], check=False), errors.EXIT_FAILURE,
                          "is not the sender's main@s1")
    assert state(dst) != before and "main@s2" in listing(dst)
    fsck_clean(dst)
    fsck_clean(other)


def test_incremental_needs_the_head_at_its_base_and_the_volume_unmounted(source, workdir):
    dst = new_store(workdir)
    receive(dst, source["full"])
    mount = Mount(dst, os.path.join(workdir, "m"), "main").mount()
    try:
        assert_one_line_error(receive(dst, source["inc"], check=False), errors.EXIT_BUSY, "unmount it")
        with open(f"{mount.path}/local-change", "w") as f:
            f.write("written here")
    finally:
        mount.close()
    assert_one_line_error(receive(dst, source["inc"], check=False), errors.EXIT_FAILURE,
                          "changed since @s1", "cowfs rollback")
    cowfs("rollback", dst, "main@s1")
    receive(dst, source["inc"])            # the head reads as s1 again: accepted
    assert digest_of(dst, "main@s2") == digest_of(source["store"], "main@s2")
    fsck_clean(dst)


def test_incremental_into_a_new_volume_clones_the_base(source, workdir):
    dst = new_store(workdir)
    receive(dst, source["full"])
    receive(dst, source["inc"], "branch")          # no volume 'branch': a clone of main@s1 + the stream
    assert listing(dst)["branch"]["origin"] == "main@s1"
    assert digest_of(dst, "branch@s2") == digest_of(source["store"], "main@s2")
    assert "main@s2" not in listing(dst)
    fsck_clean(dst)


def test_clone_sent_incrementally_against_its_origin(source, workdir):
    """After a cutover the serving volume is a clone: its snapshots go as changes since the origin."""
    store = source["store"]
    cowfs("clone", store, "main@s1", "served")
    mount = Mount(store, os.path.join(workdir, "m"), "served").mount()
    try:
        with open(f"{mount.path}/base/16384/same", "r+b") as f:
            f.write(b"changed on the clone")
    finally:
        mount.close()
    cowfs("snapshot", store, "served@c1")
    stream = os.path.join(workdir, "c1.cows")
    sent = json.loads(cowfs("send", store, "served@c1", "--from", "main@s1", "-o", stream, "--json").stdout)
    assert sent["chunks"] == 1 and os.path.getsize(stream) < 50_000
    dst = new_store(workdir)
    receive(dst, source["full"])
    receive(dst, stream)
    assert listing(dst)["served"]["origin"] == "main@s1"
    assert digest_of(dst, "served@c1") == digest_of(store, "served@c1")
    fsck_clean(dst)
    assert_one_line_error(cowfs("send", store, "main@s2", "--from", "served@c1", check=False),
                          errors.EXIT_USAGE, "not an older point")
    cowfs("destroy", store, "served")


def test_store_of_another_chunk_size_is_refused(source, workdir):
    dst = new_store(workdir, "dst16", "--chunk-size", "16K")
    before = state(dst)
    assert_one_line_error(receive(dst, source["full"], check=False), errors.EXIT_USAGE,
                          "--chunk-size 8192")
    assert state(dst) == before
    fsck_clean(dst)


# --- interrupted receives ----------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["pack.written@2", "receive.staged@2", "receive.synced@1",
                                   "receive.committing@1", "receive.committed@1"])
def test_receive_killed_at_each_step_is_invisible_or_complete(source, workdir, point):
    dst = new_store(workdir)
    before = state(dst)
    env = dict(os.environ, **{faults.ENV_VAR: f"crash={point}"})
    result = receive(dst, source["full"], check=False, env=env)
    assert result.returncode == faults.CRASH_EXIT_STATUS, result.stderr
    fsck_clean(dst)
    committed = point.startswith("receive.committed")
    assert ("main@s1" in listing(dst)) == committed
    if not committed:
        assert state(dst)[:3] == before[:3], "no volume, snapshot or chunk may appear"
        receive(dst, source["full"])       # retried, it succeeds
    assert digest_of(dst, "main@s1") == digest_of(source["store"], "main@s1")
    cowfs("gc", dst)                       # reclaims what the crash left in packs
    fsck_clean(dst)


@pytest.mark.parametrize("fault", ["pack_write=ENOSPC@2", "pack_sync=EIO@1"])
def test_receive_that_cannot_store_its_chunks_fails_in_one_line_and_leaves_nothing(source, workdir, fault):
    dst = new_store(workdir)
    before = state(dst)
    result = receive(dst, source["full"], check=False, env=dict(os.environ, **{faults.ENV_VAR: fault}))
    assert_one_line_error(result, errors.EXIT_IO, "nothing was received")
    assert state(dst) == before, "appended chunks are given back and the receive's packs removed"
    fsck_clean(dst)
    receive(dst, source["full"])
    fsck_clean(dst)


def test_receive_killed_by_sigkill_midway(source, workdir):
    dst = new_store(workdir)
    with open(source["full"], "rb") as f:
        data = f.read()
    proc = subprocess.Popen([sys.executable, "-m", "cowfs", "receive", dst], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.stdin.write(data[:-100_000])     # all but the end: the pack writer wrote most chunks
    proc.stdin.flush()
    packs = os.path.join(dst, "packs")
    wait_until(lambda: any(os.path.getsize(os.path.join(packs, p)) > 1 << 20 for p in os.listdir(packs)))
    proc.send_signal(signal.SIGKILL)       # chunks appended, nothing committed
    proc.wait()
    proc.stdin.close()
    fsck_clean(dst)
    assert "main@s1" not in listing(dst)
    receive(dst, source["full"])
    fsck_clean(dst)


def wait_until(condition, timeout_s: float = 60) -> None:
    import time
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# --- command line ------------------------------------------------------------------------------------

def test_send_shows_progress_on_a_terminal_and_none_with_json(source, workdir):
    out = os.path.join(workdir, "tty.cows")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # a real one has a size
    proc = subprocess.Popen([sys.executable, "-m", "cowfs", "send", source["store"], "main@s1", "-o", out],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break                          # EIO: the child closed the terminal
        if not chunk:
            break
        seen += chunk
    assert proc.wait() == 0
    os.close(master)
    text = seen.decode(errors="replace")
    assert "send" in text and "B/s" in text, text      # tqdm's bar: bytes and rate
    quiet = cowfs("send", source["store"], "main@s1", "-o", os.path.join(workdir, "q.cows"), "--json")
    assert quiet.stderr == "" and json.loads(quiet.stdout)["stream_bytes"] == os.path.getsize(out)


def test_a_snapshot_being_sent_cannot_be_destroyed(source):
    store = source["store"]
    cowfs("snapshot", store, "main@sending")
    proc = subprocess.Popen([sys.executable, "-m", "cowfs", "send", store, "main@sending"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.read(8) == b"COWSTRM\x01"     # the send holds its lock; the pipe is full soon
        assert_one_line_error(cowfs("destroy", store, "main@sending", check=False), errors.EXIT_BUSY)
    finally:
        proc.kill()                        # ours: started above
        proc.wait()
        proc.stdout.close()
    cowfs("destroy", store, "main@sending")


def test_send_refusals_are_one_line(source, workdir):
    store = source["store"]
    existing = source["full"]
    assert_one_line_error(cowfs("send", store, "main", check=False), errors.EXIT_USAGE, "VOLUME@SNAPSHOT")
    assert_one_line_error(cowfs("send", store, "main@s1", "--from", "main@s2", check=False),
                          errors.EXIT_USAGE, "not an older point")
    assert_one_line_error(cowfs("send", store, "main@s1", "-o", existing, check=False), errors.EXIT_EXISTS)
    assert_one_line_error(cowfs("send", store, "main@nope", "-o", os.path.join(workdir, "x"), check=False),
                          errors.EXIT_NOT_FOUND)
    assert not os.path.exists(os.path.join(workdir, "x")), "a failed send leaves no file"
    # The reader goes away (a receive that refused the stream): one line, exit 1.
    piped = subprocess.run(["bash", "-o", "pipefail", "-c",
                            f"{sys.executable} -m cowfs send {store} main@s1 | head -c 100 > /dev/null"],
                           cwd=REPO, capture_output=True, text=True)
    assert_one_line_error(piped, errors.EXIT_FAILURE, "stopped before its end")
