"""Faults during training: kill -9 at random points of checkpoint saves, a full disk during a save.

The kill loop drives `experiment.checkpoints` in child processes forked from a server that has
imported jax and orbax once (a fresh interpreter per kill would spend seconds importing): each child
resumes from the newest intact checkpoint, "trains" a small params tree (a deterministic float32
update per step), saves every step, and is killed with SIGKILL at a point of a save (each kind of
point in turn; the step, the delays and the moments from a seeded RNG). One end-to-end kill of the
real tiny training config shows the same for `train.py`'s loop, bit for bit.
"""

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_run_config

from experiment import checkpoints

REPO = Path(__file__).resolve().parents[1]
STEPS = 40  # the kill loop's run: a save every step, the last 2 kept
KILLS = 20  # at least
# Where a save is cut short: inside orbax's writes; after orbax, before the record; in the middle of
# writing the record; after the record, before the marker is removed; or at a random moment.
KILL_POINTS = ("orbax", "after_orbax", "record", "after_record", "anywhere")


def initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(32, 16)).astype(np.float32), "b": np.zeros(16, np.float32)}


def train_step(params: dict, step: int) -> dict:
    """A deterministic float32 update (bit-identical wherever it runs)."""
    rate = np.float32(0.01)
    return {
        "w": params["w"] - rate * np.tanh(params["w"] + np.float32(step)),
        "b": params["b"] + rate * np.cos(params["b"] * np.float32(step)),
    }


def digest(params: dict) -> str:
    return hashlib.sha256(
        b"".join(np.asarray(params[k]).tobytes() for k in sorted(params))
    ).hexdigest()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(manager, kill_step: int, point: str, delay: float) -> None:
    """Arms a SIGKILL of this process at `point` of the save of step `kill_step`."""
    if point == "orbax":
        orbax_save = manager.save

        def save_then_die(step, *args, **kwargs):
            saved = orbax_save(step, *args, **kwargs)
            if step == kill_step:
                time.sleep(delay)  # orbax's background writes run meanwhile
                _die()
            return saved

        manager.save = save_then_die
    elif point in ("after_orbax", "after_record"):
        write_integrity = checkpoints.write_integrity

        def write_then_die(step_dir):
            if point == "after_record":
                write_integrity(step_dir)
            if Path(step_dir).name == str(kill_step):
                _die()
            if point == "after_orbax":
                write_integrity(step_dir)

        checkpoints.write_integrity = write_then_die
    elif point == "record":
        write_durably = checkpoints._write_durably

        def half_then_die(path, text):
            if path.name == checkpoints.INTEGRITY_FILE and path.parent.name == str(kill_step):
                path.with_name(path.name + ".tmp").write_text(text[: len(text) // 2])
                _die()
            write_durably(path, text)

        checkpoints._write_durably = half_then_die


def train_worker(
    workdir: Path, log: Path, kill_step: int, point: str, delay: float, save_every: int = 1
) -> None:
    """A child of the kill loop: resumes, trains to STEPS saving every `save_every` steps, killed
    as armed. With `point="anywhere"` the parent kills it: it trains to `kill_step + 2` and then
    waits. Writes `resumed <step> <intact> <digest>`, `saved <step>` and `final <digest>` lines to
    `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def say(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    start = checkpoints.newest_intact_step(workdir) or 0
    params = initial_params()
    if start:
        step_dir = workdir / "checkpoints" / str(start)
        with checkpoints.reader(step_dir.parent) as manager:
            restore = ocp.args.Composite(state=ocp.args.StandardRestore(params))
            params = manager.restore(start, args=restore)["state"]
        recorded = (step_dir / checkpoints.INTEGRITY_FILE).is_file()
        say(f"resumed {start} {recorded and checkpoints.verify(step_dir) is None} {digest(params)}")
    else:
        say(f"resumed 0 True {digest(params)}")
    with checkpoints.checkpoint_manager(workdir, keep=2) as manager:
        _kill_at(manager, kill_step, point, delay)
        end = min(kill_step + 2, STEPS) if point == "anywhere" else STEPS
        for step in range(start + 1, end + 1):
            params = train_step(params, step)
            if step % save_every:
                continue
            save = ocp.args.Composite(state=ocp.args.StandardSave(params))
            checkpoints.save(manager, step, save)
            say(f"saved {step}")
    if point == "anywhere":
        time.sleep(600)
    say(f"final {digest(params)}")


@pytest.fixture(scope="module")
def forked():
    """A multiprocessing context whose children fork from a server that imported jax, orbax and
    this module once (a child starts in ~0.1 s)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["experiment.checkpoints", __name__])
    return context


def test_kill_9_at_random_points_of_saves_resumes_intact_and_ends_bit_identical(tmp_path, forked):
    rng = np.random.default_rng(37)
    expected = [initial_params()]
    for step in range(1, STEPS + 1):
        expected.append(train_step(expected[-1], step))
    expected = [digest(params) for params in expected]
    last_saved, points, child = 0, [], 0
    while True:
        log = tmp_path / f"log{child}"
        final = len(points) == KILLS
        point = "none" if final else KILL_POINTS[child % len(KILL_POINTS)]
        kill_step = last_saved + 1 + int(rng.integers(0, 2))
        delay = float(rng.uniform(0, 0.03))
        process = forked.Process(
            target=train_worker,
            args=(tmp_path, log, kill_step, point, delay, STEPS if final else 1),
        )
        process.start()
        if point == "anywhere":  # a moment during its saves
            while process.is_alive() and not (log.exists() and log.read_text()):
                time.sleep(0.01)
            process.join(float(rng.uniform(0, 0.3)))
            process.kill()
        process.join(60)
        lines = [line.split() for line in log.read_text().splitlines()]
        # Every restart resumes from an intact step: the newest one whose save finished (or the
        # one after it, when the kill came after its marker was removed), holding exactly its
        # params.
        [resumed, intact, resumed_digest] = lines[0][1:]
        assert last_saved <= int(resumed) <= last_saved + 1, (child, point, lines[0])
        assert intact == "True" and resumed_digest == expected[int(resumed)], (child, point)
        saved = [int(words[1]) for words in lines if words[0] == "saved"]
        last_saved = max([int(resumed), *saved])
        assert not list((tmp_path / "checkpoints").glob("*.damaged*")), "a kill damaged nothing"
        if final:
            break
        assert process.exitcode == -signal.SIGKILL, (child, point, process.exitcode)
        points.append(point)
        child += 1
    assert process.exitcode == 0 and lines[-1] == ["final", expected[STEPS]]
    assert last_saved == STEPS and set(points) == set(KILL_POINTS)
    for step in checkpoints.periodic_steps(tmp_path):
        assert checkpoints.problem(tmp_path / "checkpoints" / str(step)) is None


def test_train_py_killed_in_a_save_resumes_to_the_uninterrupted_params(
    tiny_run, tmp_path, tfds_data_dir, tokenizer_dir, capsys
):
    """The real tiny config through train.py, killed -9 between orbax's save of step 20 and its
    record; a resume falls back to step 10 and ends with the uninterrupted run's params."""
    from experiment import training

    _, uninterrupted, _ = tiny_run
    workdir = tmp_path / "run"
    script = f"""
import os, runpy, signal, sys
from experiment import checkpoints
write_integrity = checkpoints.write_integrity
def kill_before_the_record(step_dir):
    if step_dir.parent.name == "checkpoints" and step_dir.name == "20":
        os.kill(os.getpid(), signal.SIGKILL)
    write_integrity(step_dir)
checkpoints.write_integrity = kill_before_the_record
sys.argv = ["train.py", "--config", "configs/tiny_dates.py", "--workdir", {str(workdir)!r},
            "--config.data_dir", {str(tfds_data_dir)!r}, "--config.tokenizer_dir", {str(tokenizer_dir)!r}]
runpy.run_path("train.py", run_name="__main__")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (workdir / "checkpoints" / "20.pending").exists()
    final, _ = training.train_and_evaluate(tiny_run_config(tfds_data_dir, tokenizer_dir), workdir)
    assert "checkpoints/20 was not finished (its save did not finish" in capsys.readouterr().err
    assert int(final.step) == 20
    for a, b in zip(
        jax.tree.leaves((final.params, final.opt_state)),
        jax.tree.leaves((uninterrupted.params, uninterrupted.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [
        "10",
        "20",
        "20.unfinished",
    ]
    assert checkpoints.problem(workdir / "checkpoints" / "20") is None


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoints_before(tmp_path):
    """A file size limit (`ulimit -f`, SIGXFSZ ignored: writes fail with EFBIG, as on a full disk)
    that the small checkpoints of steps 1 and 2 fit under and the large one of step 3 does not. The
    script sets it on itself first thing (a preexec_fn would fork this multithreaded process)."""
    script = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
import numpy as np
import orbax.checkpoint as ocp
from experiment import RunError, checkpoints
with checkpoints.checkpoint_manager({str(tmp_path)!r}, keep=2) as manager:
    for step, size in ((1, 64), (2, 64), (3, 200_000)):
        tree = {{"w": np.random.default_rng(step).normal(size=size).astype(np.float32)}}
        try:
            checkpoints.save(manager, step, ocp.args.Composite(state=ocp.args.StandardSave(tree)))
        except RunError as e:
            sys.exit(f"error: {{e}}")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()  # no orbax log, no traceback
    directory = tmp_path.absolute() / "checkpoints"
    assert line.startswith(f"error: cannot save checkpoint 3 in {directory}: File too large (")
    assert "GiB free there): free space on that disk" in line
    assert "the checkpoints saved before are kept" in line
    assert sorted(p.name for p in directory.iterdir() if p.is_dir())[:2] == ["1", "2"]
    for step in (1, 2):
        assert checkpoints.verify(directory / str(step)) is None
    # A resume goes on from step 2 and clears the failed save's marker.
    assert checkpoints.newest_intact_step(tmp_path) == 2
    assert not list(directory.glob("*.pending"))
    with checkpoints.reader(directory) as manager:
        template = {"w": np.zeros(64, np.float32)}
        restored = manager.restore(
            2, args=ocp.args.Composite(state=ocp.args.StandardRestore(template))
        )
    expected = np.random.default_rng(2).normal(size=64).astype(np.float32)
    np.testing.assert_array_equal(restored["state"]["w"], expected)
