"""File semantics on a real mount, compared with a plain directory.

The same long random sequence of operations is applied to a cowfs mount and
to a directory on the local disk; the trees must be identical (names, modes,
sizes, link counts, bytes, symlink targets), before and after a remount.
"""

import errno
import os
import random
import subprocess
import sys

import pytest

from helpers import Mount, cowfs, daemon_stats, dump, fsck_clean, tree_snapshot

CHUNK = 8192


class Mirror:
    """Applies each operation to two roots and checks both give the same result."""

    def __init__(self, roots, rng):
        self.roots, self.rng = roots, rng
        self.files, self.dirs, self.links = [], [""], []

    def both(self, func, *rel_paths):
        outcomes = []
        for root in self.roots:
            paths = [os.path.join(root, p) for p in rel_paths]
            try:
                func(*paths)
                outcomes.append(None)
            except OSError as exc:
                outcomes.append(exc.errno)
        assert outcomes[0] == outcomes[1], f"{func.__name__}{rel_paths}: plain {outcomes[0]} vs cowfs {outcomes[1]}"
        return outcomes[0]

    def new_name(self, prefix):
        parent = self.rng.choice(self.dirs)
        return os.path.join(parent, f"{prefix}{self.rng.randrange(10**6)}")

    def step(self):
        op = self.rng.choices(
            ["create", "write", "append", "truncate", "rename", "unlink", "link", "symlink",
             "chmod", "mkdir", "rmdir", "sparse", "rewrite"],
            weights=[8, 20, 8, 6, 6, 4, 4, 3, 4, 3, 2, 4, 4])[0]
        getattr(self, "op_" + op)()

    def pick_file(self):
        return self.rng.choice(self.files) if self.files else None

    def op_create(self):
        path = self.new_name("f")
        data = self.rng.randbytes(self.rng.choice([0, 1, 100, CHUNK, 3 * CHUNK + 17]))

        def create(p):
            with open(p, "xb") as f:
                f.write(data)
        if self.both(create, path) is None:
            self.files.append(path)

    def _write_at(self, offset, data):
        path = self.pick_file()
        if path is None:
            return

        def write(p):
            fd = os.open(p, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(write, path)

    def op_write(self):
        size = self.rng.choice([1, 7, 512, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 3, 200_000])
        offset = self.rng.choice([0, 1, CHUNK - 3, CHUNK, self.rng.randrange(300_000)])
        data = self.rng.choice([self.rng.randbytes(size), bytes(size), b"x" * size])
        self._write_at(offset, data)

    def op_sparse(self):
        self._write_at(self.rng.randrange(1, 3_000_000), self.rng.randbytes(self.rng.randrange(1, 20_000)))

    def op_append(self):
        path = self.pick_file()
        if path is None:
            return
        data = self.rng.randbytes(self.rng.randrange(1, 40_000))

        def append(p):
            with open(p, "ab") as f:
                f.write(data)
        self.both(append, path)

    def op_truncate(self):
        path = self.pick_file()
        if path is None:
            return
        size = self.rng.choice([0, 1, CHUNK, CHUNK + 5, self.rng.randrange(500_000)])
        self.both(lambda p: os.truncate(p, size), path)

    def op_rewrite(self):
        """open(path, "w"): O_TRUNC, then new contents (how configuration files are written)."""
        path = self.pick_file()
        if path is None:
            return
        data = self.rng.randbytes(self.rng.choice([0, 100, CHUNK + 1]))

        def rewrite(p):
            with open(p, "wb") as f:
                f.write(data)
        self.both(rewrite, path)

    def op_rename(self):
        if not self.files:
            return
        src = self.rng.choice(self.files)
        dst = self.rng.choice(self.files) if self.rng.random() < 0.3 else self.new_name("r")
        if self.both(os.rename, src, dst) is None and src != dst:
            self.files.remove(src)
            if dst in self.files:
                self.files.remove(dst)
            self.files.append(dst)

    def op_unlink(self):
        path = self.pick_file()
        if path is not None and self.both(os.unlink, path) is None:
            self.files.remove(path)

    def op_link(self):
        path = self.pick_file()
        if path is None:
            return
        new = self.new_name("h")
        if self.both(os.link, path, new) is None:
            self.files.append(new)

    def op_symlink(self):
        target = self.rng.choice(["nowhere", "../x", "a" * 200]) + str(self.rng.randrange(100))
        new = self.new_name("s")
        if self.both(lambda p: os.symlink(target, p), new) is None:
            self.links.append(new)

    def op_chmod(self):
        path = self.pick_file()
        if path is not None:
            mode = self.rng.choice([0o600, 0o644, 0o755, 0o700, 0o640, 0o4755])
            self.both(lambda p: os.chmod(p, mode), path)

    def op_mkdir(self):
        path = self.new_name("d")
        if self.both(os.mkdir, path) is None:
            self.dirs.append(path)

    def op_rmdir(self):
        if len(self.dirs) < 2:
            return
        path = self.rng.choice(self.dirs[1:])
        if self.both(os.rmdir, path) is None:
            self.dirs.remove(path)


def assert_same_tree(plain, mnt, when):
    expected, actual = tree_snapshot(plain), tree_snapshot(mnt)
    assert actual == expected, f"trees differ {when}:\nplain={dump(expected)[:3000]}\ncowfs={dump(actual)[:3000]}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_match_plain_directory(store, workdir, seed):
    plain = os.path.join(workdir, "plain")
    os.mkdir(plain)
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    try:
        mirror = Mirror([plain, mount.path], random.Random(seed))
        for i in range(600):
            mirror.step()
        assert_same_tree(plain, mount.path, "while mounted")
        mount.umount()
        fsck_clean(store)
        mount.mount()
        assert_same_tree(plain, mount.path, "after unmount and remount")
    finally:
        mount.close()
    fsck_clean(store)


def test_read_through_handle_opened_write_only_by_another_process(mounted):
    path = os.path.join(mounted.path, "wo")
    writer = subprocess.Popen([sys.executable, "-c", f"""
import os, sys
fd = os.open({path!r}, os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, b"A" * 10000)
os.pwrite(fd, b"B" * 100, 5000)     # partial-page write: the kernel must read the page
sys.stdout.write("written\\n"); sys.stdout.flush()
sys.stdin.readline()
os.write(fd, b"C" * 10)
os.close(fd)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "written\n"
        with open(path, "rb") as f:
            data = f.read()
        assert data == b"A" * 5000 + b"B" * 100 + b"A" * 4900
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.wait(timeout=30) == 0
    finally:
        writer.kill()
        writer.wait()
    with open(path, "rb") as f:
        assert f.read() == b"A" * 5000 + b"B" * 100 + b"A" * 4900 + b"C" * 10


def test_unlinked_open_file_keeps_its_data_until_close(mounted, store):
    path = os.path.join(mounted.path, "tmpfile")
    data = os.urandom(100_000)
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb") as f:
        os.unlink(path)
        assert not os.path.exists(path)
        assert f.read() == data
    fsck_clean(store)


def test_rename_noreplace_and_replace(mounted):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    a, b = os.path.join(mounted.path, "a"), os.path.join(mounted.path, "b")
    for path, text in ((a, b"a"), (b, b"b")):
        with open(path, "wb") as f:
            f.write(text)
    at_fdcwd, rename_noreplace = -100, 1
    rc = libc.renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_noreplace)
    assert rc == -1 and ctypes.get_errno() == errno.EEXIST
    os.rename(a, b)
    assert not os.path.exists(a)
    with open(b, "rb") as f:
        assert f.read() == b"a"


def test_directory_rename_rules(mounted):
    root = mounted.path
    os.makedirs(os.path.join(root, "x/y/z"))
    with pytest.raises(OSError) as exc:
        os.rename(os.path.join(root, "x"), os.path.join(root, "x/y/z/w"))
    assert exc.value.errno == errno.EINVAL
    os.mkdir(os.path.join(root, "full"))
    open(os.path.join(root, "full/f"), "w").close()
    with pytest.raises(OSError) as exc:
        os.rename(os.path.join(root, "x"), os.path.join(root, "full"))
    assert exc.value.errno == errno.ENOTEMPTY
    os.rename(os.path.join(root, "x/y"), os.path.join(root, "full/y"))
    assert os.stat(os.path.join(root, "x")).st_nlink == 2
    assert os.stat(os.path.join(root, "full")).st_nlink == 3
    assert os.listdir(os.path.join(root, "full/y")) == ["z"]


def test_extended_attributes(mounted):
    path = os.path.join(mounted.path, "f")
    open(path, "w").close()
    os.setxattr(path, "user.color", b"blue")
    os.setxattr(path, "user.empty", b"")
    assert os.getxattr(path, "user.color") == b"blue"
    assert sorted(os.listxattr(path)) == ["user.color", "user.empty"]
    os.removexattr(path, "user.color")
    with pytest.raises(OSError) as exc:
        os.getxattr(path, "user.color")
    assert exc.value.errno == errno.ENODATA
    assert os.listxattr(path) == ["user.empty"]


def test_a_mount_without_xattrs_refuses_them_and_saves_the_getxattr_before_each_write(store, workdir):
    """--no-xattrs: every xattr call fails with EOPNOTSUPP, and the kernel stops
    asking for security.capability before each write(2) (counted by the daemon)."""
    mount = Mount(store, os.path.join(workdir, "mnt"))
    os.makedirs(mount.path)
    cowfs("mount", store, mount.path, "--no-xattrs")
    try:
        path = os.path.join(mount.path, "f")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for i in range(50):
                os.pwrite(fd, os.urandom(8192), i * 8192)
                os.fdatasync(fd)
        finally:
            os.close(fd)
        for call, args in ((os.setxattr, (path, "user.a", b"1")), (os.getxattr, (path, "user.a")),
                           (os.listxattr, (path,))):
            with pytest.raises(OSError) as exc:
                call(*args)
            assert exc.value.errno == errno.EOPNOTSUPP, call
        requests = daemon_stats(store)["fuse_requests"]
        assert requests["write"] >= 50 and requests.get("getxattr", 0) <= 1, requests
    finally:
        mount.close()
    fsck_clean(store)


def test_permissions_enforced_for_other_users(mounted):
    secret = os.path.join(mounted.path, "private")
    os.mkdir(secret, 0o700)
    with open(os.path.join(secret, "data"), "w") as f:
        f.write("secret")
    shared = os.path.join(mounted.path, "pub")
    os.mkdir(shared, 0o755)
    os.chown(shared, 101 if _has_user("postgres") else 65534, -1)
    user = "postgres" if _has_user("postgres") else "nobody"
    denied = subprocess.run(["runuser", "-u", user, "--", "cat", os.path.join(secret, "data")],
                            capture_output=True, text=True)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    owner = os.stat(shared).st_uid
    made = subprocess.run(["runuser", "-u", user, "--", "sh", "-c",
                           f"echo hi > {shared}/mine && stat -c %u {shared}/mine"],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert int(made.stdout) == owner


def _has_user(name):
    import pwd
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_fsync_and_fdatasync_and_fsyncdir_succeed(mounted):
    path = os.path.join(mounted.path, "durable")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"x" * 100_000)
    os.fsync(fd)
    os.write(fd, b"y")
    os.fdatasync(fd)
    os.close(fd)
    dfd = os.open(mounted.path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)


def test_statfs_reports_the_store_disk(mounted, store):
    fs_stat, disk = os.statvfs(mounted.path), os.statvfs(store)
    assert fs_stat.f_blocks * fs_stat.f_frsize == disk.f_blocks * disk.f_frsize
    assert fs_stat.f_namemax == 255


def test_identical_chunks_are_stored_once_and_zero_chunks_not_at_all(mounted, store):
    block = os.urandom(CHUNK)
    for name in ("one", "two"):
        with open(os.path.join(mounted.path, name), "wb") as f:
            f.write(block * 16)            # 16 identical chunks per file
    with open(os.path.join(mounted.path, "zeros"), "wb") as f:
        f.write(bytes(64 * CHUNK))
    mounted.umount()
    fsck_out = fsck_clean(store)
    assert "1 chunks" in fsck_out, fsck_out
    packs = os.path.join(store, "packs")
    stored = sum(os.path.getsize(os.path.join(packs, p)) for p in os.listdir(packs))
    assert stored < 2 * CHUNK, f"expected one stored chunk, packs hold {stored} bytes"
    mounted.mount()
    with open(os.path.join(mounted.path, "zeros"), "rb") as f:
        assert f.read() == bytes(64 * CHUNK)


def test_open_with_o_trunc_replaces_the_contents_across_remount(mounted, store):
    """FUSE hands O_TRUNC to open(); ignoring it brought the old size back after a remount."""
    path = os.path.join(mounted.path, "postgresql.conf")
    with open(path, "wb") as f:
        f.write(b"x" * 30_000)
    with open(path, "wb") as f:
        f.write(b"y" * 100)
    assert os.stat(path).st_size == 100
    mounted.umount()
    mounted.mount()
    with open(path, "rb") as f:
        assert f.read() == b"y" * 100


def test_names_looked_up_before_they_exist_appear_when_created(mounted):
    """The kernel caches "no such name" answers (negative entries); creating,
    renaming, linking or unlinking through the mount must replace them."""
    root = mounted.path
    names = {kind: os.path.join(root, kind) for kind in ("file", "dir", "link", "hard", "moved")}
    for path in names.values():
        assert not os.path.exists(path)              # now cached as absent
    with open(names["file"], "w") as f:
        f.write("x")
    os.mkdir(names["dir"])
    os.symlink("file", names["link"])
    os.link(names["file"], names["hard"])
    assert os.path.isfile(names["file"]) and os.path.isdir(names["dir"])
    assert os.readlink(names["link"]) == "file" and os.stat(names["hard"]).st_nlink == 2
    os.rename(names["hard"], names["moved"])
    assert not os.path.exists(names["hard"]) and os.path.isfile(names["moved"])
    os.unlink(names["moved"])
    assert not os.path.exists(names["moved"])
    os.mkdir(names["moved"])                          # absent again, then a directory
    assert os.path.isdir(names["moved"])
    mounted.umount()
    mounted.mount()
    assert sorted(os.listdir(root)) == ["dir", "file", "link", "moved"]
