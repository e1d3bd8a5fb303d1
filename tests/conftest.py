import os
import subprocess

import pytest

from helpers import REPO, Mount, cowfs, fsck_clean, make_workdir, remove_workdir


@pytest.fixture
def workdir():
    path = make_workdir()
    yield path
    remove_workdir(path)


@pytest.fixture
def store(workdir):
    path = os.path.join(workdir, "store")
    cowfs("init", path)
    return path


@pytest.fixture
def mounted(store, workdir):
    """The volume 'main' mounted; unmounted and fsck-checked afterwards."""
    mount = Mount(store, os.path.join(workdir, "mnt")).mount()
    try:
        yield mount
    finally:
        mount.close()
    fsck_clean(store)


def pg_bin_dir(major: str) -> str:
    """Server binaries fetched by tools/setup.sh; a missing one is a setup error, not a skip."""
    result = subprocess.run(["bash", os.path.join(REPO, "tools", "pgbin"), major],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"PostgreSQL {major} binaries are missing: {result.stderr.strip()} "
                    "(run tools/setup.sh)")
    return result.stdout.strip()


@pytest.fixture(scope="session")
def pg14_bin():
    return pg_bin_dir("14")


@pytest.fixture(scope="session")
def pg16_bin():
    return pg_bin_dir("16")


@pytest.fixture(scope="session")
def pg15_bin():
    return pg_bin_dir("15")


@pytest.fixture(scope="session")
def pg17_bin():
    return pg_bin_dir("17")


@pytest.fixture(scope="session")
def pg18_bin():
    return pg_bin_dir("18")
