"""Checkpoints with integrity records: save, verify, resume (falling back past damage), averaging.

Orbax writes each checkpoint (`checkpoints/<step>/`, `best/<step>/`); once it is complete,
`write_integrity` records the size and SHA-256 of every file in it (`integrity.json`). A pending
marker (`<step>.pending`, beside the checkpoint) is written before the save starts and removed after
the record, so a save cut short anywhere (a kill, a preemption, a full disk) leaves it behind.
Every restore checks a checkpoint first (`problem`), so damaged or unfinished bytes are never loaded:
- a resume (`restore_train_state`) falls back to the newest intact periodic checkpoint, moving each
  newer one aside with a notice that says why (nothing is deleted): a damaged one (its files differ
  from the record, the record is unreadable, or it has none while the run's other checkpoints have
  one) to `<step>.damaged`, one whose save did not finish (its marker is there) to
  `<step>.unfinished`;
- eval (`restore_params`, best or averaged) refuses with a one-line error that names the checkpoint.
A checkpoint that is intact but does not restore was written by another config: that is said apart.
"No record" is a status of its own (`verify` returns `NO_RECORD`): such a checkpoint loads
unverified, with a notice, only in a run made before records existed (no checkpoint of it has one).
A save that fails (a full disk) is a one-line `RunError` naming the folder and its free space.
"""

import contextlib
import errno as errno_codes
import hashlib
import json
import logging
import os
import re
import shutil
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
INTEGRITY_FORMAT = 1
PENDING_SUFFIX = ".pending"
DAMAGED_SUFFIX = ".damaged"
UNFINISHED_SUFFIX = ".unfinished"
NO_RECORD = "no integrity record"  # `verify`'s status of a checkpoint without a record


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr)


# -------------------------------------------------------------------------------------- integrity


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != INTEGRITY_FILE)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """`text` in `path`, written to `<path>.tmp`, synced and renamed over it (never half there)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def write_integrity(step_dir: Path) -> None:
    """Records `{"format": 1, "files": {relative path: {"size", "sha256"}}}` of a finished
    checkpoint."""
    step_dir = Path(step_dir)
    files = {
        str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(step_dir)
    }
    record = {"format": INTEGRITY_FORMAT, "files": files}
    _write_durably(step_dir / INTEGRITY_FILE, json.dumps(record, indent=1, sort_keys=True) + "\n")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _read_record(path: Path) -> dict[str, dict] | str:
    """The `files` of an integrity record, or what makes it unreadable."""
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    except json.JSONDecodeError as e:
        return f"is not JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if not isinstance(record, dict) or record.get("format") != INTEGRITY_FORMAT:
        return f'is not a format-{INTEGRITY_FORMAT} record (an object with "format": 1)'
    files = record.get("files")
    entry_ok = lambda e: (  # noqa: E731
        isinstance(e, dict)
        and type(e.get("size")) is int
        and isinstance(e.get("sha256"), str)
        and _SHA256.fullmatch(e["sha256"]) is not None
    )
    if not isinstance(files, dict) or not all(entry_ok(e) for e in files.values()):
        return 'has no "files" object of {path: {"size": bytes, "sha256": hex digest}}'
    return files


def verify(step_dir: Path) -> str | None:
    """The status of a checkpoint against its integrity record: None if every file matches it,
    `NO_RECORD` if it has none (see `problem`), else what is wrong (e.g. "state/d/1f2e...: SHA-256
    differs from its record", or "its integrity record integrity.json is not JSON (...)")."""
    step_dir = Path(step_dir)
    record_path = step_dir / INTEGRITY_FILE
    if not record_path.is_file():
        return NO_RECORD
    recorded = _read_record(record_path)
    if isinstance(recorded, str):
        return f"its integrity record {INTEGRITY_FILE} {recorded}"
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


def _marker(step_dir: Path) -> Path:
    """The pending marker of checkpoint `step_dir`: `<step>.pending` beside it."""
    return step_dir.with_name(step_dir.name + PENDING_SUFFIX)


def _write_marker(step_dir: Path) -> None:
    with open(_marker(step_dir), "w", encoding="utf-8") as f:
        f.write(f"the save of {step_dir.name} started; its integrity record is not written yet\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(step_dir.parent)


def _keeps_records(run_dir: Path) -> bool:
    """Whether the run was made since integrity records exist: one of its checkpoints (set aside or
    not, periodic, best or imported) has a record, or a save of it left a pending marker."""
    return any(run_dir.glob(f"*/*/{INTEGRITY_FILE}")) or any(run_dir.glob(f"*/*{PENDING_SUFFIX}"))


def problem(step_dir: Path) -> str | None:
    """Why checkpoint `step_dir` must not be loaded, or None if it may be: it is intact, or it has
    no record in a run made before records existed (said in a notice). `<dir>/<step>` is a
    checkpoint of the run `<dir>/..`."""
    step_dir = Path(step_dir)
    if _marker(step_dir).exists():
        return f"its save did not finish: {_marker(step_dir).name} is still there"
    status = verify(step_dir)
    if status != NO_RECORD:
        return status
    if _keeps_records(step_dir.parent.parent):
        return "it has no integrity record, while other checkpoints of the run have one"
    notice(
        f"checkpoint {step_dir} has no integrity record (older than records): loading it unverified"
    )
    return None


# ------------------------------------------------------------------------------------------- save


class _HeldErrors(logging.Filter):
    """Holds back orbax's error logs (each with a traceback) during a save: a save that fails is
    one `RunError`; one that succeeds logs them after all."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _orbax_errors_held():
    absl_logger = logging.getLogger("absl")  # orbax logs through absl.logging
    held = _HeldErrors()
    absl_logger.addFilter(held)
    try:
        yield
    finally:
        absl_logger.removeFilter(held)
    for record in held.records:  # reached only when the save succeeded
        absl_logger.handle(record)


def _failed_save(manager, step: int, error: Exception) -> RunError:
    """The one-line error of a save that failed: the folder, the cause, the free space there."""
    directory = Path(manager.directory)
    with contextlib.suppress(Exception):  # stop orbax's background writes (they fail the same)
        manager.close()
    code = re.search(r"os_error_code='?(\d+)", str(error))  # tensorstore's errors name it
    errno = error.errno if isinstance(error, OSError) else int(code.group(1)) if code else None
    if errno is not None:
        cause = os.strerror(errno)
    else:
        cause = (str(error).splitlines() or [type(error).__name__])[0][:200]
    try:
        free = f"{shutil.disk_usage(directory).free / 2**30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    fix = (
        "free space on that disk or point --workdir at a larger one"
        if errno in (errno_codes.ENOSPC, errno_codes.EFBIG, errno_codes.EDQUOT)
        else "make the folder writable, or point --workdir at another disk"
    )
    return RunError(
        f"cannot save checkpoint {step} in {directory}: {cause} ({free}): {fix}, then resume (the "
        "checkpoints saved before are kept)"
    )


def save(manager: ocp.CheckpointManager, step: int, args, metrics=None) -> None:
    """Saves, waits for orbax to finish, and writes the checkpoint's integrity record (process 0),
    between a pending marker written first and removed last.

    Synchronous on purpose: the record must describe finished files. A save orbax skips (a step it
    already holds) or drops at once (`best/` keeps only the best: a worse one is deleted) gets none.

    Raises:
      RunError: the save failed (a full disk, a file size limit): one line naming the folder and
        its free space. `manager` is closed then; the checkpoints saved before stay as they were.
    """
    directory = Path(manager.directory)
    step_dir = directory / str(step)
    is_main = jax.process_index() == 0
    try:
        with _orbax_errors_held():
            if is_main:
                directory.mkdir(parents=True, exist_ok=True)
                _write_marker(step_dir)
            saved = manager.save(step, args=args, metrics=metrics)
            manager.wait_until_finished()
        if is_main:
            if saved and step_dir.is_dir():
                write_integrity(step_dir)
            _marker(step_dir).unlink()
            _fsync_dir(directory)
    except (OSError, ValueError) as e:  # tensorstore's write errors are ValueErrors
        raise _failed_save(manager, step, e) from None


# -------------------------------------------------------------------------------------- managers


def checkpoint_manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
    """Periodic checkpoints: train state + data-iterator state, the `keep` latest kept (orbax's
    temporary folders of an interrupted save are removed when it opens)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def best_manager(workdir: Path, metric: str) -> ocp.CheckpointManager:
    """The params with the best validation `metric` (higher is better)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda m: m[metric],
        best_mode="max",
        create=True,
        cleanup_tmp_directories=True,
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


def _set_aside(step_dir: Path, why: str) -> None:
    """Moves the checkpoint to `<step>.unfinished` (its pending marker is there; the marker goes
    too) or `<step>.damaged` (`<step>.damaged2`, ... if taken), with a notice saying why."""
    unfinished = _marker(step_dir).exists()
    suffix = UNFINISHED_SUFFIX if unfinished else DAMAGED_SUFFIX
    target = step_dir.with_name(step_dir.name + suffix)
    n = 1
    while target.exists():
        n += 1
        target = step_dir.with_name(f"{step_dir.name}{suffix}{n}")
    if jax.process_index() == 0:
        step_dir.rename(target)
        _marker(step_dir).unlink(missing_ok=True)
        _fsync_dir(step_dir.parent)
    what = "was not finished" if unfinished else "is damaged"
    notice(f"checkpoint {step_dir} {what} ({why}): moved to {target.name}, not loaded")


def _tidy(directory: Path) -> None:
    """Process 0: sets aside the checkpoints of `directory` whose save did not finish, and removes
    the pending markers of saves that left no checkpoint."""
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for marker in sorted(directory.glob(f"*{PENDING_SUFFIX}")):
        step_dir = marker.with_name(marker.name.removesuffix(PENDING_SUFFIX))
        if step_dir.is_dir():
            _set_aside(step_dir, f"its save did not finish: {marker.name} is still there")
        else:
            marker.unlink()


def newest_intact_step(workdir: Path) -> int | None:
    """The newest periodic checkpoint that `problem` passes; newer ones are moved aside
    (`<step>.damaged`, `<step>.unfinished`) with a notice. Unfinished saves of `best/` are set aside
    too (the resumed run validates and saves them again). None if the run has no checkpoint yet.

    Process 0 verifies and moves; the others get its answer (one broadcast), so every host resumes
    from the same step.

    Raises:
      RunError: no checkpoint is intact but damaged ones were set aside (now or earlier): a resume
        would otherwise start over silently. (Unfinished saves alone start the run anew.)
    """
    workdir = Path(workdir).absolute()
    directory = workdir / "checkpoints"
    found = -1
    if jax.process_index() == 0:
        _tidy(directory)
        _tidy(workdir / "best")
        for step in reversed(_steps(directory)):
            step_problem = problem(directory / str(step))
            if step_problem is None:
                found = step
                break
            _set_aside(directory / str(step), step_problem)
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
    step_problem = problem(step_dir)
    if step_problem is not None:
        raise RunError(f"checkpoint {step_dir} is damaged ({step_problem}): {fix}")


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
