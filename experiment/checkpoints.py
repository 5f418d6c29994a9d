"""Checkpoints with integrity records: save, verify, resume (falling back past damage), averaging.

Orbax writes each checkpoint (`checkpoints/<step>/`, `best/<step>/`); once it is complete,
`write_integrity` records the size and SHA-256 of every file in it (`integrity.json`). Every restore
verifies them first (`verify`), so damaged bytes are never loaded:
- a resume (`restore_train_state`) falls back to the newest intact periodic checkpoint, moving each
  damaged one aside to `<step>.damaged` with a notice (nothing is deleted);
- eval (`restore_params`, best or averaged) refuses with a one-line error that names the checkpoint.
A checkpoint that is intact but does not restore was written by another config: that is said apart.
Checkpoints without a record (written before records existed) load unverified, with a notice.
"""

import hashlib
import json
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from experiment import RunError
from experiment.config import CONFIG_FILE

INTEGRITY_FILE = "integrity.json"
DAMAGED_SUFFIX = ".damaged"


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr)


# -------------------------------------------------------------------------------------- integrity


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != INTEGRITY_FILE)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_integrity(step_dir: Path) -> None:
    """Records `{"files": {relative path: {"size", "sha256"}}}` of a finished checkpoint."""
    step_dir = Path(step_dir)
    files = {
        str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(step_dir)
    }
    tmp = step_dir / (INTEGRITY_FILE + ".tmp")
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True) + "\n")
    tmp.replace(step_dir / INTEGRITY_FILE)


def verify(step_dir: Path) -> str | None:
    """None if every file of the checkpoint matches its integrity record (or it has none, said in a
    notice); else what is wrong, e.g. "state/d/1f2e...: SHA-256 differs from its record"."""
    step_dir = Path(step_dir)
    record_path = step_dir / INTEGRITY_FILE
    if not record_path.is_file():
        notice(f"checkpoint {step_dir} has no integrity record: loading it unverified")
        return None
    try:
        recorded = json.loads(record_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"its integrity record {INTEGRITY_FILE} is unreadable"
    present = {str(p.relative_to(step_dir)) for p in _files(step_dir)}
    for name, expected in sorted(recorded.items()):
        path = step_dir / name
        if name not in present:
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, not the recorded {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name}: SHA-256 differs from its record"
    extra = sorted(present - set(recorded))
    if extra:
        return f"{extra[0]} is not in its integrity record"
    return None


def save(manager: ocp.CheckpointManager, step: int, args, metrics=None) -> None:
    """Saves, waits for orbax to finish, and writes the checkpoint's integrity record (process 0).

    Synchronous on purpose: the record must describe finished files. A save orbax skips (a step it
    already holds) or drops at once (`best/` keeps only the best: a worse one is deleted) gets none.
    """
    saved = manager.save(step, args=args, metrics=metrics)
    manager.wait_until_finished()
    step_dir = Path(manager.directory) / str(step)
    if saved and jax.process_index() == 0 and step_dir.is_dir():
        write_integrity(step_dir)


# -------------------------------------------------------------------------------------- managers


def checkpoint_manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
    """Periodic checkpoints: train state + data-iterator state, the `keep` latest kept."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def best_manager(workdir: Path, metric: str) -> ocp.CheckpointManager:
    """The params with the best validation `metric` (higher is better)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda m: m[metric], best_mode="max", create=True
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / "best", options=options)


def reader(directory: Path) -> ocp.CheckpointManager:
    """A manager that only reads the checkpoints in `directory` (it deletes none)."""
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=ocp.CheckpointManagerOptions(create=False)
    )


def periodic_steps(workdir: Path) -> list[int]:
    """The steps of the run's periodic checkpoints (`checkpoints/<step>`), oldest first."""
    return _steps(Path(workdir) / "checkpoints")


def _steps(directory: Path) -> list[int]:
    """The step numbers of the checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _set_aside(step_dir: Path, problem: str) -> None:
    target = step_dir.with_name(step_dir.name + DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = step_dir.with_name(f"{step_dir.name}{DAMAGED_SUFFIX}{n}")
    if jax.process_index() == 0:
        step_dir.rename(target)
    notice(f"checkpoint {step_dir} is damaged ({problem}): moved to {target.name}, not loaded")


def newest_intact_step(workdir: Path) -> int | None:
    """The newest periodic checkpoint whose files match their record; damaged newer ones are moved
    aside (`<step>.damaged`) with a notice. None if the run has no checkpoint yet.

    Process 0 verifies and moves; the others get its answer (one broadcast), so every host resumes
    from the same step.

    Raises:
      RunError: no checkpoint is intact but damaged ones were set aside (now or earlier): a resume
        would otherwise start over silently.
    """
    directory = Path(workdir).absolute() / "checkpoints"
    found = -1
    if jax.process_index() == 0:
        for step in reversed(_steps(directory)):
            problem = verify(directory / str(step))
            if problem is None:
                found = step
                break
            _set_aside(directory / str(step), problem)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        found = int(multihost_utils.broadcast_one_to_all(np.int32(found)))
    if found >= 0:
        return found
    if directory.is_dir() and any(directory.glob(f"*{DAMAGED_SUFFIX}*")):
        raise RunError(
            f"no intact checkpoint in {directory}: the damaged ones are set aside as "
            f"<step>{DAMAGED_SUFFIX}; restore them from a copy, or train anew in another --workdir"
        )
    return None


def _incompatible(where: Path, workdir: Path, e: Exception) -> RunError:
    detail = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'}"
    if not (where / INTEGRITY_FILE).is_file():
        return RunError(
            f"checkpoint {where} (no integrity record: unverified) does not restore ({detail}): it "
            f"is damaged or from another config; use the run's own config "
            f"({Path(workdir) / CONFIG_FILE}), an older checkpoint, or another --workdir"
        )
    return RunError(
        f"checkpoint {where} is intact but does not match this config ({detail}): use the run's "
        f"own config ({Path(workdir) / CONFIG_FILE}) or another --workdir"
    )


def restore_train_state(manager, step: int, state_template, train_iter, workdir: Path):
    """The train state of checkpoint `step` read into `state_template`'s shardings (whatever device
    count wrote it), and `train_iter` set to its saved position. Verify the step first."""
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state_template),
                data=grain.checkpoint.CheckpointRestore(train_iter),
            ),
        )
    except Exception as e:  # noqa: BLE001 — intact files that do not restore: another config
        raise _incompatible(Path(manager.directory) / str(step), workdir, e) from None
    return restored["state"]


# -------------------------------------------------------------------------------- params for eval


def _check_intact(step_dir: Path, fix: str) -> None:
    problem = verify(step_dir)
    if problem is not None:
        raise RunError(f"checkpoint {step_dir} is damaged ({problem}): {fix}")


def restore_params(workdir: Path, params_template, average_last: int = 0):
    """Params of the best checkpoint, else the latest periodic one, else the imported ones
    (`pretrained/0`, experiment/pretrained.py); `(params, step, which)`.

    `best/` holds one checkpoint (the best so far), so its latest step is the best step.
    `params_template` is a tree of `jax.ShapeDtypeStruct`s with shardings (`sharding.abstract`): the
    params are read straight into those shardings, whatever device count wrote the checkpoint.
    `average_last` > 0: instead the mean of the last that many periodic checkpoints (checkpoint
    averaging); `which` is then e.g. "average of checkpoints 1200-2000 (5)". Each checkpoint read is
    verified against its integrity record first.
    """
    workdir = Path(workdir)
    if average_last > 0:
        return _average_params(workdir, params_template, average_last)
    for which in ("best", "checkpoints", "pretrained"):
        directory = workdir.absolute() / which
        steps = _steps(directory)
        if not steps:
            continue
        step_dir = directory / str(steps[-1])
        fix = (
            "retrain, or move it aside to evaluate the latest periodic checkpoint"
            if which == "best"
            else "move it aside to evaluate an older one, or retrain"
        )
        _check_intact(step_dir, fix)
        with reader(directory) as manager:
            try:
                params = _restore_params(manager, steps[-1], which, params_template)
            except Exception as e:  # noqa: BLE001 — intact files that do not restore
                raise _incompatible(step_dir, workdir, e) from None
        return params, steps[-1], which
    raise RunError(
        f"no checkpoint in {workdir}: train first with `python train.py --workdir {workdir}`"
    )


def _average_params(workdir: Path, params_template, count: int):
    directory = workdir.absolute() / "checkpoints"
    steps = _steps(directory)[-count:]
    if len(steps) < count:
        raise RunError(
            f"cannot average {count} checkpoints: {directory} holds {len(steps)}; average at most "
            "that many, or keep more when training (--config.keep_checkpoints)"
        )
    for step in steps:
        _check_intact(directory / str(step), "move it aside and average the others, or retrain")
    total = None
    with reader(directory) as m:
        for step in steps:
            try:
                params = _restore_params(m, step, "checkpoints", params_template)
            except Exception as e:  # noqa: BLE001 — intact files that do not restore
                raise _incompatible(directory / str(step), workdir, e) from None
            total = params if total is None else jax.tree.map(jnp.add, total, params)
    mean = jax.tree.map(lambda x: x / count, total)
    return mean, steps[-1], f"average of checkpoints {steps[0]}-{steps[-1]} ({count})"


def _restore_params(manager: ocp.CheckpointManager, step: int, which: str, params_template):
    if which in ("best", "pretrained"):  # params alone (pretrained: an imported model's)
        return manager.restore(step, args=ocp.args.StandardRestore(params_template))
    item = {"params": params_template}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    )
    return manager.restore(step, args=args)["state"]["params"]
