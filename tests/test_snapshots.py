"""Snapshots and clones on real mounts: isolation, immutability, chains, space."""

import json
import os
import threading

import pytest

from cowfs import errors
from helpers import Mount, cowfs, fsck_clean, tree_snapshot


def write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def listing(store) -> dict:
    return {row["name"]: row for row in json.loads(cowfs("list", store, "--json").stdout)}


def df(store) -> dict:
    return json.loads(cowfs("df", store, "--json").stdout)


@pytest.fixture
def mounts(store, workdir):
    """Factory of mounts that are all unmounted at the end, then fsck-checked."""
    made = []

    def make(volume="main", name=None):
        mount = Mount(store, os.path.join(workdir, name or volume.replace("@", "_at_")), volume)
        made.append(mount)
        return mount.mount()
    yield make
    for mount in reversed(made):
        mount.close()
    fsck_clean(store)


def test_clone_isolation_both_ways_across_remount(store, mounts):
    main = mounts("main")
    write(f"{main.path}/shared", b"original")
    write(f"{main.path}/dir/deep", os.urandom(100_000))
    cowfs("snapshot", store, "main@s1")
    cowfs("clone", store, "main@s1", "c1")
    clone = mounts("c1")
    write(f"{clone.path}/shared", b"clone side")
    write(f"{clone.path}/only-in-clone", b"c")
    os.unlink(f"{clone.path}/dir/deep")
    write(f"{main.path}/shared", b"origin side")
    write(f"{main.path}/only-in-origin", b"o")
    for _ in range(2):
        assert read(f"{main.path}/shared") == b"origin side"
        assert read(f"{clone.path}/shared") == b"clone side"
        assert not os.path.exists(f"{main.path}/only-in-clone")
        assert not os.path.exists(f"{clone.path}/only-in-origin")
        assert os.path.exists(f"{main.path}/dir/deep") and not os.path.exists(f"{clone.path}/dir/deep")
        main.umount()
        clone.umount()
        fsck_clean(store)
        main.mount()
        clone.mount()


def test_snapshot_content_never_changes(store, mounts):
    main = mounts("main")
    write(f"{main.path}/a", b"A" * 50_000)
    os.symlink("a", f"{main.path}/link")
    cowfs("snapshot", store, "main@frozen")
    snap = mounts("main@frozen")
    before = tree_snapshot(snap.path)
    write(f"{main.path}/a", b"B" * 70_000)
    os.unlink(f"{main.path}/link")
    os.mkdir(f"{main.path}/new")
    os.truncate(f"{main.path}/a", 10)
    assert tree_snapshot(snap.path) == before
    snap.umount()
    main.umount()
    snap.mount()
    assert tree_snapshot(snap.path) == before
    for attempt in (lambda: write(f"{snap.path}/x", b"x"), lambda: os.unlink(f"{snap.path}/a"),
                    lambda: os.mkdir(f"{snap.path}/d"), lambda: os.chmod(f"{snap.path}/a", 0o600)):
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == 30     # EROFS


def test_clone_of_clone_chain_of_depth_six_reads_correctly(store, mounts):
    expected = {}
    source = "main"
    for depth in range(6):
        mount = mounts(source)
        write(f"{mount.path}/level{depth}", f"written at depth {depth}".encode())
        if depth:
            os.unlink(f"{mount.path}/level{depth - 1}")
            expected.pop(f"level{depth - 1}")
        expected[f"level{depth}"] = f"written at depth {depth}".encode()
        mount.umount()
        new = f"c{depth}"
        cowfs("clone", store, source, new)      # snapshots `source` now, then clones it
        source = new
    deepest = mounts(source)
    assert {name: read(f"{deepest.path}/{name}") for name in os.listdir(deepest.path)} == expected
    assert listing(store)[source]["origin"].startswith("c4@")


def test_destroying_origin_keeps_clones_intact(store, mounts):
    main = mounts("main")
    payload = os.urandom(300_000)
    write(f"{main.path}/data", payload)
    main.umount()
    cowfs("clone", store, "main", "survivor")
    cowfs("snapshot", store, "main@extra")
    result = cowfs("destroy", store, "main")
    assert "survivor" in result.stdout
    assert "main" not in listing(store)
    fsck_clean(store)
    survivor = mounts("survivor")
    assert read(f"{survivor.path}/data") == payload
    survivor.umount()
    cowfs("destroy", store, "survivor")
    fsck_clean(store)
    assert df(store)["chunk_bytes"] == 0


def test_snapshot_of_busy_volume_has_every_returned_write(store, mounts):
    main = mounts("main")
    path = f"{main.path}/log"
    returned = []
    stop = threading.Event()

    def writer():
        with open(path, "ab", buffering=0) as f:
            n = 0
            while not stop.is_set():
                f.write(b"%08d\n" % n)          # returned == acknowledged by the filesystem
                returned.append(n)
                n += 1
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        snapshots = []
        for i in range(5):
            while len(returned) < 1000 * (i + 1):
                pass
            last_returned = returned[-1]
            cowfs("snapshot", store, f"main@busy{i}")
            snapshots.append((f"busy{i}", last_returned))
    finally:
        stop.set()
        thread.join()
    for name, last_returned in snapshots:
        snap = mounts(f"main@{name}")
        lines = read(f"{snap.path}/log").split(b"\n")
        assert len(lines) - 1 >= last_returned + 1, (name, len(lines), last_returned)
        assert lines[last_returned] == b"%08d" % last_returned
        snap.umount()


def test_rollback_keeps_newer_snapshots_and_can_be_undone(store, mounts):
    main = mounts("main")
    write(f"{main.path}/f", b"v1")
    cowfs("snapshot", store, "main@v1")
    write(f"{main.path}/f", b"v2")
    write(f"{main.path}/g", b"new in v2")
    cowfs("snapshot", store, "main@v2")
    write(f"{main.path}/f", b"v3")
    result = cowfs("rollback", store, "main@v1", check=False)
    assert result.returncode == errors.EXIT_BUSY and "unmount" in result.stderr
    main.umount()
    result = cowfs("rollback", store, "main@v1")
    undo = result.stdout.split("snapshot main@")[1].strip()
    main.mount()
    assert read(f"{main.path}/f") == b"v1" and not os.path.exists(f"{main.path}/g")
    names = listing(store)
    assert "main@v2" in names and f"main@{undo}" in names
    main.umount()
    cowfs("rollback", store, f"main@{undo}")
    main.mount()
    assert read(f"{main.path}/f") == b"v3" and read(f"{main.path}/g") == b"new in v2"


def test_rename_volume_and_snapshot(store, mounts):
    main = mounts("main")
    write(f"{main.path}/f", b"x")
    main.umount()
    cowfs("snapshot", store, "main@old")
    cowfs("rename", store, "main@old", "new")
    cowfs("rename", store, "main", "prod")
    assert set(listing(store)) == {"prod", "prod@new"}
    result = cowfs("rename", store, "prod@new", "other@x", check=False)
    assert result.returncode == errors.EXIT_USAGE
    prod = mounts("prod")
    assert read(f"{prod.path}/f") == b"x"


def test_destroy_and_gc_free_exactly_what_df_predicts(store, mounts):
    main = mounts("main")
    write(f"{main.path}/keep", os.urandom(400_000))
    write(f"{main.path}/gone", os.urandom(2_000_000))
    cowfs("snapshot", store, "main@s1")
    os.unlink(f"{main.path}/gone")
    write(f"{main.path}/later", os.urandom(1_000_000))
    cowfs("snapshot", store, "main@s2")
    main.umount()
    before = df(store)
    predicted = {item["name"]: item["frees_bytes"] for item in before["items"]}
    assert predicted["main@s1"] >= 2_000_000
    assert predicted["main@s2"] == 0         # its data is still in the head
    packs_before = before["pack_bytes"]
    cowfs("destroy", store, "main@s1")
    after = df(store)
    assert before["chunk_bytes"] - after["chunk_bytes"] == predicted["main@s1"]
    gc_out = cowfs("gc", store).stdout
    assert "compacted" in gc_out
    after_gc = df(store)
    assert after_gc["pack_bytes"] <= packs_before - predicted["main@s1"]
    fsck_clean(store)
    main.mount()
    assert len(read(f"{main.path}/keep")) == 400_000 and len(read(f"{main.path}/later")) == 1_000_000


def test_gc_while_mounted_and_written(store, mounts):
    main = mounts("main")
    for round_ in range(3):
        write(f"{main.path}/churn", os.urandom(1_500_000))
        fd = os.open(f"{main.path}/churn", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        cowfs("gc", store, "--min-dead", "0.01")
    payload = os.urandom(500_000)
    write(f"{main.path}/after", payload)
    main.umount()
    main.mount()
    assert read(f"{main.path}/after") == payload and len(read(f"{main.path}/churn")) == 1_500_000


def test_snapshot_commands_refuse_bad_input(store, mounts):
    main = mounts("main")
    cases = [
        (("snapshot", store, "main"), errors.EXIT_USAGE, "VOLUME@NAME"),
        (("snapshot", store, "main@bad/name"), errors.EXIT_USAGE, "invalid snapshot name"),
        (("snapshot", store, "nope@s"), errors.EXIT_NOT_FOUND, "no volume named"),
        (("clone", store, "main@missing", "c"), errors.EXIT_NOT_FOUND, "no snapshot"),
        (("destroy", store, "main"), errors.EXIT_BUSY, "mounted"),
        (("destroy", store, "main@nothing"), errors.EXIT_NOT_FOUND, "no snapshot"),
        (("rollback", store, "main"), errors.EXIT_USAGE, "VOLUME@NAME"),
        (("rename", store, "main", "x" * 200), errors.EXIT_USAGE, "invalid volume name"),
    ]
    cowfs("snapshot", store, "main@s")
    cases.append((("snapshot", store, "main@s"), errors.EXIT_EXISTS, "already has a snapshot"))
    cases.append((("clone", store, "main@s", "main"), errors.EXIT_EXISTS, "already exists"))
    for args, code, words in cases:
        result = cowfs(*args, check=False)
        assert result.returncode == code, (args, result.stderr)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    snap = mounts("main@s")
    result = cowfs("destroy", store, "main@s", check=False)
    assert result.returncode == errors.EXIT_BUSY and "in use" in result.stderr
    assert "main@s" in listing(store)


def test_destroy_leaves_no_lock_files_behind(store, mounts):
    """Every destroyed snapshot or volume would otherwise leave one file in run/ forever."""
    main = mounts("main")
    write(f"{main.path}/f", b"x" * 10_000)
    cowfs("snapshot", store, "main@s1")
    cowfs("clone", store, "main@s1", "dev")
    cowfs("snapshot", store, "dev@d1")
    snap_view = mounts("main@s1")          # a read-only mount takes the snapshot's lock file
    snap_view.umount()
    cowfs("destroy", store, "dev@d1")
    cowfs("destroy", store, "dev")
    cowfs("destroy", store, "main@s1")
    run_dir = os.path.join(store, "run")
    assert [name for name in os.listdir(run_dir) if name.startswith("snap-")] == []
    assert "main@s1" not in listing(store)


def regular_bytes(root: str) -> int:
    """Sum of regular file sizes under root, each inode once (what `list` calls logical)."""
    seen, total = set(), 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_mode & 0o170000) == 0o100000 and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def test_list_logical_sizes_match_the_tree_at_every_snapshot(store, mounts):
    """`list` sums sizes once and then follows the changes from snapshot to
    snapshot; each row must still equal the tree as it was."""
    main = mounts("main")
    expected = {}
    for step in range(10):
        write(f"{main.path}/grow", b"g" * (50_000 * (step + 1)))
        write(f"{main.path}/d{step % 3}/f{step}", os.urandom(7_000 + step))
        if step == 3:
            os.link(f"{main.path}/grow", f"{main.path}/grow-link")
        if step == 5:
            os.unlink(f"{main.path}/d0/f0")
            os.truncate(f"{main.path}/d1/f1", 10)
        if step == 7:
            os.rename(f"{main.path}/d2", f"{main.path}/d2-moved")
            os.truncate(f"{main.path}/d1/f4", 3_000_000)       # sparse growth counts
        cowfs("snapshot", store, f"main@s{step}")
        expected[f"main@s{step}"] = regular_bytes(main.path)
    cowfs("clone", store, "main@s4", "dev")
    dev = mounts("dev")
    expected["dev"] = regular_bytes(dev.path)
    write(f"{main.path}/after", b"a" * 123)
    expected["main"] = regular_bytes(main.path)
    main.umount()                       # unmounted: list reads committed metadata only
    rows = listing(store)
    assert {name: rows[name]["logical_bytes"] for name in expected} == expected


def test_destroy_sets_and_ranges_all_or_none(store, mounts):
    main = mounts("main")
    for step in range(12):
        write(f"{main.path}/f{step}", os.urandom(100_000))
        cowfs("snapshot", store, f"main@s{step}")
        os.unlink(f"{main.path}/f{step}")             # each snapshot alone holds its file

    def names():
        return sorted((n for n in listing(store) if n.startswith("main@")), key=lambda n: int(n[6:]))

    refused = [
        ("main@s9%s7", errors.EXIT_USAGE, "give the older snapshot first"),
        ("main@s7%nope", errors.EXIT_NOT_FOUND, "no snapshot 'nope'"),
        ("main@s1,s2,bad/name", errors.EXIT_USAGE, "invalid snapshot name"),
    ]
    for target, code, words in refused:
        result = cowfs("destroy", store, target, check=False)
        assert result.returncode == code and words in result.stderr, (target, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    cowfs("hold", store, "main@s7", "--reason", "audit")
    result = cowfs("destroy", store, "main@s2,s7", check=False)
    assert result.returncode == errors.EXIT_BUSY and "held (audit)" in result.stderr
    view = mounts("main@s9")
    result = cowfs("destroy", store, "main@s2%s9", check=False)
    assert result.returncode == errors.EXIT_BUSY and "in use" in result.stderr
    assert len(names()) == 12                         # all or none: nothing went
    view.umount()
    cowfs("release", store, "main@s7")

    before = df(store)
    out = cowfs("destroy", store, "main@s3%s5").stdout
    assert "destroyed 3 snapshot(s) of main (s3 .. s5)" in out
    freed = before["chunk_bytes"] - df(store)["chunk_bytes"]
    assert freed >= 3 * 100_000 and human_in(out, freed)
    cowfs("destroy", store, "main@%s1")
    cowfs("destroy", store, "main@s10%")
    cowfs("destroy", store, "main@s6,s8")
    assert names() == ["main@s2", "main@s7", "main@s9"]
    for step in (2, 7, 9):
        view = mounts(f"main@s{step}", name=f"view{step}")
        assert len(read(f"{view.path}/f{step}")) == 100_000
        view.umount()


def human_in(text: str, size_bytes: int) -> bool:
    """The freed figure the command printed is the one df measured."""
    from cowfs.cli_common import human
    return f"freed {human(size_bytes)}" in text


def test_clone_and_rollback_of_a_snapshot_with_a_file_unlinked_while_open(store, mounts):
    """PostgreSQL unlinks files its backends still hold open (DROP TABLE): a
    snapshot then holds an inode with no name. Its clone and a rollback to it
    must know that orphan and free it at their next mount (fsck clean all along)."""
    main = mounts("main")
    write(f"{main.path}/kept", b"k" * 50_000)
    held = open(f"{main.path}/dropped", "wb")
    held.write(b"d" * 300_000)
    held.flush()
    os.fsync(held.fileno())
    os.unlink(f"{main.path}/dropped")
    cowfs("snapshot", store, "main@with-orphan")
    cowfs("clone", store, "main@with-orphan", "rehearsal")
    fsck_clean(store)                                  # the clone, never mounted, knows its orphan
    held.close()                                       # main frees its own copy at last close
    clone = mounts("rehearsal")
    assert sorted(os.listdir(clone.path)) == ["kept"]
    clone.umount()
    fsck_clean(store)
    main.umount()
    cowfs("rollback", store, "main@with-orphan")
    fsck_clean(store)                                  # the head reads as the snapshot: orphan and all
    main.mount()
    assert sorted(os.listdir(main.path)) == ["kept"] and read(f"{main.path}/kept") == b"k" * 50_000


def test_list_never_reads_a_whole_volume_for_a_digest(store, mounts):
    """The first digest of a volume is one pass over all its records: `cowfs
    digest` makes it, `list` shows null until then and O(changes) steps after."""
    main = mounts("main")
    write(f"{main.path}/a", os.urandom(200_000))
    cowfs("snapshot", store, "main@s1")
    assert listing(store)["main@s1"]["digest"] is None
    first = cowfs("digest", store, "main@s1").stdout.split()[0]
    assert listing(store)["main@s1"]["digest"] == first
    write(f"{main.path}/b", b"more")
    cowfs("snapshot", store, "main@s2")
    second = listing(store)["main@s2"]["digest"]          # one step from s1's
    assert second not in (None, first)
    assert cowfs("digest", store, "main@s2").stdout.split()[0] == second
