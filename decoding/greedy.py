"""Greedy decoding, and the one-path decoding loop that greedy and sampling share."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from decoding import common


class DecodeResult(NamedTuple):
    """One hypothesis per sentence (greedy or sampled).

    sequences: int32 `[batch, max_len]`, y_1 .. y_T (EOS included), 0 after.
    log_probs: float32 `[batch]`, log P(y|x) under the model (temperature 1, no truncation).
    lengths: int32 `[batch]`, T (EOS counted; max_len when cut without EOS).
    token_log_probs: float32 `[batch, max_len]`, log P(y_t|y_<t, x) of each token, 0 after T.
    alignments: int32 `[batch, max_len]`, the source position each token is aligned with (the step
      function's third output), -1 after T; None unless decoded `with_alignment`.
    """

    sequences: jax.Array
    log_probs: jax.Array
    lengths: jax.Array
    token_log_probs: jax.Array
    alignments: jax.Array | None = None


# choose(step int32 [], log_probs [batch, vocab] with pad/BOS at -inf, running log P [batch]) -> [batch]
Chooser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def decode_path(
    step_fn,
    init_state: Any,
    choose: Chooser,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int = common.PAD_ID,
    batch_size: int,
    max_len: int,
    max_lengths: jax.Array | None = None,
    no_repeat_ngram_size: int = 0,
    prefix: jax.Array | None = None,
    prefix_lengths: jax.Array | None = None,
    with_alignment: bool = False,
) -> DecodeResult:
    """Decodes one token per step with `choose` until every sentence has EOS or its limit of tokens.

    Args:
      step_fn: `step_fn(tokens [batch] int32, state) -> (logits [batch, vocab], new_state)`.
      init_state: pytree, every leaf `[batch, ...]`.
      choose: picks the next tokens, see `Chooser`; it never sees pad or BOS as possible (nor, while
        a sentence follows its prefix, any token but the prefix's).
      bos_id, eos_id, pad_id, batch_size, max_len, max_lengths, no_repeat_ngram_size, prefix,
        prefix_lengths, with_alignment: as in `decoding.beam_search`.

    Raises:
      ValueError: a bad static argument, an id outside the vocabulary, or a state or step function
        whose shapes do not fit.
    """
    common.check_positive(batch_size=batch_size, max_len=max_len)
    common.check_ngram_size(no_repeat_ngram_size)
    common.check_batch(init_state, batch_size)
    vocab = common.probe_step_fn(step_fn, init_state, batch_size, with_alignment)
    common.check_token_ids(vocab, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
    prefix = common.check_prefix(
        prefix,
        prefix_lengths,
        batch_size=batch_size,
        max_len=max_len,
        vocab=vocab,
        pad_id=pad_id,
        bos_id=bos_id,
        eos_id=eos_id,
    )
    positions = jnp.arange(max_len)
    limits = common.prefix_limits(
        common.sentence_limits(max_lengths, batch_size, max_len), prefix, max_len
    )

    def cond(carry):
        step, *_, ended = carry
        return (step < max_len) & ~jnp.all(ended)

    def body(carry):
        step, tokens, state, out, ended = carry
        logits, state, *alignment = step_fn(tokens, state)
        log_probs = common.log_probs(logits)
        allowed = common.search_mask(log_probs, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
        if no_repeat_ngram_size:
            blocked = common.repeated_ngrams(out.sequences, step, no_repeat_ngram_size, vocab)
            allowed = jnp.where(blocked, -jnp.inf, allowed)
        if prefix is not None:
            allowed = common.force_prefix(allowed, log_probs, step, prefix)
        token = jnp.where(ended, pad_id, choose(step, allowed, out.log_probs))
        token_log_prob = jnp.where(
            ended, 0.0, jnp.take_along_axis(log_probs, token[:, None], axis=1)[:, 0]
        )
        at_step = positions == step
        out = DecodeResult(
            sequences=jnp.where(at_step, token[:, None], out.sequences),
            log_probs=out.log_probs + token_log_prob,
            lengths=jnp.where(ended, out.lengths, step + 1),
            token_log_probs=jnp.where(at_step, token_log_prob[:, None], out.token_log_probs),
            alignments=out.alignments,
        )
        if with_alignment:
            aligned = jnp.where(ended, -1, alignment[0].astype(jnp.int32))
            out = out._replace(alignments=jnp.where(at_step, aligned[:, None], out.alignments))
        return step + 1, token, state, out, ended | (token == eos_id) | (step + 1 >= limits)

    out = DecodeResult(
        sequences=jnp.zeros((batch_size, max_len), jnp.int32),
        log_probs=jnp.zeros((batch_size,), jnp.float32),
        lengths=jnp.zeros((batch_size,), jnp.int32),
        token_log_probs=jnp.zeros((batch_size, max_len), jnp.float32),
        alignments=jnp.full((batch_size, max_len), -1, jnp.int32) if with_alignment else None,
    )
    carry = (
        jnp.int32(0),
        jnp.full((batch_size,), bos_id, jnp.int32),
        init_state,
        out,
        jnp.zeros((batch_size,), bool),
    )
    return jax.lax.while_loop(cond, body, carry)[3]


def _argmax(step: jax.Array, log_probs: jax.Array, running: jax.Array) -> jax.Array:
    # argmax of running + log_probs, not of log_probs alone: the same float sums beam search ranks,
    # so a near-tie rounds the same way and beam_size=1 returns exactly these tokens.
    del step
    return common.argmax(running[:, None] + log_probs)


def greedy(
    step_fn,
    init_state: Any,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int = common.PAD_ID,
    batch_size: int,
    max_len: int,
    max_lengths: jax.Array | None = None,
    no_repeat_ngram_size: int = 0,
    prefix: jax.Array | None = None,
    prefix_lengths: jax.Array | None = None,
    with_alignment: bool = False,
) -> DecodeResult:
    """The most probable next token at every step (never pad or BOS), until EOS or the limit; with
    a `prefix`, each sentence's prefix tokens first.

    Args and raises as `decode_path`; `step_fn` gets N = batch rows. Usable under an outer `jax.jit`.
    """
    return decode_path(
        step_fn,
        init_state,
        _argmax,
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
