"""A run's config on disk: written once when the run starts, checked on every resume.

`config.json` keeps the config the run started with. A resume may change fields that neither define
what a checkpoint holds nor the batches the restored data iterator goes on with (e.g.
`num_train_steps`, `eval_every`, `learning_rate`); each resume and the fields it changed are recorded
in `resumes.jsonl`. Changing a field of `IDENTITY_FIELDS` or `DATA_PLAN_FIELDS` is refused.
"""

import contextlib
import datetime
import json
import sys
from pathlib import Path

import jax
import ml_collections
from absl import flags

from configs import default
from experiment import RunError

CONFIG_FILE = "config.json"
RESUMES_FILE = "resumes.jsonl"
DATA_PLAN_FILE = "data_plan.json"
SRC_TOKENIZER = "tokenizer/src"
TGT_TOKENIZER = "tokenizer/tgt"

# What a checkpoint contains: the model and the vocabulary it reads.
IDENTITY_FIELDS = (
    "model",
    "model_hparams",
    "param_dtype",
    "dataset",
    "tokenizer",
    "vocab_size",
    "shared_vocab",
)
# What defines the sequence of training batches: the restored iterator position means the same
# batches only under the same values (the order derives from `seed`, the batch shapes from the rest).
DATA_PLAN_FIELDS = (
    "seed",
    "batch_size",
    "tokens_per_batch",
    "max_len",
    "num_buckets",
    "sp_model_type",
)

# The decoding settings that stood at the top level of a config before `config.decoding`.
LEGACY_DECODING_FIELDS = (
    "decode",
    "beam_size",
    "alpha",
    "length_penalty",
    "max_decode_len",
    "max_decode_len_a",
    "max_decode_len_b",
)


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def load_config(workdir: Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / CONFIG_FILE
    if not Path(workdir).is_dir():
        raise RunError(
            f"no run at {workdir}: train one first with `python train.py --workdir {workdir}`"
        )
    if not path.is_file():
        raise RunError(
            f"{path} is missing: {workdir} is not a seqzoo run directory (train.py writes it)"
        )
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RunError(
            f"{path} is not UTF-8 text (byte {e.start}); restore it or retrain"
        ) from None
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is not valid JSON ({e}); restore it or retrain") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("decoding", {}), dict):
        raise RunError(f"{path} is not a config (a JSON object of fields); restore it or retrain")
    # A run written before a field existed gets the field's default (what the code used then), and
    # one written before `config.decoding` its decoding settings moved there from the top level.
    defaults = json.loads(default.get_config().to_json_best_effort())
    legacy = {k: saved.pop(k) for k in LEGACY_DECODING_FIELDS if k in saved}
    saved["decoding"] = {**defaults["decoding"], **legacy, **saved.get("decoding", {})}
    return ml_collections.ConfigDict({**defaults, **saved})


def _plain(value):
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def changed_fields(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict) -> dict:
    """`{field: {"was": saved value, "now": new value}}` for every top-level field that differs
    (compared as JSON, as config.json stores them)."""
    new = json.loads(config.to_json_best_effort())
    old = json.loads(saved.to_json_best_effort())
    return {
        k: {"was": old.get(k), "now": new.get(k)}
        for k in sorted(set(new) | set(old))
        if new.get(k) != old.get(k)
    }


def check_resumable(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict, workdir):
    """Raises a one-line RunError if `config` changes a field that a resume of `saved` must keep."""
    for field in IDENTITY_FIELDS:
        new, old = _plain(config.get(field)), _plain(saved.get(field))
        if new != old:
            raise RunError(
                f"{workdir} holds a run with {field}={old!r}, not {new!r}: "
                "use another --workdir or the run's own config"
            )
    for field in DATA_PLAN_FIELDS:
        new, old = _plain(config.get(field)), _plain(saved.get(field))
        if new != old:
            raise RunError(
                f"{workdir} was trained with {field}={old!r}: resuming with {field}={new!r} would "
                f"change the batches under the restored data position; resume with "
                f"--config.{field}={old!r}, or train anew in another --workdir"
            )


def check_data_plan(workdir: Path, batch_shapes: list) -> None:
    """Writes the training batch shapes at the first start (`data_plan.json`); on a resume, raises a
    one-line RunError if they differ (e.g. token-based batches rounded to another device count),
    since the restored iterator position would then walk other batches."""
    path = Path(workdir) / DATA_PLAN_FILE
    shapes = [list(map(int, shape)) for shape in batch_shapes]
    if not path.is_file():
        if jax.process_index() == 0:
            path.write_text(json.dumps({"batch_shapes": shapes}) + "\n")
        return
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))["batch_shapes"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        saved = None
    if not (isinstance(saved, list) and all(isinstance(s, list) for s in saved)):
        raise RunError(
            f'{path} is damaged (not {{"batch_shapes": [[batch, src_len, tgt_len], ...]}}): '
            "restore it from a copy, or delete it to resume without checking the batch shapes"
        )
    if saved != shapes:
        raise RunError(
            f"{workdir} was trained on batches of shapes {saved}, this resume would make {shapes} "
            "(with tokens_per_batch, batch sizes are rounded to the device count): resume on the "
            "device count that trained it, or train anew in another --workdir"
        )


def record_resume(config, saved, workdir: Path, step: int) -> None:
    """Appends `{"step", "time", "changed"}` to `resumes.jsonl` (config.json stays as it was)."""
    record = {
        "step": step,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "changed": changed_fields(config, saved),
    }
    with open(Path(workdir) / RESUMES_FILE, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


@contextlib.contextmanager
def flag_errors():
    """Turns a bad flag value, a config file that is not there, or an override `--config.<field>` of a
    field the config does not have into a one-line error (exit status 1), where absl and
    ml_collections would print a traceback or a FATAL banner. Wrap `DEFINE_config_file` in it (it
    reads the overrides of its default file at once); `parse_flags` wraps the parsing."""
    try:
        yield
    except flags.Error as e:
        sys.exit(f"error: {e} (see --helpshort)")
    except OSError as e:
        cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        path = flags.FLAGS["config"].config_filename
        sys.exit(f"error: config file {path} did not load ({cause}): pass one of configs/*.py")
    except (AttributeError, KeyError) as e:
        sys.exit(
            f"error: the config has no field {str(e).strip(chr(34))}: a --config.<field>=value "
            "override must name one of the config file's fields"
        )


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run`'s flags parser, with `flag_errors`."""
    with flag_errors():
        argv = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            flags.FLAGS.config.keys()  # a config file that failed to load raises only when used
        return argv
