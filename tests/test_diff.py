"""cowfs diff on real mounts: exactly the scripted changes, both directions, live head, cost."""

import json
import os

from cowfs import errors
from helpers import Mount, cowfs


def write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def diff(store, a, b) -> dict:
    return json.loads(cowfs("diff", store, a, b, "--json").stdout)


def summary(report: dict) -> set:
    return {(c["change"], c["path"], c.get("new_path")) for c in report["changes"]}


def script_before(root: str) -> None:
    write(f"{root}/d1/d2/f", b"hello\n")
    write(f"{root}/keep", b"a\n")
    write(f"{root}/big", os.urandom(100_000))
    os.symlink("keep", f"{root}/lnk")
    write(f"{root}/gone", b"x")
    write(f"{root}/old", b"r")
    write(f"{root}/olddir/inner", b"q")
    write(f"{root}/typ", b"t")
    write(f"{root}/same", b"s")
    write(f"{root}/conf", b"v1")


def script_changes(root: str) -> None:
    with open(f"{root}/d1/d2/f", "ab") as f:
        f.write(b"more\n")
    with open(f"{root}/big", "r+b") as f:      # 10 bytes inside the 7th chunk (49152..57343)
        f.seek(50_000)
        f.write(b"0123456789")
    os.unlink(f"{root}/gone")
    os.rename(f"{root}/old", f"{root}/new")
    os.rename(f"{root}/olddir", f"{root}/newdir")
    os.chmod(f"{root}/keep", 0o600)
    write(f"{root}/added", b"n")
    os.unlink(f"{root}/typ")
    os.mkdir(f"{root}/typ")
    os.link(f"{root}/keep", f"{root}/keeplink")
    os.unlink(f"{root}/lnk")
    os.symlink("new", f"{root}/lnk")
    write(f"{root}/conf.tmp", b"v2")            # atomic replace, as editors and PostgreSQL do
    os.rename(f"{root}/conf.tmp", f"{root}/conf")
    write(f"{root}/tmp-and-gone", b"never seen by a snapshot")
    os.unlink(f"{root}/tmp-and-gone")
    with open(f"{root}/same", "wb") as f:       # rewritten with the same bytes: only mtime
        f.write(b"s")


EXPECTED = {
    ("added", "/added", None),
    ("modified", "/big", None),
    ("modified", "/d1/d2/f", None),
    ("removed", "/gone", None),
    ("modified", "/keep", None),
    ("added", "/keeplink", None),
    ("renamed", "/old", "/new"),
    ("renamed", "/olddir", "/newdir"),
    ("type", "/typ", None),
    ("modified", "/lnk", None),
    ("modified", "/conf", None),
    ("modified", "/same", None),
}


def test_diff_lists_exactly_the_scripted_changes(store, mounted):
    script_before(mounted.path)
    cowfs("snapshot", store, "main@a")
    script_changes(mounted.path)
    # The live head, unsynced: the daemon is asked to flush first.
    live = diff(store, "main@a", "main")
    cowfs("snapshot", store, "main@b")
    report = diff(store, "main@a", "main@b")
    assert summary(report) == EXPECTED == summary(live)
    by_path = {c["path"]: c for c in report["changes"]}
    assert by_path["/big"]["ranges"] == [[49152, 57344]]
    assert by_path["/d1/d2/f"]["size"] == [6, 11] and by_path["/d1/d2/f"]["ranges"] == [[0, 11]]
    assert by_path["/keep"]["mode"] == [0o644, 0o600]
    assert by_path["/typ"]["from_type"] == "file" and by_path["/typ"]["type"] == "dir"
    assert by_path["/lnk"]["type"] == "symlink" and by_path["/old"]["type"] == "file"
    assert by_path["/same"]["details"] == ["mtime"] and "ranges" not in by_path["/same"]
    assert report["counts"] == {"added": 2, "modified": 6, "removed": 1, "renamed": 2, "type": 1}
    # Backwards: what was added is removed, renames go the other way.
    back = summary(diff(store, "main@b", "main@a"))
    assert ("removed", "/added", None) in back and ("renamed", "/new", "/old") in back
    assert ("added", "/gone", None) in back and len(back) == len(EXPECTED)
    assert diff(store, "main@b", "main@b")["changes"] == []
    text = cowfs("diff", store, "main@a", "main@b")
    assert "R file      /old -> /new" in text.stdout and "+ file      /added" in text.stdout
    assert "M file      /big   (bytes 49152-57343)" in text.stdout


def test_diff_names_files_changed_in_place_after_later_renames(store, mounted):
    for d in range(5):
        for f in range(20):
            write(f"{mounted.path}/base/{d}/{f}", os.urandom(9000))
    cowfs("snapshot", store, "main@a")
    first = diff(store, "main@a", "main")      # builds the path index once
    assert first["changes"] == [] and first["stats"]["index_built"] > 100
    with open(f"{mounted.path}/base/3/7", "r+b") as f:
        f.write(b"page")
    os.chmod(f"{mounted.path}/base/1/1", 0o600)
    cowfs("snapshot", store, "main@b")
    os.rename(f"{mounted.path}/base/3", f"{mounted.path}/base/moved")   # after b
    report = diff(store, "main@a", "main@b")
    assert summary(report) == {("modified", "/base/3/7", None), ("modified", "/base/1/1", None)}
    assert report["stats"]["full_scans"] == 0, "paths come from the index, not a scan"
    # A handful of records changed, whatever the volume holds.
    assert report["stats"]["changed_records"] <= 4
    assert summary(diff(store, "main@b", "main")) == {("renamed", "/base/3", "/base/moved")}


def test_diff_refuses_bad_input(store, mounted):
    cowfs("snapshot", store, "main@a")
    cowfs("clone", store, "main@a", "c1")
    cases = [
        (("diff", store, "main@a", "c1"), errors.EXIT_USAGE, "one volume"),
        (("diff", store, "main@a", "main@nope"), errors.EXIT_NOT_FOUND, "no snapshot"),
        (("diff", store, "nope@a", "main"), errors.EXIT_NOT_FOUND, "no volume named"),
        (("diff", store, "main@a"), errors.EXIT_USAGE, "required"),
        (("diff", store, "main@bad/name", "main"), errors.EXIT_USAGE, "invalid snapshot name"),
    ]
    for args, code, text in cases:
        result = cowfs(*args, check=False)
        assert result.returncode == code, (args, result.stderr)
        assert result.stderr.startswith("cowfs: ") and result.stderr.count("\n") == 1, result.stderr
        assert text in result.stderr, (args, result.stderr)


def test_diff_of_a_clone_against_its_own_snapshot(store, mounted, workdir):
    write(f"{mounted.path}/inherited", b"from main")
    cowfs("snapshot", store, "main@a")
    cowfs("clone", store, "main@a", "c1")
    clone = Mount(store, os.path.join(workdir, "c1"), "c1").mount()
    try:
        cowfs("snapshot", store, "c1@start")
        write(f"{clone.path}/inherited", b"changed in the clone")
        write(f"{clone.path}/new", b"n")
        report = diff(store, "c1@start", "c1")
    finally:
        clone.close()
    assert summary(report) == {("modified", "/inherited", None), ("added", "/new", None)}
