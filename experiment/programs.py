"""A run's model and the jitted programs built on it, one way for every caller.

train.py, eval.py, the benchmarks and the tests build the model (`create_model`), its initial params
(`init_params`), the optimizer and loss, and the decoding/scoring programs (`step_function`,
`decode_fn`, `score_fn`) here, so they compile and compute the same thing.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

import decoding
import sharding
from contracts import PAD_ID, SEQZOO_IDS, SpecialIds
from experiment import RunError, host_memory
from models import registry, transformer

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


# --------------------------------------------------------------------------------------- decoding


def decoding_params(model, params):
    """`params` as decoding reads them fastest: a Transformer (or captioner) gets copies of some
    kernels laid out for its decoding steps (`transformer.with_decoding_kernels`: the tied table
    transposed, and on the CPU the kernels a step reads packed in column panels, `models.packed`),
    and on the CPU every array moves onto 2 MB pages (`host_memory.on_huge_pages`). Decode and
    score (`score_fn` runs the decoding step) with these; train and save the params themselves."""
    if isinstance(model, transformer.TransformerDecoder):
        params = transformer.with_decoding_kernels(model, params)
    return host_memory.on_huge_pages(params)


def step_function(model, params, src: jax.Array, max_decode_len: int, alignment_layer=None):
    """`(step_fn, init_state)` for `decoding/`: the source encoded once, the decoder state for it.

    `step_fn(tokens [N], state) -> (logits [N, vocab], state)` closes over the encoder memory, which
    keeps the sentence batch of `src [batch, src_len]`; `init_state` leaves have `batch` first.
    With an `alignment_layer` (an int, Python indexing over the decoder's cross-attention layers;
    -1 the last) it returns a third output, int32 `[N]`: the source position with the most
    attention (averaged over heads) when predicting the token (`decoding`'s `with_alignment`).
    """
    variables = {"params": params}
    memory = model.apply(variables, src, method=model.encode)
    state = model.apply(variables, memory, max_decode_len, method=model.init_decode_state)

    def step_fn(tokens, state):
        return model.apply(variables, memory, tokens, state, method=model.decode_step)

    def aligned_step_fn(tokens, state):
        (logits, state), sown = model.apply(
            variables, memory, tokens, state, method=model.decode_step, mutable=["intermediates"]
        )
        weights = cross_attention(sown.get("intermediates", {}), alignment_layer, model)
        return logits, state, jnp.argmax(weights, axis=-1).astype(jnp.int32)

    return (step_fn if alignment_layer is None else aligned_step_fn), state


def cross_attention(intermediates, layer: int, model) -> jax.Array:
    """float `[N, src_len]`: decoder cross-attention layer `layer` of a decode step's sown
    `intermediates` (`cross_attention_<i>` `[N, heads, src_len]`, averaged over heads, or an RNN's
    single `attention` `[N, src_len]`); a `RunError` when the model has none or no such layer."""
    found = {}
    for path, value in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        names = [str(getattr(k, "key", "")) for k in path]
        name = next((n for n in reversed(names) if "attention" in n), "")
        if name.startswith("cross_attention_"):
            found[int(name.rsplit("_", 1)[1])] = jnp.mean(value.astype(jnp.float32), axis=1)
        elif name == "attention":
            found[0] = value.astype(jnp.float32)
    if not found:
        raise RunError(
            f"{type(model).__name__} has no attention over the source: token alignments need an "
            "attention model (attention_rnn, transformer, a captioner)"
        )
    layers = [found[i] for i in sorted(found)]
    if not -len(layers) <= layer < len(layers):
        raise RunError(
            f"alignment layer {layer} does not exist: {type(model).__name__} has "
            f"{len(layers)} cross-attention layer(s), use 0 .. {len(layers) - 1} or -1 (the last)"
        )
    return layers[layer]


def has_attention(model, params) -> bool:
    """Whether `model` exposes source attention per decode step (`decode_fn`'s alignments)."""
    src = registry.example_source(model)

    def probe(params):
        step_fn, state = step_function(model, params, src, 4, alignment_layer=-1)
        return step_fn(jnp.full((src.shape[0],), special_ids(model).bos, jnp.int32), state)

    try:
        jax.eval_shape(probe, params)
    except RunError:
        return False
    return True


@functools.cache
def decode_fn(
    model,
    decode: str,
    beam_size: int,
    max_decode_len: int,
    length_penalty: str,
    mesh: Mesh | None = None,
    max_decode_len_a: float = 0.0,
    max_decode_len_b: int = 0,
    no_repeat_ngram_size: int = 0,
    alignment_layer: int | None = None,
):
    """A jitted `(params, src [batch, src_len], alpha, prefix=None, sampling=None) -> decoding
    result` (greedy and sampling: `decoding.DecodeResult`; beam: `decoding.BeamSearchResult`).

    alpha: the length-penalty exponent (traced: no recompiles; beam search only).
    prefix: optional int `[batch, P]` forced target prefixes, PAD after each (`decoding`'s `prefix`;
      traced, one compilation per P).
    sampling: with `decode="sample"`, a dict of `rng` (a key), `temperature`, `top_k`, `top_p`
      (traced scalars) and `example_ids` int `[batch]` (`decoding.sample`).

    Each sentence generates at most `max_decode_len` tokens (EOS included) or, with
    `max_decode_len_a > 0` and text sources, `min(max_decode_len, ceil(max_decode_len_a * source
    tokens) + max_decode_len_b)` (fairseq's `--max-len-a/b`): a batch of short sentences then stops
    early instead of running the search to `max_decode_len`. `no_repeat_ngram_size` > 0: no n-gram
    occurs twice in a hypothesis (`decoding.beam_search`).

    One compiled program per (src shape, decode, beam_size, max_decode_len, length_penalty, mesh,
    max_decode_len_a, max_decode_len_b, no_repeat_ngram_size, alignment_layer); cached here so train
    and eval share them. `alignment_layer` (int, see `step_function`): results carry `alignments`, the
    source position each token attends to most; None: not collected. With a `mesh`, the batch is split over its
    devices (pass `src` from `sharding.shard_batch`), the params are replicated (gathered once per
    call if they come FSDP-sharded) and so is the result, which every host can then read.
    """
    if decode not in ("greedy", "beam", "sample"):
        raise RunError(f"unknown decode {decode!r}: use greedy, beam or sample")

    def run(params, src, alpha, prefix=None, sampling=None):
        if mesh is not None:
            params, src = replicate_params_shard_batch(mesh, params, src)
            if prefix is not None:
                prefix = jax.lax.with_sharding_constraint(prefix, sharding.batch_sharding(mesh))
        step_fn, state = step_function(model, params, src, max_decode_len, alignment_layer)
        ids = special_ids(model)
        common = dict(
            bos_id=ids.bos,
            eos_id=ids.eos,
            pad_id=ids.pad,
            batch_size=src.shape[0],
            max_len=max_decode_len,
            max_lengths=source_length_limits(
                src, max_decode_len_a, max_decode_len_b, pad_id=ids.pad
            ),
            no_repeat_ngram_size=no_repeat_ngram_size,
            prefix=prefix,
            with_alignment=alignment_layer is not None,
        )
        if decode == "greedy":
            return decoding.greedy(step_fn, state, **common)
        if decode == "sample":
            if sampling is None:
                raise RunError(
                    "decode='sample' needs sampling={rng, temperature, top_k, top_p, example_ids}"
                )
            return decoding.sample(step_fn, state, **sampling, **common)
        return decoding.beam_search(
            step_fn,
            state,
            beam_size=beam_size,
            alpha=alpha,
            length_penalty=length_penalty,
            **common,
        )

    return _jit_on(mesh, run)


@functools.cache
def score_fn(model, length_penalty: str, mesh: Mesh | None = None):
    """A jitted teacher-forced scoring `(params, src [batch, src_len], targets [batch, T], alpha) ->
    decoding.ScoreResult` of `targets` (y_1 .. y_T with EOS, pad-padded) under the same length
    normalization as beam search; with a `mesh`, the batch split over it, the params replicated."""

    def run(params, src, targets, alpha):
        if mesh is not None:
            params, src, targets = replicate_params_shard_batch(mesh, params, src, targets)
        step_fn, state = step_function(model, params, src, targets.shape[1])
        return decoding.score(
            step_fn,
            state,
            targets,
            bos_id=special_ids(model).bos,
            eos_id=special_ids(model).eos,
            pad_id=special_ids(model).pad,
            alpha=alpha,
            length_penalty=length_penalty,
        )

    return _jit_on(mesh, run)


def _jit_on(mesh: Mesh | None, run):
    """`run` jitted; with a `mesh`, its result replicated (every host can read it)."""
    if mesh is None:
        return jax.jit(run)
    return jax.jit(run, out_shardings=sharding.replicated(mesh))


def source_length_limits(
    src: jax.Array, max_decode_len_a: float, max_decode_len_b: int, pad_id: int = PAD_ID
) -> jax.Array | None:
    """int32 `[batch]` `ceil(max_decode_len_a * source tokens) + max_decode_len_b` for text `src [batch, src_len]`;
    None (no per-sentence limit) when `max_decode_len_a` is 0 or the sources are images."""
    if max_decode_len_a <= 0 or src.ndim != 2:
        return None
    lengths = jnp.sum(src != pad_id, axis=-1)
    return jnp.ceil(max_decode_len_a * lengths).astype(jnp.int32) + max_decode_len_b


def decode_length_limits(
    src: np.ndarray,
    max_decode_len: int,
    max_decode_len_a: float,
    max_decode_len_b: int,
    pad_id: int = PAD_ID,
):
    """int `[batch]`: the most tokens (EOS included) each sentence of `src` may generate, as
    `decode_fn` applies it: `max_decode_len`, or `min(max_decode_len, ceil(a * source tokens) + b)`."""
    limits = source_length_limits(jnp.asarray(src), max_decode_len_a, max_decode_len_b, pad_id)
    full = np.full(len(src), max_decode_len)
    return full if limits is None else np.minimum(full, np.asarray(limits))


def replicate_params_shard_batch(mesh: Mesh, params, *batch_arrays):
    """Inside jit: `params` replicated over `mesh`, each array's batch dimension split over it."""
    params = jax.lax.with_sharding_constraint(params, sharding.replicated(mesh))
    batch = [
        jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh)) for x in batch_arrays
    ]
    return params, *batch


def best_sequences(result) -> np.ndarray:
    """`[batch, max_decode_len]` int token ids of the best hypothesis (greedy or beam result)."""
    sequences = np.asarray(result.sequences)
    return sequences[:, 0] if sequences.ndim == 3 else sequences
