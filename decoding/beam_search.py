"""Beam search in one `jax.lax.while_loop`, vectorized over sentences and beams.

Each sentence keeps two sets of `beam_size` hypotheses:
- alive: prefixes that may still grow. Each step extends every alive prefix by every token and ranks
  the extensions by log-probability (one top-k over `beam x vocab` candidates, `common.top_k`, EOS
  extensions included);
- finished: the n-best complete hypotheses by normalized score. An extension that picks EOS, or that
  reaches `max_len`, leaves the alive set for good and competes for the n-best; a finished hypothesis is
  never extended, and leaves the n-best only for a better one.

Two policies (`beam_policy`, static) decide which extensions are kept:
- "classic": the `beam_size` best extensions; an EOS extension takes one of those places, as in the
  classic algorithm (Marian, OpenNMT), so `beam_size=1` is exactly greedy decoding; the alive set
  fills up again at the next step.
- "full": the `2 x beam_size` best extensions are the candidates (as in transformers, fairseq and
  CTranslate2); those among the first `beam_size` that end compete for the n-best (an ending one
  ranked lower is dropped), and the `beam_size` best that do not end stay alive, so the alive set is
  always full (each alive prefix has one EOS extension at most, so `beam_size` remain).

A sentence stops (`stopping`, static; docs/design.md maps both options to the peers' settings):
- "exact": when no alive hypothesis can beat the worst of its n-best: an alive prefix of length t and
  log-probability lp <= 0 can only lose probability, so no completion scores above
  `lp / max(penalty(t + 1), penalty(limit))` (the penalty is monotonic in T, for either sign of
  alpha). Nothing the search would still find is lost (transformers' `early_stopping="never"`);
- "heuristic": when the best alive hypothesis, scored at its current length t (`lp / penalty(t)`),
  does not beat the worst of the n-best (transformers' default, `early_stopping=False`);
- "nbest": as soon as the n-best holds `beam_size` finished hypotheses (transformers'
  `early_stopping=True`, fairseq, CTranslate2 with a length penalty).
Every sentence stops at its limit (`max_len`) at the latest, and the loop when every sentence has
stopped. A stopped sentence is frozen, so what it returns does not depend on the other sentences of
the batch.

Ranking uses `log P(y|x) / penalty(T)` (see `decoding.length_penalty`), T counting EOS; a hypothesis that
reaches `max_len` (or its sentence's own limit, `max_lengths`) without EOS is finished with T = that
limit and ranked by the same score. `min_len` is the least number of tokens before EOS;
`no_repeat_ngram_size` blocks repeated n-grams; a forced `prefix` is followed token by token (one alive
hypothesis while it lasts) before the search goes free, its log-probabilities counted in the score, as
in fairseq's `--prefix-size` and CTranslate2's `target_prefix`. Pad and BOS are never generated. Masks
restrict the search without renormalizing, so returned log-probabilities are the model's own and equal
`decoding.score`'s.

Empty n-best slots (fewer than `beam_size` distinct hypotheses exist) have score and log-probability
-inf, `valid` False, length 0 and all-pad tokens: -inf with `jnp.where`, never a finite sentinel that a
length penalty could turn into a winner.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from decoding import common
from decoding import length_penalty as lp_lib

POLICIES = ("classic", "full")  # `beam_policy`: which extensions are kept (module docstring)
STOPPING = ("exact", "heuristic", "nbest")  # `stopping`: when a sentence stops (module docstring)


class BeamSearchResult(NamedTuple):
    """The n-best hypotheses of each sentence, best first.

    sequences: int32 `[batch, beam, max_len]`, y_1 .. y_T (EOS included), 0 after.
    scores: float32 `[batch, beam]`, the normalized score used for ranking; -inf for empty slots.
    log_probs: float32 `[batch, beam]`, log P(y|x), the unnormalized sum; -inf for empty slots.
    lengths: int32 `[batch, beam]`, T (EOS counted; max_len when cut without EOS); 0 for empty slots.
    token_log_probs: float32 `[batch, beam, max_len]`, log P(y_t|y_<t, x) of each token, 0 after T.
    valid: bool `[batch, beam]`, False for empty slots.
    alignments: int32 `[batch, beam, max_len]`, the source position each token is aligned with (the
      step function's third output), -1 after T; None unless decoded `with_alignment`.
    """

    sequences: jax.Array
    scores: jax.Array
    log_probs: jax.Array
    lengths: jax.Array
    token_log_probs: jax.Array
    valid: jax.Array
    alignments: jax.Array | None = None


class _Hypotheses(NamedTuple):
    """A set of `beam` hypotheses per sentence (arrays `[batch, beam, ...]`)."""

    tokens: jax.Array  # int32 [batch, beam, max_len]
    token_log_probs: jax.Array  # float32 [batch, beam, max_len]
    log_probs: jax.Array  # float32 [batch, beam], -inf for no hypothesis
    scores: jax.Array  # float32 [batch, beam], normalized (finished set only; -inf when alive)
    lengths: jax.Array  # int32 [batch, beam]
    alignments: jax.Array | None = None  # int32 [batch, beam, max_len] (with_alignment only)


def _take(hyps: _Hypotheses, index: jax.Array) -> _Hypotheses:
    """The hypotheses at `index [batch, k]` (into each sentence's beam axis)."""
    return jax.tree.map(
        lambda x: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1),
        hyps,
    )


def beam_search(
    step_fn,
    init_state: Any,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int = common.PAD_ID,
    batch_size: int,
    beam_size: int,
    max_len: int,
    alpha: float | jax.Array = 0.6,
    length_penalty: str = "gnmt",
    min_len: int = 0,
    max_lengths: jax.Array | None = None,
    no_repeat_ngram_size: int = 0,
    prefix: jax.Array | None = None,
    prefix_lengths: jax.Array | None = None,
    with_alignment: bool = False,
    beam_policy: str = "classic",
    stopping: str = "exact",
) -> BeamSearchResult:
    """The `beam_size`-best hypotheses of each sentence under `length_penalty`.

    Args:
      step_fn: `step_fn(tokens [N] int32, state) -> (logits [N, vocab], new_state)`, N = batch x beam;
        row n belongs to sentence n // beam. Models close it over their encoder memory (which keeps the
        sentence batch); only `state` is reordered between beams.
      init_state: pytree, every leaf `[batch, ...]`: the decoder state before BOS. It is repeated once
        to `[batch x beam, ...]`, and after each step gathered by rows to follow the hypotheses'
        parents, except under `decoding.BeamShared`.
      bos_id, eos_id, pad_id: token ids (Python ints, inside the vocabulary; BOS may be pad, EOS
        is neither). Pad and BOS are never generated; pad fills `sequences` after EOS.
      batch_size, beam_size, max_len: static shapes; one compilation per triple. max_len is the most
        tokens generated per hypothesis, EOS included.
      alpha: length-penalty exponent, traced (changing it does not recompile).
      length_penalty: "gnmt", "average" or "none" (static).
      min_len: EOS is blocked before this many tokens have been generated (static, < max_len).
      max_lengths: optional int `[batch]`, each sentence's own limit (traced; clipped to
        `[min_len + 1, max_len]`), e.g. from its source length: a hypothesis that reaches it is
        finished as at `max_len`, and the sentence stops there. The loop runs to the batch's
        largest limit at most, so sorting sentences by length into batches shortens most loops.
      no_repeat_ngram_size: n > 0 (static): no n-gram occurs twice in a hypothesis (a token that
        would complete one already in its prefix is blocked, EOS included); 0: off, at no cost.
      prefix: optional int `[batch, P]` (P static, < max_len; values traced, so a new prefix never
        recompiles), each sentence's forced first tokens, PAD after them; every hypothesis starts
        with them (n-gram blocking and min_len do not apply to forced tokens) and their
        log-probabilities count in its score. A sentence's limit is at least its prefix length + 1.
      prefix_lengths: optional int `[batch]`, the forced tokens of each row (default: up to the
        first PAD of `prefix`).
      with_alignment: static; `step_fn` then returns `(logits, new_state, alignment [N] int)`, the
        source position aligned with the token being predicted, kept per token (`alignments`).
        Off, nothing is collected and the loop is as without it.
      beam_policy: "classic" (an EOS extension takes one of the `beam_size` places) or "full"
        (`2 x beam_size` candidates, `beam_size` stay alive); static, see the module docstring.
      stopping: "exact", "heuristic" or "nbest" (static): when a sentence stops, see the module
        docstring.

    Returns:
      A `BeamSearchResult`. Usable under an outer `jax.jit` with the static arguments fixed.

    Raises:
      ValueError: a bad static argument, an id outside the vocabulary, or a state or step function
        whose shapes do not fit, before anything is traced.
    """
    common.check_positive(batch_size=batch_size, beam_size=beam_size, max_len=max_len)
    common.check_ngram_size(no_repeat_ngram_size)
    lp_lib.check_kind(length_penalty)
    check_policy(beam_policy, stopping)
    if not common.is_int(min_len) or not 0 <= min_len < max_len:
        raise ValueError(f"min_len={min_len!r} must be an int in [0, max_len={max_len})")
    common.check_batch(init_state, batch_size)
    batch, beam, rows = batch_size, beam_size, batch_size * beam_size
    vocab = common.probe_step_fn(step_fn, init_state, rows, with_alignment)
    common.check_token_ids(vocab, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
    prefix = common.check_prefix(
        prefix,
        prefix_lengths,
        batch_size=batch,
        max_len=max_len,
        vocab=vocab,
        pad_id=pad_id,
        bos_id=bos_id,
        eos_id=eos_id,
    )
    alpha = jnp.asarray(alpha, jnp.float32)
    limits = common.prefix_limits(
        common.sentence_limits(max_lengths, batch, max_len, min_len), prefix, max_len
    )  # [batch]
    max_penalty = lp_lib.penalty(limits, alpha, length_penalty)  # [batch]
    positions = jnp.arange(max_len)
    row_base = jnp.arange(batch)[:, None] * beam  # [batch, 1], the first row of each sentence
    width = 2 * beam if beam_policy == "full" else beam  # extensions ranked per step

    def stops(alive_log_probs: jax.Array, finished: _Hypotheses, length: jax.Array) -> jax.Array:
        """bool `[batch]`: the sentences that `stopping` stops, given their alive hypotheses'
        log-probabilities `[batch, beam]` (-inf: none) and length (a scalar), and their n-best
        (the worst score is -inf while a slot is empty)."""
        if stopping == "nbest":
            return finished.scores[:, -1] > -jnp.inf
        if stopping == "heuristic":
            bound = jnp.max(alive_log_probs, axis=1) / lp_lib.penalty(length, alpha, length_penalty)
        else:
            bound = jnp.max(alive_log_probs, axis=1) / jnp.maximum(
                lp_lib.penalty(length + 1, alpha, length_penalty), max_penalty
            )
        return bound <= finished.scores[:, -1]

    def empty(first_log_prob: float) -> _Hypotheses:
        log_probs = jnp.full((batch, beam), -jnp.inf).at[:, 0].set(first_log_prob)
        return _Hypotheses(
            tokens=jnp.zeros((batch, beam, max_len), jnp.int32),
            token_log_probs=jnp.zeros((batch, beam, max_len), jnp.float32),
            log_probs=log_probs,
            scores=jnp.full((batch, beam), -jnp.inf),
            lengths=jnp.zeros((batch, beam), jnp.int32),
            alignments=jnp.full((batch, beam, max_len), -1, jnp.int32) if with_alignment else None,
        )

    def cond(carry):
        step, _, _, _, _, done = carry
        return (step < max_len) & ~jnp.all(done)

    def body(carry):
        step, tokens, state, alive, finished, done = carry
        logits, new_state, *alignment = step_fn(tokens, state)
        log_probs = common.log_probs(logits).reshape(batch, beam, vocab)
        allowed = common.search_mask(
            log_probs, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, block_eos=step < min_len
        )
        if no_repeat_ngram_size:
            prefixes = alive.tokens.reshape(rows, max_len)
            blocked = common.repeated_ngrams(prefixes, step, no_repeat_ngram_size, vocab)
            allowed = jnp.where(blocked.reshape(batch, beam, vocab), -jnp.inf, allowed)
        if prefix is not None:
            allowed = common.force_prefix(allowed, log_probs, step, prefix)
        # One top-k over every extension of every alive prefix of a sentence.
        candidates = (alive.log_probs[:, :, None] + allowed).reshape(batch, beam * vocab)
        top_log_probs, top_index = common.top_k(candidates, width)  # [batch, width]
        parent, token = top_index // vocab, top_index % vocab
        token_log_prob = jnp.take_along_axis(log_probs.reshape(batch, -1), top_index, axis=1)
        length = step + 1
        at_step = positions == step
        parents = _take(alive, parent)
        extended = _Hypotheses(
            tokens=jnp.where(at_step, token[..., None], parents.tokens),
            token_log_probs=jnp.where(at_step, token_log_prob[..., None], parents.token_log_probs),
            log_probs=top_log_probs,
            scores=lp_lib.normalize(top_log_probs, length, alpha, length_penalty),
            lengths=jnp.full((batch, width), length, jnp.int32),
        )
        if with_alignment:  # the alignment of each extension's new token: its parent row's
            aligned = jnp.take_along_axis(alignment[0].reshape(batch, beam), parent, axis=1)
            extended = extended._replace(
                alignments=jnp.where(
                    at_step, aligned[..., None].astype(jnp.int32), parents.alignments
                )
            )
        ends = (token == eos_id) | (length >= limits[:, None])
        # "full": only the first `beam` candidates may finish; those ranked below them are dropped.
        collected = ends & (jnp.arange(width) < beam) if beam_policy == "full" else ends

        # Finished: merge the new complete hypotheses into the n-best (old ones first, so ties keep them).
        merged = jax.tree.map(
            lambda old, new: jnp.concatenate([old, new], axis=1),
            finished,
            extended._replace(scores=jnp.where(collected, extended.scores, -jnp.inf)),
        )
        finished = _take(merged, jax.lax.top_k(merged.scores, beam)[1])

        # Alive: the extensions that did not end ("full": the `beam` best of them); a stopped
        # sentence keeps no alive hypothesis.
        alive_log_probs = jnp.where(ends, -jnp.inf, top_log_probs)
        if beam_policy == "full":
            kept = jax.lax.top_k(alive_log_probs, beam)[1]  # [batch, beam], best first
            alive_log_probs = jnp.take_along_axis(alive_log_probs, kept, axis=1)
            parent = jnp.take_along_axis(parent, kept, axis=1)
            token = jnp.take_along_axis(token, kept, axis=1)
            extended = _take(extended, kept)
        done = done | stops(alive_log_probs, finished, length) | (length >= limits)
        alive = extended._replace(
            log_probs=jnp.where(done[:, None], -jnp.inf, alive_log_probs),
            scores=jnp.full((batch, beam), -jnp.inf),
        )
        if beam > 1:  # reorder the decoder state: row b * beam + k continues its parent's row
            rows_from = (row_base + parent).reshape(rows)
            new_state = jax.tree.map(
                lambda x: x if isinstance(x, common.BeamShared) else jnp.take(x, rows_from, axis=0),
                new_state,
                is_leaf=lambda x: isinstance(x, common.BeamShared),
            )
        return step + 1, token.reshape(rows), new_state, alive, finished, done

    carry = (
        jnp.int32(0),
        jnp.full((rows,), bos_id, jnp.int32),
        common.repeat_rows(init_state, beam),
        empty(0.0),  # one alive hypothesis (BOS) per sentence, so no duplicates at the first step
        empty(-jnp.inf),
        jnp.zeros((batch,), bool),
    )
    finished = jax.lax.while_loop(cond, body, carry)[4]
    valid = finished.scores > -jnp.inf
    return BeamSearchResult(
        sequences=jnp.where(valid[..., None], finished.tokens, pad_id),
        scores=finished.scores,
        log_probs=jnp.where(valid, finished.log_probs, -jnp.inf),
        lengths=jnp.where(valid, finished.lengths, 0),
        token_log_probs=jnp.where(valid[..., None], finished.token_log_probs, 0.0),
        valid=valid,
        alignments=None
        if finished.alignments is None
        else jnp.where(valid[..., None], finished.alignments, -1),
    )


def check_policy(beam_policy: str, stopping: str) -> None:
    """Raises a one-line ValueError unless `beam_policy` is in `POLICIES` and `stopping` in
    `STOPPING`."""
    if beam_policy not in POLICIES:
        raise ValueError(
            f"beam_policy={beam_policy!r} is not supported: use one of {', '.join(POLICIES)}"
        )
    if stopping not in STOPPING:
        raise ValueError(
            f"stopping={stopping!r} is not supported: use one of {', '.join(STOPPING)}"
        )
