"""interop/staging.py: a directory written whole or not at all, on disk before it appears, readable
like any directory its user makes."""

import os
import stat
from pathlib import Path

import pytest

from interop import InteropError, staging


def write_some(directory: Path) -> None:
    (directory / "a.json").write_text("{}")
    (directory / "sub").mkdir()
    (directory / "sub" / "b.bin").write_bytes(b"\0" * 10)


def test_the_directory_appears_with_the_users_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with staging.staged(tmp_path / "out") as tmp:
            write_some(tmp)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # not mkdtemp's 0o700
    assert (tmp_path / "out" / "sub" / "b.bin").stat().st_size == 10


def test_an_empty_directory_is_filled_and_a_full_one_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with staging.staged(tmp_path / "out") as tmp:
        write_some(tmp)
    assert (tmp_path / "out" / "a.json").is_file()
    with pytest.raises(InteropError, match="exists and is not empty: choose a new directory"):
        with staging.staged(tmp_path / "out"):
            pass


@pytest.mark.parametrize("where", ["the target", "its parent"])
def test_a_file_in_the_way_is_one_line_and_left_alone(tmp_path, where):
    blocker = tmp_path / "out"
    blocker.write_text("mine")
    target = blocker if where == "the target" else blocker / "run"
    with pytest.raises(InteropError, match=f"{blocker} is a file, not a directory") as error:
        with staging.staged(target):
            pytest.fail("nothing may be staged")
    assert "\n" not in str(error.value)
    assert blocker.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failure_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with staging.staged(tmp_path / "out") as tmp:
            write_some(tmp)
            raise KeyError("the writer failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd (Linux)")
def test_every_file_and_folder_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, rename = os.fsync, os.rename

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_rename(src, dst):
        events.append(("rename", str(src)))
        rename(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    with staging.staged(tmp_path / "out") as tmp:
        write_some(tmp)
    (at,) = [i for i, event in enumerate(events) if event == ("rename", str(tmp))]
    synced_before = {path for _, path in events[:at]}
    written = {tmp, tmp / "a.json", tmp / "sub", tmp / "sub" / "b.bin"}
    assert {str(p) for p in written} <= synced_before
    assert ("fsync", str(tmp_path)) in events[at:]  # and the rename itself
