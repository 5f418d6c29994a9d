"""What train.py and eval.py share: a run's config, model, optimizer, loss, decoders, metrics, checkpoints.

A run lives in a workdir:
  config.json          the full config (train.py writes it; eval.py and resumes read it)
  tokenizer/{src,tgt}/ the run's tokenizers
  checkpoints/<step>/  periodic checkpoints (params, optimizer state, step, data-iterator state)
  best/<step>/         the params with the best validation metric
  metrics.jsonl        one JSON object per line: {"step", "split", metric: value, ...}
  learning_curves.png
"""

import contextlib
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import sacrebleu
from absl import flags
from jax.sharding import Mesh

import decoding
import sharding
from data import tokenizers
from models import registry

CONFIG_FILE = "config.json"
SRC_TOKENIZER = "tokenizer/src"
TGT_TOKENIZER = "tokenizer/tgt"
METRICS_FILE = "metrics.jsonl"


class RunError(Exception):
    """A problem with a run's workdir, config or checkpoint; its message is one line saying the fix."""


# ----------------------------------------------------------------------------------------- config


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
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is not valid JSON ({e}); restore it or retrain") from None


# The fields that define what a checkpoint contains: a resumed run must agree on them.
_IDENTITY_FIELDS = ("model", "model_hparams", "dataset", "tokenizer", "vocab_size", "shared_vocab")


def check_same_experiment(
    config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict, workdir
):
    for field in _IDENTITY_FIELDS:
        new, old = config.get(field), saved.get(field)
        if isinstance(new, ml_collections.ConfigDict):
            new = new.to_dict()
        if isinstance(old, ml_collections.ConfigDict):
            old = old.to_dict()
        if new != old:
            raise RunError(
                f"{workdir} holds a run with {field}={old!r}, not {new!r}: "
                "use another --workdir or the run's own config"
            )


# ------------------------------------------------------------------------------------------ model


def create_model(config: ml_collections.ConfigDict, src_vocab_size: int, tgt_vocab_size: int):
    hparams = dict(config.get("model_hparams", {}))
    return registry.create_model(
        config.model, src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, **hparams
    )


def init_params(model, config: ml_collections.ConfigDict):
    """Initial params from `config.seed` (shapes only depend on the model, so tiny dummy inputs of
    the kind it reads: token ids, or an image for the captioner)."""
    return init_params_from_seed(model, config.seed)


@functools.partial(jax.jit, static_argnums=0)
def init_params_from_seed(model, seed):
    """Initial params from an int `seed` (traced: jit it with out_shardings to create them sharded)."""
    rng = jax.random.fold_in(jax.random.key(seed), 0)
    src = registry.example_source(model)
    tgt = jnp.ones((1, 4), jnp.int32)
    return model.init(rng, src, tgt, train=False)["params"]


# ----------------------------------------------------------------------------- optimizer and loss


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to 0, inverse-sqrt decay, or constant."""
    peak, warmup = config.learning_rate, max(1, config.warmup_steps)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(config.num_train_steps, warmup + 1), end_value=0.0
        )
    if config.schedule == "rsqrt":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, warmup),
                lambda step: peak * jnp.sqrt(warmup / (step + warmup)),
            ],
            [warmup],
        )
    if config.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )
    raise RunError(f"unknown schedule {config.schedule!r}: use cosine, rsqrt or constant")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with global-norm clipping on the configured schedule.

    The same settings give the same (cached) object, so jitted train steps that take it as a static
    argument are reused across runs in one process (tests) instead of recompiled.
    """
    fields = ("learning_rate", "warmup_steps", "num_train_steps", "schedule")
    return _optimizer(
        tuple((f, config[f]) for f in fields), config.grad_clip_norm, config.weight_decay
    )


@functools.cache
def _optimizer(schedule_fields, grad_clip_norm, weight_decay) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(ml_collections.ConfigDict(dict(schedule_fields)))
    return optax.chain(
        optax.clip_by_global_norm(grad_clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=weight_decay),
    )


@jax.jit
def all_finite(tree) -> jax.Array:
    """bool scalar: every element of every leaf of `tree` is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0):
    """Token cross-entropy with label smoothing, padding (id 0) masked out.

    Args:
      logits: float32 `[batch, length, vocab]`.
      targets: int32 `[batch, length]`, 0 = padding.
      label_smoothing: probability mass spread uniformly over the other tokens.

    Returns:
      (sum of per-token losses, number of real tokens). The loss is minus the smoothed target's entropy,
      so a perfect prediction scores 0 whatever the smoothing.
    """
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    soft_targets = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
    floor = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
    losses = optax.softmax_cross_entropy(logits, soft_targets) - floor
    weights = (targets != tokenizers.PAD_ID).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights)


# --------------------------------------------------------------------------------------- decoding


def step_function(model, params, src: jax.Array, max_len: int):
    """`(step_fn, init_state)` for `decoding/`: the source encoded once, the decoder state for it.

    `step_fn(tokens [N], state) -> (logits [N, vocab], state)` closes over the encoder memory, which
    keeps the sentence batch of `src [batch, src_len]`; `init_state` leaves have `batch` first.
    """
    variables = {"params": params}
    memory = model.apply(variables, src, method=model.encode)
    state = model.apply(variables, memory, max_len, method=model.init_decode_state)

    def step_fn(tokens, state):
        return model.apply(variables, memory, tokens, state, method=model.decode_step)

    return step_fn, state


@functools.cache
def decode_fn(
    model,
    decode: str,
    beam_size: int,
    max_len: int,
    length_penalty: str,
    mesh: Mesh | None = None,
    max_len_a: float = 0.0,
    max_len_b: int = 0,
):
    """A jitted `(params, src [batch, src_len], alpha) -> decoding result` (alpha traced: no recompiles).

    Each sentence generates at most `max_len` tokens (EOS included) or, with `max_len_a > 0` and text
    sources, `min(max_len, ceil(max_len_a * source tokens) + max_len_b)` (fairseq's `--max-len-a/b`):
    a batch of short sentences then stops early instead of running the search to `max_len`.

    One compiled program per (src shape, decode, beam_size, max_len, length_penalty, mesh, max_len_a,
    max_len_b); cached here so train and eval share them. With a `mesh`, the batch is split over its devices (pass `src` from
    `sharding.shard_batch`), the params are replicated (gathered once per call if they come
    FSDP-sharded) and so is the result, which every host can then read.
    """
    if decode not in ("greedy", "beam"):
        raise RunError(f"unknown decode {decode!r}: use greedy or beam")

    def run(params, src, alpha):
        if mesh is not None:
            params, src = replicate_params_shard_batch(mesh, params, src)
        step_fn, state = step_function(model, params, src, max_len)
        common = dict(
            bos_id=tokenizers.BOS_ID,
            eos_id=tokenizers.EOS_ID,
            batch_size=src.shape[0],
            max_len=max_len,
            max_lengths=source_length_limits(src, max_len_a, max_len_b),
        )
        if decode == "greedy":
            return decoding.greedy(step_fn, state, **common)
        return decoding.beam_search(
            step_fn,
            state,
            beam_size=beam_size,
            alpha=alpha,
            length_penalty=length_penalty,
            **common,
        )

    if mesh is None:
        return jax.jit(run)
    return jax.jit(run, out_shardings=sharding.replicated(mesh))


def source_length_limits(src: jax.Array, max_len_a: float, max_len_b: int) -> jax.Array | None:
    """int32 `[batch]` `ceil(max_len_a * source tokens) + max_len_b` for text `src [batch, src_len]`;
    None (no per-sentence limit) when `max_len_a` is 0 or the sources are images."""
    if max_len_a <= 0 or src.ndim != 2:
        return None
    lengths = jnp.sum(src != tokenizers.PAD_ID, axis=-1)
    return jnp.ceil(max_len_a * lengths).astype(jnp.int32) + max_len_b


def replicate_params_shard_batch(mesh: Mesh, params, *batch_arrays):
    """Inside jit: `params` replicated over `mesh`, each array's batch dimension split over it."""
    params = jax.lax.with_sharding_constraint(params, sharding.replicated(mesh))
    batch = [
        jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh)) for x in batch_arrays
    ]
    return params, *batch


def best_sequences(result) -> np.ndarray:
    """`[batch, max_len]` int token ids of the best hypothesis (greedy or beam result)."""
    sequences = np.asarray(result.sequences)
    return sequences[:, 0] if sequences.ndim == 3 else sequences


# ---------------------------------------------------------------------------------------- metrics


def text_metrics(hypotheses: list[str], references: list[str], exact_match: bool) -> dict:
    """Corpus metrics on detokenized strings.

    bleu: sacreBLEU on cased, detokenized text (the standard, with its signature);
    bleu_lc_tok: lowercased BLEU on 13a-tokenized text, the convention of Multi30k papers;
    chrf: sacreBLEU chrF; exact_match: fraction of hypotheses equal to their reference (string equality).
    """
    bleu = sacrebleu.metrics.BLEU()
    bleu_lc = sacrebleu.metrics.BLEU(lowercase=True, tokenize="13a")
    chrf = sacrebleu.metrics.CHRF()
    out = {
        "bleu": bleu.corpus_score(hypotheses, [references]).score,
        "bleu_signature": str(bleu.get_signature()),
        "bleu_lc_tok": bleu_lc.corpus_score(hypotheses, [references]).score,
        "chrf": chrf.corpus_score(hypotheses, [references]).score,
    }
    if exact_match:
        out["exact_match"] = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
    return out


# ------------------------------------------------------------------------------------ checkpoints


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


def restore_params(workdir: Path, params_template, average_last: int = 0):
    """Params of the best checkpoint, else the latest periodic one; `(params, step, which)`.

    `best/` holds one checkpoint (the best so far), so its latest step is the best step.
    `params_template` is a tree of `jax.ShapeDtypeStruct`s with shardings (`sharding.abstract`): the
    params are read straight into those shardings, whatever device count wrote the checkpoint.
    `average_last` > 0: instead the mean of the last that many periodic checkpoints (checkpoint
    averaging); `which` is then e.g. "average of checkpoints 1200-2000 (5)".
    """
    workdir = Path(workdir)
    if average_last > 0:
        return _average_params(workdir, params_template, average_last)
    for which in ("best", "checkpoints"):
        directory = workdir.absolute() / which
        if not directory.is_dir():
            continue
        step = None
        try:
            options = ocp.CheckpointManagerOptions(create=False)
            with ocp.CheckpointManager(directory, options=options) as manager:
                step = manager.latest_step()
                if step is not None:
                    return _restore_params(manager, step, which, params_template), step, which
        except Exception as e:  # noqa: BLE001 — any failure to read means a damaged checkpoint
            where = directory / str(step) if step is not None else directory
            raise RunError(
                f"checkpoint {where} is corrupt or incompatible with {workdir / CONFIG_FILE} "
                f"({type(e).__name__}); delete it to fall back to an older one, or retrain"
            ) from None
    raise RunError(
        f"no checkpoint in {workdir}: train first with `python train.py --workdir {workdir}`"
    )


def _average_params(workdir: Path, params_template, count: int):
    directory = workdir.absolute() / "checkpoints"
    steps = []
    if directory.is_dir():
        with ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(create=False)
        ) as m:
            steps = sorted(m.all_steps())[-count:]
            if len(steps) == count:
                total = None
                for step in steps:
                    try:
                        params = _restore_params(m, step, "checkpoints", params_template)
                    except Exception as e:  # noqa: BLE001 — a damaged checkpoint
                        raise RunError(
                            f"checkpoint {directory / str(step)} is corrupt ({type(e).__name__}): "
                            "delete it and average fewer checkpoints"
                        ) from None
                    total = params if total is None else jax.tree.map(jnp.add, total, params)
                mean = jax.tree.map(lambda x: x / count, total)
                which = f"average of checkpoints {steps[0]}-{steps[-1]} ({count})"
                return mean, steps[-1], which
    raise RunError(
        f"cannot average {count} checkpoints: {directory} holds {len(steps)}; average at most "
        "that many, or keep more when training (--config.keep_checkpoints)"
    )


def _restore_params(manager: ocp.CheckpointManager, step: int, which: str, params_template):
    if which == "best":
        return manager.restore(step, args=ocp.args.StandardRestore(params_template))
    item = {"params": params_template}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    )
    return manager.restore(step, args=args)["state"]["params"]


# -------------------------------------------------------------------------------------- reporting


def append_metrics(workdir: Path, record: dict) -> None:
    with open(Path(workdir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
