"""Teacher-forced scoring: log P(y|x) of given target sequences, per sentence and per token."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from decoding import common
from decoding import length_penalty as lp_lib


class ScoreResult(NamedTuple):
    """Scores of given targets.

    scores: float32 `[batch]`, `log_probs / penalty(lengths)`, the normalization of beam search.
    log_probs: float32 `[batch]`, log P(y|x), the sum over the first `lengths` tokens.
    token_log_probs: float32 `[batch, T]`, log P(y_t|y_<t, x), 0 from `lengths` on.
    lengths: int32 `[batch]`, T as beam search counts it (see `sequence_lengths`).

    An all-pad row (like an empty beam slot) has length 0 and log-probability 0: it is no hypothesis.
    """

    scores: jax.Array
    log_probs: jax.Array
    token_log_probs: jax.Array
    lengths: jax.Array


def sequence_lengths(tokens: jax.Array, eos_id: int, pad_id: int = common.PAD_ID) -> jax.Array:
    """int32 `[...]`: the length of each sequence `tokens [..., T]` as the decoders count it.

    A sequence ends at its first EOS (counted) or its first pad (not counted), whichever comes first;
    with neither its length is T. So a decoder's output and a `tgt_out` row (`y1 .. yT eos 0 ..`) have
    the length of their hypothesis.
    """
    tokens = jnp.asarray(tokens)
    is_eos = tokens == eos_id
    stops_before = jnp.cumsum(is_eos | (tokens == pad_id), axis=-1)  # stops up to t
    first_stop_is_eos = jnp.any(is_eos & (stops_before == 1), axis=-1)
    return (jnp.sum(stops_before == 0, axis=-1) + first_stop_is_eos).astype(jnp.int32)


def score(
    step_fn,
    init_state: Any,
    targets: jax.Array,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int = common.PAD_ID,
    alpha: float | jax.Array = 0.6,
    length_penalty: str = "gnmt",
) -> ScoreResult:
    """Teacher-forced log P(y|x) of `targets` (one `lax.scan` over the step function).

    Args:
      step_fn: `step_fn(tokens [batch] int32, state) -> (logits [batch, vocab], new_state)`.
      init_state: pytree, every leaf `[batch, ...]`, the decoder state before BOS.
      targets: int `[batch, T]`, y_1 .. y_T with EOS, 0-padded after (a decoder's `sequences`, or a
        batch's `tgt_out`); scored up to `sequence_lengths`.
      bos_id, eos_id, pad_id: token ids (Python ints; as in `decoding.beam_search`).
      alpha, length_penalty: as in `decoding.beam_search` (alpha traced).

    Returns:
      A `ScoreResult`. The model's own log-probabilities: nothing is masked, so any token, even pad or
      BOS, has its probability. Usable under an outer `jax.jit`.

    Raises:
      ValueError: targets not `[batch, T]` integers, ids outside the vocabulary (target values are
        checked when not traced), or a state or step function whose shapes do not fit.
    """
    targets = jnp.asarray(targets)
    if targets.ndim != 2 or not jnp.issubdtype(targets.dtype, jnp.integer) or 0 in targets.shape:
        raise ValueError(
            f"targets must be non-empty int token ids [batch, T], got {targets.dtype}{targets.shape}"
        )
    lp_lib.check_kind(length_penalty)
    batch, length = targets.shape
    common.check_batch(init_state, batch)
    vocab = common.probe_step_fn(step_fn, init_state, batch)
    common.check_token_ids(vocab, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
    if not isinstance(targets, jax.core.Tracer):
        values = np.asarray(targets)
        if values.min() < 0 or values.max() >= vocab:
            raise ValueError(
                f"targets hold ids in [{values.min()}, {values.max()}], outside the vocabulary "
                f"[0, {vocab})"
            )
    targets = targets.astype(jnp.int32)
    inputs = jnp.concatenate([jnp.full((batch, 1), bos_id, jnp.int32), targets[:, :-1]], axis=1)

    def body(state, tokens):
        token_in, token_out = tokens
        logits, state = step_fn(token_in, state)
        log_probs = common.log_probs(logits)
        return state, jnp.take_along_axis(log_probs, token_out[:, None], axis=1)[:, 0]

    _, token_log_probs = jax.lax.scan(body, init_state, (inputs.T, targets.T))
    lengths = sequence_lengths(targets, eos_id, pad_id)
    token_log_probs = jnp.where(jnp.arange(length) < lengths[:, None], token_log_probs.T, 0.0)
    log_probs = jnp.sum(token_log_probs, axis=1)
    return ScoreResult(
        scores=lp_lib.normalize(log_probs, lengths, alpha, length_penalty),
        log_probs=log_probs,
        token_log_probs=token_log_probs,
        lengths=lengths,
    )
