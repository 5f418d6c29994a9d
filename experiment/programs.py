"""A run's model and what trains it, one way for every caller.

train.py, eval.py, the benchmarks and the tests build the model (`create_model`), its special ids
(`special_ids`), its initial params (`init_params`), the optimizer and the loss here, so they compile
and compute the same thing. The decoding and scoring programs are `experiment.decode_programs`'.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from contracts import PAD_ID, SEQZOO_IDS, SpecialIds
from experiment import RunError
from models import registry

# ------------------------------------------------------------------------------------------ model


def create_model(config: ml_collections.ConfigDict, src_vocab_size: int, tgt_vocab_size: int):
    """`config.model` with `config.model_hparams` and the run's `dtype` / `param_dtype`."""
    hparams = dict(config.get("model_hparams", {}))
    for field in ("dtype", "param_dtype"):
        if field in hparams:
            raise RunError(
                f"model_hparams.{field} is not read: set the run's --config.{field} instead"
            )
        hparams[field] = config[field]
    try:
        return registry.create_model(
            config.model, src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, **hparams
        )
    except ValueError as e:
        if "is not a dtype" in str(e):
            raise RunError(f"--config.{e}") from None
        raise


def special_ids(model) -> SpecialIds:
    """The ids `model` reads and generates with: its `pad_id` / `bos_id` / `eos_id` fields (an
    imported Transformer's are its vocabulary's), else seqzoo's (`contracts.SEQZOO_IDS`)."""
    ids = SEQZOO_IDS
    return SpecialIds(
        getattr(model, "pad_id", ids.pad),
        getattr(model, "bos_id", ids.bos),
        getattr(model, "eos_id", ids.eos),
        ids.unk,
    )


def check_tokenizer_ids(model, src_tokenizer, tgt_tokenizer) -> None:
    """A one-line `RunError` unless the tokenizers' pad/BOS/EOS are the model's (the source's pad
    and EOS, which sources are padded and ended with)."""
    ours = special_ids(model)
    for side, tokenizer in (("source", src_tokenizer), ("target", tgt_tokenizer)):
        theirs = tokenizer.special_ids
        fields = ("pad", "eos") if side == "source" else ("pad", "bos", "eos")
        if any(getattr(theirs, f) != getattr(ours, f) for f in fields):
            raise RunError(
                f"the {side} tokenizer's special ids {theirs.as_dict()} are not the model's "
                f"{ours.as_dict()}: set model_hparams pad_id/bos_id/eos_id to the tokenizer's"
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
    """AdamW with global-norm clipping (`grad_clip_norm`; 0: none) on the configured schedule.

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
    clip = optax.clip_by_global_norm(grad_clip_norm) if grad_clip_norm > 0 else optax.identity()
    return optax.chain(
        clip, optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=weight_decay)
    )


@jax.jit
def all_finite(tree) -> jax.Array:
    """bool scalar: every element of every leaf of `tree` is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def cross_entropy(
    logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0, pad_id: int = PAD_ID
):
    """Token cross-entropy with label smoothing, padding (`pad_id`) masked out.

    Args:
      logits: float32 `[batch, length, vocab]`.
      targets: int32 `[batch, length]`, `pad_id` = padding.
      label_smoothing: probability mass spread uniformly over the other tokens.

    Returns:
      (sum of per-token losses, number of real tokens). The loss is minus the smoothed target's entropy,
      so a perfect prediction scores 0 whatever the smoothing.
    """
    weights = (targets != pad_id).astype(jnp.float32)
    return jnp.sum(smoothed_token_losses(logits, targets, label_smoothing) * weights), jnp.sum(
        weights
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def smoothed_token_losses(logits: jax.Array, targets: jax.Array, label_smoothing: float):
    """float32 `[...]`: each token's cross-entropy against the smoothed target (`1 - s` on the
    target, `s / (vocab - 1)` on every other token) minus that target's entropy.

    Written with its gradient, `softmax(logits) - smoothed target`, so that training makes two
    passes over the `[..., vocab]` logits (log-sum-exp forward, the gradient backward) instead of
    autodiff's chain through a materialized one-hot and log-softmax; the same values, and the
    Multi30k Transformer's output layer and loss 1.18x faster on the CPU (docs/benchmarks_training.md).
    """
    return _smoothed_losses_fwd(logits, targets, label_smoothing)[0]


def _smoothing(vocab: int, label_smoothing: float) -> tuple[float, float, float]:
    """(probability on the target, on each other token, the smoothed target's entropy)."""
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
    return confidence, low, entropy


def _smoothed_losses_fwd(logits, targets, label_smoothing):
    confidence, low, entropy = _smoothing(logits.shape[-1], label_smoothing)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    log_z = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1)) + top[..., 0]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # -sum_v q_v log p_v with sum_v q_v = 1: log Z - (confidence - low) z_target - low sum_v z_v.
    losses = log_z - (confidence - low) * target_logit - entropy
    if low:
        losses = losses - low * jnp.sum(logits, axis=-1)
    return losses, (logits, targets, log_z)


def _smoothed_losses_bwd(label_smoothing, residuals, grad):
    logits, targets, log_z = residuals
    confidence, low, _ = _smoothing(logits.shape[-1], label_smoothing)
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    soft_targets = jnp.where(is_target, confidence, low)
    return (jnp.exp(logits - log_z[..., None]) - soft_targets) * grad[..., None], None


smoothed_token_losses.defvjp(_smoothed_losses_fwd, _smoothed_losses_bwd)
