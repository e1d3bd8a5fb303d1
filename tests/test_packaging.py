"""The package as a user installs it: sdist and wheel hold every module, and a
fresh virtualenv with only the built wheel runs a command of every command group.

The editable install of the other tests cannot show a module missing from
the wheel (it imports from the checkout); this test can.
"""

import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

from helpers import REPO, make_workdir, remove_workdir

pytestmark = pytest.mark.slow


def _package_modules() -> set:
    """Every .py file of the package in the checkout, relative to the repo root."""
    found = set()
    for dirpath, _dirs, files in os.walk(os.path.join(REPO, "cowfs")):
        for name in files:
            if name.endswith(".py"):
                found.add(os.path.relpath(os.path.join(dirpath, name), REPO))
    return found


@pytest.fixture(scope="module")
def installed():
    """(venv bin dir, dist dir, work dir): sdist + wheel built, wheel installed in a new venv."""
    work = make_workdir("cowfs-pkg-")
    try:
        dist = os.path.join(work, "dist")
        # `build` makes the sdist, then the wheel *from the sdist*: a file the
        # sdist lacks is missing from the wheel too.
        subprocess.run([sys.executable, "-m", "build", "--outdir", dist, REPO], check=True,
                       capture_output=True, text=True, timeout=600)
        venv = os.path.join(work, "venv")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
        wheel = next(os.path.join(dist, n) for n in os.listdir(dist) if n.endswith(".whl"))
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
                        wheel], check=True, capture_output=True, text=True, timeout=600)
        yield os.path.join(venv, "bin"), dist, work
    finally:
        remove_workdir(work)


def test_wheel_and_sdist_hold_every_module(installed):
    _bin, dist, _work = installed
    wanted = _package_modules()
    assert "cowfs/pg/workspace.py" in wanted
    wheel = next(os.path.join(dist, n) for n in os.listdir(dist) if n.endswith(".whl"))
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = {n for n in zf.namelist() if n.endswith(".py")}
    sdist = next(os.path.join(dist, n) for n in os.listdir(dist) if n.endswith(".tar.gz"))
    with tarfile.open(sdist) as tf:
        in_sdist = {n.split("/", 1)[1] for n in tf.getnames() if n.endswith(".py") and "/cowfs/" in n}
    assert wanted - in_wheel == set(), "modules missing from the wheel"
    assert wanted - in_sdist == set(), "modules missing from the sdist"


def test_one_version(installed):
    bin_dir, _dist, _work = installed
    sys.path.insert(0, REPO)
    from cowfs import __version__
    out = subprocess.run([os.path.join(bin_dir, "cowfs"), "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith(f"cowfs {__version__} ")
    dist_info = subprocess.run([os.path.join(bin_dir, "python"), "-c",
                                "import importlib.metadata as m; print(m.version('cowfs'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert dist_info == __version__


def test_every_command_group_runs_from_the_wheel(installed):
    """Outside the checkout (cwd elsewhere, no editable install): one command per group."""
    bin_dir, _dist, work = installed
    exe = os.path.join(bin_dir, "cowfs")
    store, mnt = os.path.join(work, "store"), os.path.join(work, "mnt")
    os.mkdir(mnt)

    def run(*args, expect=0):
        result = subprocess.run([exe, *args], capture_output=True, text=True, cwd=work, timeout=120,
                                env={"PATH": os.environ["PATH"]})
        assert result.returncode == expect and "Traceback" not in result.stderr, \
            (args, result.returncode, result.stdout, result.stderr)
        return result

    run("init", store)
    run("mount", store, mnt)
    try:
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"x" * 100_000)
        run("snapshot", store, "main@s1")                    # through the daemon
        assert "main@s1" in run("list", store).stdout
        assert "mounted" in run("status", store).stdout      # operations group
        assert "cowfs_volume_up" in run("metrics", store).stdout
    finally:
        subprocess.run([exe, "umount", mnt], capture_output=True, timeout=120)
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    run("policy", store, "main", "--every", "1h", "--keep", "3")   # lifecycle group
    run("scrub", store)
    run("fsck", store)
    run("service", "install", store, "main", mnt, "--unit-dir", os.path.join(work, "units"))
    # The pg group imports cowfs.pg (missing from the wheel before): it gets
    # as far as checking the bin directory.
    result = run("pg", "bisect", store, "main", "--pgdata", "pgdata", "--bin", "/nonexistent",
                 "--check", "select 1", expect=1)
    assert "holds no PostgreSQL server programs" in result.stderr
