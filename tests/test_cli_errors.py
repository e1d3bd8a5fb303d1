"""Bad input: one line on stderr, a pinned exit code, no traceback, nothing changed."""

import hashlib
import os

import pytest

from cowfs import errors
from helpers import Mount, cowfs, fsck_clean


def tree_digest(path):
    """Names, sizes and bytes of everything under path: proof that nothing changed."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            digest.update(full.encode())
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def assert_one_line_error(result, exit_code, *words):
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cowfs: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_init_refuses_non_empty_directory(workdir):
    target = os.path.join(workdir, "full")
    os.mkdir(target)
    with open(os.path.join(target, "keep"), "w") as f:
        f.write("precious")
    before = tree_digest(target)
    assert_one_line_error(cowfs("init", target, check=False), errors.EXIT_EXISTS, "not an empty directory")
    assert tree_digest(target) == before


def test_init_refuses_existing_store(store):
    before = tree_digest(store)
    assert_one_line_error(cowfs("init", store, check=False), errors.EXIT_EXISTS, "already holds a cowfs store")
    assert tree_digest(store) == before


@pytest.mark.parametrize("size", ["1000", "3K", "2M", "abc", "0"])
def test_init_refuses_bad_chunk_size(workdir, size):
    result = cowfs("init", os.path.join(workdir, "s"), "--chunk-size", size, check=False)
    assert_one_line_error(result, errors.EXIT_USAGE)
    assert not os.path.exists(os.path.join(workdir, "s"))


def test_mount_of_missing_store(workdir):
    os.mkdir(os.path.join(workdir, "mnt"))
    result = cowfs("mount", os.path.join(workdir, "nostore"), os.path.join(workdir, "mnt"), check=False)
    assert_one_line_error(result, errors.EXIT_NOT_FOUND, "does not exist", "cowfs init")


def test_mount_of_store_with_unknown_format_version(store, workdir):
    import lmdb
    env = lmdb.open(os.path.join(store, "meta"), max_dbs=16)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format_version", b"99", db=meta)
    env.close()
    os.mkdir(os.path.join(workdir, "mnt"))
    before = tree_digest(os.path.join(store, "packs"))
    result = cowfs("mount", store, os.path.join(workdir, "mnt"), check=False)
    assert_one_line_error(result, errors.EXIT_STORE, "format version 99")
    assert tree_digest(os.path.join(store, "packs")) == before
    assert_one_line_error(cowfs("fsck", store, check=False), errors.EXIT_STORE, "format version 99")


def test_mount_onto_missing_mountpoint(store, workdir):
    result = cowfs("mount", store, os.path.join(workdir, "nowhere"), check=False)
    assert_one_line_error(result, errors.EXIT_NOT_FOUND, "mkdir -p")


def test_mount_of_unknown_volume(store, workdir):
    os.mkdir(os.path.join(workdir, "mnt"))
    result = cowfs("mount", store, os.path.join(workdir, "mnt"), "--volume", "nope", check=False)
    assert_one_line_error(result, errors.EXIT_NOT_FOUND, "no volume named 'nope'")


@pytest.mark.parametrize("name", ["", "..", "a/b", ".hidden", "x" * 129, "bad\x01name"])
def test_mount_refuses_invalid_volume_names(store, workdir, name):
    os.mkdir(os.path.join(workdir, "mnt"))
    result = cowfs("mount", store, os.path.join(workdir, "mnt"), "--volume", name, check=False)
    assert_one_line_error(result, errors.EXIT_USAGE, "invalid volume name")


def test_second_mount_of_a_mounted_volume_is_refused(mounted, workdir):
    with open(os.path.join(mounted.path, "f"), "w") as f:
        f.write("still here")
    other = os.path.join(workdir, "mnt2")
    os.mkdir(other)
    result = cowfs("mount", mounted.store, other, check=False)
    assert_one_line_error(result, errors.EXIT_BUSY, "volume main is in use", "unmount it first")
    with open(os.path.join(mounted.path, "f")) as f:
        assert f.read() == "still here"


def test_mount_onto_a_mount_point_in_use(mounted):
    result = cowfs("mount", mounted.store, mounted.path, check=False)
    assert_one_line_error(result, errors.EXIT_BUSY, "already a mount point")


def test_umount_of_something_not_mounted(workdir):
    assert_one_line_error(cowfs("umount", workdir, check=False), errors.EXIT_NOT_FOUND, "is not mounted")


def test_umount_of_busy_mount_keeps_it_mounted(mounted):
    handle = open(os.path.join(mounted.path, "busy"), "w")
    try:
        os.chdir(mounted.path)
        result = cowfs("umount", mounted.path, check=False)
        assert_one_line_error(result, errors.EXIT_BUSY, "is busy")
    finally:
        os.chdir("/")
        handle.close()
    assert os.path.exists(os.path.join(mounted.path, "busy"))


def test_fsck_of_missing_store(workdir):
    assert_one_line_error(cowfs("fsck", os.path.join(workdir, "x"), check=False), errors.EXIT_NOT_FOUND)


def test_unknown_command_and_missing_argument():
    assert_one_line_error(cowfs("frobnicate", check=False), errors.EXIT_USAGE, "--help")
    assert_one_line_error(cowfs("mount", check=False), errors.EXIT_USAGE, "required")


def test_sigterm_to_the_daemon_flushes_and_unmounts(store, workdir):
    import signal
    from helpers import mount_entry, wait_gone
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    try:
        with open(os.path.join(mount.path, "f"), "wb") as f:
            f.write(b"z" * 50_000)                # buffered, not fsynced
        os.kill(mount.pid, signal.SIGTERM)
        wait_gone(mount.pid)
        assert mount_entry(mount.path) is None
        fsck_clean(store)
        mount.mount()
        with open(os.path.join(mount.path, "f"), "rb") as f:
            assert f.read() == b"z" * 50_000
    finally:
        mount.close()
    fsck_clean(store)


# --- hostile input for every command ---------------------------------------------------------

def test_exit_codes_are_pinned():
    """Scripts test these numbers; changing one is an interface change."""
    assert (errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_USAGE, errors.EXIT_NOT_FOUND,
            errors.EXIT_EXISTS, errors.EXIT_BUSY, errors.EXIT_STORE, errors.EXIT_IO,
            errors.EXIT_STREAM) == (0, 1, 2, 3, 4, 5, 6, 7, 8)


BAD_NAMES = {
    "empty": "",
    "dot-dot": "..",
    "slash": "/",
    "control-char": "a\x01b",
    "newline": "a\nb",
    "10000-chars": "x" * 10_000,
    "at-sign": "a@b",
}

# (command template, does the slot name something that must exist?)
# "{}" is the hostile name; STORE and MNT are filled in by the test.
NAME_SLOTS = {
    "snapshot-vol": (["snapshot", "STORE", "{}@s2"], True),
    "snapshot-snap": (["snapshot", "STORE", "main@{}"], False),
    "clone-source-vol": (["clone", "STORE", "{}@s1", "c"], True),
    "clone-source-snap": (["clone", "STORE", "main@{}", "c"], True),
    "clone-new": (["clone", "STORE", "main@s1", "{}"], False),
    "destroy-vol": (["destroy", "STORE", "{}"], True),
    "destroy-snap": (["destroy", "STORE", "main@{}"], True),
    "rollback-snap": (["rollback", "STORE", "main@{}"], True),
    "rename-old": (["rename", "STORE", "{}", "other"], True),
    "rename-new": (["rename", "STORE", "main", "{}"], False),
    "rename-snap": (["rename", "STORE", "main@{}", "other"], True),
    "mount-volume": (["mount", "STORE", "MNT", "--volume", "{}"], True),
    "hold": (["hold", "STORE", "main@{}"], True),
    "release": (["release", "STORE", "main@{}"], True),
    "diff": (["diff", "STORE", "main@{}", "main"], True),
    "prune": (["prune", "STORE", "{}"], True),
    "policy": (["policy", "STORE", "{}", "--every", "1h", "--keep", "3"], True),
    "send-vol": (["send", "STORE", "{}@s1"], True),
    "send-snap": (["send", "STORE", "main@{}"], True),
    "send-from": (["send", "STORE", "main@s1", "--from", "main@{}"], True),
    "digest": (["digest", "STORE", "main@{}"], True),
    "receive-vol": (["receive", "STORE", "{}", "--input", "/dev/null"], False),
}
# Slots that take a whole VOL or VOL@SNAP target: "a@b" is well formed there (volume a).
WHOLE_TARGET_SLOTS = {"destroy-vol", "rename-old", "mount-volume"}
# A name that is valid but names nothing: not found, only where it must exist.
CASES = [(slot, kind) for slot in NAME_SLOTS for kind in BAD_NAMES]
CASES += [(slot, "unknown") for slot, (_, must_exist) in NAME_SLOTS.items() if must_exist]


@pytest.fixture(scope="module")
def shared_store():
    """One store (volume main, snapshot main@s1) for the many hostile-input cases."""
    from helpers import make_workdir, remove_workdir
    workdir = make_workdir()
    store = os.path.join(workdir, "store")
    cowfs("init", store)
    cowfs("snapshot", store, "main@s1")
    os.mkdir(os.path.join(workdir, "mnt"))
    yield store, os.path.join(workdir, "mnt")
    remove_workdir(workdir)


def tree_digest_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("slot,kind", CASES)
def test_hostile_name_gives_one_line_a_pinned_code_and_changes_nothing(shared_store, slot, kind):
    store, mnt = shared_store
    template, _ = NAME_SLOTS[slot]
    name = "ghost" if kind == "unknown" else BAD_NAMES[kind]
    args = [store if a == "STORE" else mnt if a == "MNT" else a.replace("{}", name) for a in template]
    before = (tree_digest_file(os.path.join(store, "meta", "data.mdb")), tree_digest(os.path.join(store, "packs")))
    result = cowfs(*args, check=False)
    well_formed = kind == "unknown" or (kind == "at-sign" and slot in WHOLE_TARGET_SLOTS)
    expected = errors.EXIT_NOT_FOUND if well_formed else errors.EXIT_USAGE
    assert_one_line_error(result, expected)
    assert (tree_digest_file(os.path.join(store, "meta", "data.mdb")),
            tree_digest(os.path.join(store, "packs"))) == before, "a refused command changed the store"


def test_nul_in_a_name_is_refused_by_the_name_check():
    """NUL cannot travel in argv (execve strings end at it); the check refuses it anyway."""
    from cowfs import snapshots
    for text in ("a\0b", "main@a\0b", "\0"):
        with pytest.raises(errors.UsageError):
            snapshots.parse_target(text)


@pytest.mark.parametrize("args", [
    ["gc", "STORE", "--min-dead", "5"],
    ["gc", "STORE", "--min-dead", "-0.5"],
    ["gc", "STORE", "--min-dead", "nan"],
    ["gc", "STORE", "--min-dead", "lots"],
    ["init", "NEWSTORE", "--chunk-size", "99999999999999999999"],
    ["fsck"],
    ["snapshot", "STORE"],
    ["clone", "STORE", "main@s1"],
    ["rename", "STORE", "main"],
    ["snapshot", "STORE", "main"],
    ["mount", "STORE", "MNT", "--commit-interval", "-1"],
    ["mount", "STORE", "MNT", "--commit-interval", "nan"],
    ["mount", "STORE", "MNT", "--commit-interval", "0"],
    ["send", "STORE", "main"],
    ["send", "STORE", "main@s1", "--from", "main@s1"],
    ["receive"],
])
def test_missing_or_out_of_range_arguments_are_usage_errors(shared_store, args):
    store, mnt = shared_store
    new_store = os.path.join(os.path.dirname(store), "new-store")
    argv = [store if a == "STORE" else new_store if a == "NEWSTORE" else mnt if a == "MNT" else a
            for a in args]
    before = tree_digest_file(os.path.join(store, "meta", "data.mdb"))
    assert_one_line_error(cowfs(*argv, check=False), errors.EXIT_USAGE)
    assert tree_digest_file(os.path.join(store, "meta", "data.mdb")) == before
    assert not os.path.exists(new_store)
    with open("/proc/self/mounts") as f:
        assert f" {mnt} " not in f.read(), "a refused mount left a mount behind"


@pytest.mark.parametrize("command", ["list", "gc", "df", "fsck", "scrub", "snapshot", "destroy", "send",
                                     "digest"])
def test_store_argument_that_is_no_store(workdir, command):
    plain = os.path.join(workdir, "plain")
    os.mkdir(plain)
    a_file = os.path.join(workdir, "a-file")
    open(a_file, "w").close()
    extra = ["main@s"] if command in ("snapshot", "destroy", "send", "digest") else []
    for path, code in ((os.path.join(workdir, "missing"), errors.EXIT_NOT_FOUND), (plain, errors.EXIT_STORE),
                       (a_file, errors.EXIT_STORE)):
        assert_one_line_error(cowfs(command, path, *extra, check=False), code)
    assert os.listdir(plain) == []
