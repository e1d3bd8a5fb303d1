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
