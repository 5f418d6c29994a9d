"""experiment/checkpoints.py: integrity records, pending markers, set-asides, a failed save."""

import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiment import RunError, checkpoints


def params_at(step: int) -> dict:
    """A small params tree, different at every step: float32 `w [64]`, `b [3]`."""
    rng = np.random.default_rng(step)
    return {"w": rng.normal(size=64).astype(np.float32), "b": np.full(3, step, np.float32)}


def save_steps(workdir: Path, steps, keep: int = 5) -> None:
    """Periodic checkpoints of `params_at(step)` laid out as training's (`state` item)."""
    with checkpoints.checkpoint_manager(workdir, keep) as manager:
        for step in steps:
            args = ocp.args.Composite(state=ocp.args.StandardSave(params_at(step)))
            checkpoints.save(manager, step, args)


def restore(workdir: Path, step: int) -> dict:
    template = {"state": params_at(0)}
    with checkpoints.reader(workdir / "checkpoints") as manager:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(template["state"]))
        return manager.restore(step, args=args)["state"]


def flip_one_byte(step_dir: Path) -> None:
    """XORs one byte in the middle of the checkpoint's largest file (its array data)."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != "integrity.json"]
    path = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_checkpoint_without_its_record_is_set_aside_not_restored(tmp_path, capsys):
    # The issue's reproduction: steps 1 and 2 saved, step 2's record deleted and a byte flipped.
    save_steps(tmp_path, [1, 2])
    step_2 = tmp_path / "checkpoints" / "2"
    (step_2 / "integrity.json").unlink()
    flip_one_byte(step_2)
    assert checkpoints.verify(step_2) == checkpoints.NO_RECORD
    assert checkpoints.newest_intact_step(tmp_path) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {step_2} is damaged (it has no integrity record, while other" in err
    assert "moved to 2.damaged, not loaded" in err
    assert names(tmp_path / "checkpoints") == ["1", "2.damaged"]
    restored = restore(tmp_path, 1)
    for name, value in params_at(1).items():
        np.testing.assert_array_equal(restored[name], value)


def test_a_checkpoint_whose_save_did_not_finish_is_set_aside(tmp_path, capsys):
    save_steps(tmp_path, [1, 2])
    # A kill after the record, before the marker went: the step is not trusted all the same.
    (tmp_path / "checkpoints" / "2.pending").write_text("")
    assert checkpoints.problem(tmp_path / "checkpoints" / "1") is None
    assert checkpoints.newest_intact_step(tmp_path) == 1
    err = capsys.readouterr().err
    assert "checkpoints/2 was not finished (its save did not finish: 2.pending is still" in err
    assert names(tmp_path / "checkpoints") == ["1", "2.unfinished"]


def test_only_unfinished_saves_start_the_run_anew_damaged_ones_refuse(tmp_path):
    save_steps(tmp_path, [1])
    (tmp_path / "checkpoints" / "1.pending").write_text("")
    (tmp_path / "checkpoints" / "7.pending").write_text("")  # a save that left no checkpoint
    assert checkpoints.newest_intact_step(tmp_path) is None  # nothing lost: train from step 0
    assert names(tmp_path / "checkpoints") == ["1.unfinished"]
    save_steps(tmp_path, [2])
    flip_one_byte(tmp_path / "checkpoints" / "2")
    with pytest.raises(RunError, match=r"no intact checkpoint in .*: the damaged ones are set"):
        checkpoints.newest_intact_step(tmp_path)


def test_a_run_older_than_records_loads_unverified_with_a_notice(tmp_path, capsys):
    save_steps(tmp_path, [1, 2])
    for step in ("1", "2"):
        (tmp_path / "checkpoints" / step / "integrity.json").unlink()
    assert checkpoints.verify(tmp_path / "checkpoints" / "2") == checkpoints.NO_RECORD
    assert checkpoints.newest_intact_step(tmp_path) == 2
    assert "checkpoints/2 has no integrity record (older than records): loading it" in (
        capsys.readouterr().err
    )


def test_save_writes_its_marker_first_and_removes_it_after_the_record(tmp_path, monkeypatch):
    marker = tmp_path / "checkpoints" / "3.pending"
    seen = []
    write_integrity = checkpoints.write_integrity

    def recording(step_dir):
        seen.append(("record", marker.exists()))
        write_integrity(step_dir)

    monkeypatch.setattr(checkpoints, "write_integrity", recording)
    with checkpoints.checkpoint_manager(tmp_path, 2) as manager:
        orbax_save = manager.save

        def watched(*args, **kwargs):
            seen.append(("orbax", marker.exists()))
            return orbax_save(*args, **kwargs)

        monkeypatch.setattr(manager, "save", watched)
        checkpoints.save(manager, 3, ocp.args.Composite(state=ocp.args.StandardSave(params_at(3))))
    assert seen == [("orbax", True), ("record", True)]
    assert names(tmp_path / "checkpoints") == ["3"]
    assert checkpoints.verify(tmp_path / "checkpoints" / "3") is None


RECORDS = {
    "not UTF-8": b"\xff\xfe{}",
    "not JSON": b'{"format": 1, "files": {',
    "a list": b"[1, 2]",
    "no format": b'{"files": {}}',
    "files a list": b'{"format": 1, "files": []}',
    "an entry not an object": b'{"format": 1, "files": {"_CHECKPOINT_METADATA": 7}}',
    "a size that is text": b'{"format": 1, "files": {"_CHECKPOINT_METADATA": {"size": "1", "sha256": "0"}}}',
    "no sha256": b'{"format": 1, "files": {"_CHECKPOINT_METADATA": {"size": 1}}}',
}


@pytest.mark.parametrize("content", RECORDS.values(), ids=RECORDS.keys())
def test_an_unreadable_record_is_a_damaged_checkpoint(tmp_path, capsys, content):
    save_steps(tmp_path, [1, 2])
    step_2 = tmp_path / "checkpoints" / "2"
    (step_2 / "integrity.json").write_bytes(content)
    assert checkpoints.verify(step_2).startswith("its integrity record integrity.json ")
    assert checkpoints.newest_intact_step(tmp_path) == 1
    assert "checkpoints/2 is damaged (its integrity record integrity.json " in (
        capsys.readouterr().err
    )
    with pytest.raises(RunError, match=r"checkpoints/2.damaged is damaged \(its integrity record"):
        checkpoints._check_intact(tmp_path / "checkpoints" / "2.damaged", "a fix")


def test_unfinished_best_checkpoints_are_set_aside_and_eval_refuses_them(tmp_path):
    best = checkpoints.best_manager(tmp_path, "bleu")
    checkpoints.save(best, 4, ocp.args.StandardSave(params_at(4)), metrics={"bleu": 1.0})
    best.close()
    (tmp_path / "best" / "4.pending").write_text("")
    template = params_at(0)
    with pytest.raises(RunError, match=r"best/4 is damaged \(its save did not finish: 4.pend"):
        checkpoints.restore_params(tmp_path, template)
    assert checkpoints.newest_intact_step(tmp_path) is None
    assert names(tmp_path / "best") == ["4.unfinished"]


def test_a_record_is_json_of_every_file_but_itself(tmp_path):
    save_steps(tmp_path, [5])
    step_dir = tmp_path / "checkpoints" / "5"
    record = json.loads((step_dir / "integrity.json").read_text())
    files = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()}
    assert record["format"] == 1 and set(record["files"]) == files - {"integrity.json"}
    assert not list(step_dir.parent.glob("*.tmp")) and not list(step_dir.glob("*.tmp"))
