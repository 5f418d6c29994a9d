"""Ancestral sampling with temperature, top-k and nucleus (top-p) truncation.

Sentence i draws from its own key `fold_in(fold_in(rng, example_ids[i]), step)`, so its sample does not
depend on the batch size or on the other sentences of the batch.
"""

from typing import Any

import jax
import jax.numpy as jnp

from decoding import common
from decoding.greedy import DecodeResult, decode_path


def _check_concrete(name: str, value: Any, ok, requirement: str) -> None:
    """A one-line ValueError when `value` is known now (not traced) and `ok(value)` is False."""
    if not isinstance(value, jax.core.Tracer) and not ok(value):
        raise ValueError(f"{name}={value!r} must be {requirement}")


def truncate(
    log_probs: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """The sampling logits: `log_probs [batch, vocab] / temperature`, -inf outside top-k and top-p.

    top_k keeps the k most probable tokens (0 keeps all); top_p then keeps the fewest most probable
    tokens whose probability (renormalized after top-k) reaches top_p; the most probable token is always
    kept. All three are traced scalars: changing them does not recompile.
    """
    logits = log_probs / temperature
    order = jnp.argsort(-logits, axis=-1)  # most probable first (stable: ties keep id order)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])
    keep = (top_k <= 0) | (rank < top_k)
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before this token still < top_p
    rows = jnp.arange(logits.shape[0])[:, None]
    kept = jnp.zeros_like(keep).at[rows, order].set(keep)
    return jnp.where(kept, logits, -jnp.inf)


def sample(
    step_fn,
    init_state: Any,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int = common.PAD_ID,
    batch_size: int,
    max_len: int,
    rng: jax.Array,
    temperature: float | jax.Array = 1.0,
    top_k: int | jax.Array = 0,
    top_p: float | jax.Array = 1.0,
    example_ids: jax.Array | None = None,
    max_lengths: jax.Array | None = None,
    no_repeat_ngram_size: int = 0,
    prefix: jax.Array | None = None,
    prefix_lengths: jax.Array | None = None,
    with_alignment: bool = False,
) -> DecodeResult:
    """One sample per sentence, until EOS or its limit (`max_len`, `max_lengths`); never pad or BOS.

    Args:
      step_fn, init_state, bos_id, eos_id, pad_id, batch_size, max_len, max_lengths, no_repeat_ngram_size,
        prefix, prefix_lengths, with_alignment: as in `decoding.greedy` (a prefix is followed
        before sampling freely).
      rng: a JAX PRNG key (`jax.random.key(seed)` or `jax.random.PRNGKey(seed)`).
      temperature: > 0; divides the log-probabilities (lower is closer to greedy).
      top_k: keep the k most probable tokens; 0 keeps all.
      top_p: in (0, 1]; nucleus sampling; 1 keeps all.
      example_ids: int `[batch]` global indices of the sentences (default `arange(batch)`); pass the
        dataset indices so a sample does not change with the batching.
      temperature, top_k and top_p are traced: changing them does not recompile.

    Returns:
      A `DecodeResult`; its log-probabilities are the model's (temperature 1, no truncation), as
      `decoding.score` computes them.

    Raises:
      ValueError: as `decoding.greedy`, or a temperature, top_k, top_p, rng or example_ids that cannot
        work (checked when not traced).
    """
    common.check_positive(batch_size=batch_size, max_len=max_len)
    _check_concrete("temperature", temperature, lambda t: t > 0, "> 0 (use greedy for argmax)")
    _check_concrete("top_k", top_k, lambda k: k >= 0, ">= 0 (0 keeps every token)")
    _check_concrete("top_p", top_p, lambda p: 0 < p <= 1, "in (0, 1] (1 keeps every token)")
    rng = rng if isinstance(rng, jax.Array) else jnp.asarray(rng)
    typed_key = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.shape == ()
    if not (typed_key or (rng.dtype == jnp.uint32 and rng.shape == (2,))):
        raise ValueError(
            f"rng must be one JAX PRNG key such as jax.random.key(0), got {rng.dtype}{rng.shape}"
        )
    if example_ids is None:
        example_ids = jnp.arange(batch_size)
    if jnp.shape(example_ids) != (batch_size,):
        raise ValueError(
            f"example_ids has shape {jnp.shape(example_ids)}: give one id per sentence, "
            f"shape ({batch_size},)"
        )
    example_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, example_ids)
    temperature = jnp.asarray(temperature, jnp.float32)

    def choose(step, log_probs, running):
        del running
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(example_keys, step)
        logits = truncate(log_probs, temperature, top_k, top_p)
        return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)

    return decode_path(
        step_fn,
        init_state,
        choose,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        batch_size=batch_size,
        max_len=max_len,
        max_lengths=max_lengths,
        no_repeat_ngram_size=no_repeat_ngram_size,
        prefix=prefix,
        prefix_lengths=prefix_lengths,
        with_alignment=with_alignment,
    )
