"""decoding/greedy.py against a step-by-step numpy reference, on a model-free step function."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HASH_ROWS, counting_steps, prefix_hash_step_fn

import decoding

BOS, EOS = 1, 2
ROWS = HASH_ROWS


def reference_greedy(table, h, max_len, no_repeat_ngram_size=0, prefix=()):
    """Greedy decoding of one sentence in plain numpy: (tokens, token log-probs, alignments). With
    `no_repeat_ngram_size` n, a token that would complete an n-gram already generated is skipped; the
    tokens of `prefix` come first whatever their probability. The alignment of a token is the state
    hash that predicts it, mod 5 (`aligning_step_fn`)."""
    table = np.asarray(table, np.float64)
    token, tokens, token_log_probs, alignments = BOS, [], [], []
    n = no_repeat_ngram_size
    while len(tokens) < max_len and token != EOS:
        h = (h * 31 + token + 1) % ROWS
        alignments.append(h % 5)
        if len(tokens) < len(prefix):
            token = prefix[len(tokens)]
            tokens.append(token)
            token_log_probs.append(table[h, token] - np.log(np.sum(np.exp(table[h]))))
            continue
        log_probs = table[h] - np.log(np.sum(np.exp(table[h])))
        allowed = log_probs.copy()
        allowed[[0, BOS]] = -np.inf
        if n:
            context = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
            for start in range(len(tokens) - n + 1):
                if tuple(tokens[start : start + n - 1]) == context:
                    allowed[tokens[start + n - 1]] = -np.inf
        token = int(np.argmax(allowed))
        tokens.append(token)
        token_log_probs.append(log_probs[token])
    return tokens, token_log_probs, alignments


def aligning_step_fn(table):
    """`prefix_hash_step_fn` that also returns an alignment, the new hash mod 5."""
    step_fn = prefix_hash_step_fn(table)

    def aligned(tokens, h):
        logits, h = step_fn(tokens, h)
        return logits, h, h % 5

    return aligned


TRACES = {"greedy": 0}


@functools.partial(jax.jit, static_argnames=("max_len", "no_repeat_ngram_size", "with_alignment"))
def run_greedy(table, h, prefix=None, *, max_len, no_repeat_ngram_size=0, with_alignment=False):
    TRACES["greedy"] += 1
    return decoding.greedy(
        aligning_step_fn(table) if with_alignment else prefix_hash_step_fn(table),
        h,
        bos_id=BOS,
        eos_id=EOS,
        batch_size=h.shape[0],
        max_len=max_len,
        no_repeat_ngram_size=no_repeat_ngram_size,
        prefix=prefix,
        with_alignment=with_alignment,
    )


# pad and BOS are the likeliest tokens, and EOS likely enough for varied lengths.
TABLE = 2.0 * jax.random.normal(jax.random.key(0), (ROWS, 8)) + jnp.array([5.0, 5.0, 1.0] + [0] * 5)


def test_greedy_matches_the_step_by_step_reference():
    h = jnp.arange(16, dtype=jnp.int32) * 5
    result = run_greedy(TABLE, h, max_len=6)
    assert result.sequences.shape == (16, 6) and result.sequences.dtype == jnp.int32
    lengths = []
    for b in range(16):
        tokens, token_log_probs, _ = reference_greedy(TABLE, int(h[b]), 6)
        lengths.append(len(tokens))
        np.testing.assert_array_equal(result.sequences[b], tokens + [0] * (6 - len(tokens)))
        assert result.lengths[b] == len(tokens)
        np.testing.assert_allclose(result.token_log_probs[b, : len(tokens)], token_log_probs, 1e-5)
        assert not np.any(result.token_log_probs[b, len(tokens) :])
        np.testing.assert_allclose(result.log_probs[b], sum(token_log_probs), rtol=1e-5)
    assert min(lengths) < 6 and max(lengths) == 6, "the test needs EOS-ended and cut sentences"
    assert not np.any(np.isin(result.sequences, [BOS])), "BOS is never generated"
    assert result.alignments is None


def test_a_forced_prefix_comes_first_counts_in_the_score_and_never_recompiles():
    h = jnp.arange(6, dtype=jnp.int32) * 5
    # Per-sentence prefixes of 0 to 3 tokens (PAD after), unlikely tokens included.
    prefix = jnp.array([[0, 0, 0], [5, 0, 0], [7, 7, 0], [3, 4, 5], [6, 0, 0], [4, 3, 0]])
    result = run_greedy(TABLE, h, prefix, max_len=6)
    traces = TRACES["greedy"]
    followed = 0
    for b in range(6):
        forced = [int(t) for t in prefix[b] if t]
        tokens, token_log_probs, _ = reference_greedy(TABLE, int(h[b]), 6, prefix=forced)
        np.testing.assert_array_equal(result.sequences[b], tokens + [0] * (6 - len(tokens)))
        np.testing.assert_allclose(result.token_log_probs[b, : len(tokens)], token_log_probs, 1e-5)
        np.testing.assert_allclose(result.log_probs[b], sum(token_log_probs), rtol=1e-5)
        followed += tokens[: len(forced)] != reference_greedy(TABLE, int(h[b]), 6)[0][: len(forced)]
    assert followed >= 3, "the test needs prefixes that greedy would not have chosen"
    scored = decoding.score(
        prefix_hash_step_fn(TABLE),
        h,
        result.sequences,
        bos_id=BOS,
        eos_id=EOS,
        alpha=0.0,
        length_penalty="none",
    )
    np.testing.assert_allclose(scored.log_probs, result.log_probs, rtol=1e-5)
    run_greedy(TABLE, h, prefix[::-1], max_len=6)
    assert TRACES["greedy"] == traces, "a new prefix of the same shape must not recompile"


def test_alignments_are_collected_per_token_only_when_asked():
    h = jnp.arange(8, dtype=jnp.int32) * 7
    result = run_greedy(TABLE, h, max_len=6, with_alignment=True)
    plain = run_greedy(TABLE, h, max_len=6)
    np.testing.assert_array_equal(result.sequences, plain.sequences)
    for b in range(8):
        tokens, _, alignments = reference_greedy(TABLE, int(h[b]), 6)
        expected = alignments + [-1] * (6 - len(tokens))
        np.testing.assert_array_equal(result.alignments[b], expected)


def test_greedy_stops_when_every_sentence_has_ended():
    steps = []

    @jax.jit
    def run(table, h):
        counted = counting_steps(prefix_hash_step_fn(table), steps)
        return decoding.greedy(counted, h, bos_id=BOS, eos_id=EOS, batch_size=3, max_len=50)

    eos_table = TABLE.at[:, EOS].add(3.0)
    result = jax.block_until_ready(run(eos_table, jnp.array([0, 1, 2], jnp.int32)))
    assert len(steps) == int(np.max(result.lengths)) < 50


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(max_len=0), "max_len=0 must be a positive integer"),
        (dict(batch_size=4), r"init_state has shape \(3,\): every leaf must have the batch \(4\)"),
        (dict(eos_id=8), r"eos_id=8 is outside the vocabulary: use an id in \[0, 8\)"),
        (dict(eos_id=0), "eos_id must differ from pad_id and bos_id"),
        (dict(pad_id=-1), "pad_id=-1 is outside the vocabulary"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size=-1 must be an int >= 1"),
        (dict(prefix=jnp.ones((3, 4), jnp.int32) * 5), "a prefix of 4 tokens leaves no room under"),
        (
            dict(prefix=jnp.array([[5, 9], [5, 0], [0, 0]])),
            r"holds id 9, outside the vocab.*\[0, 8\)",
        ),
        (dict(prefix=jnp.array([[5, 2], [5, 0], [0, 0]])), r"forces EOS \(id 2\): a prefix holds"),
        (dict(prefix=jnp.ones((2, 2), jnp.int32)), r"prefix has shape \(2, 2\).*\[batch=3, P\]"),
        (
            dict(prefix=jnp.ones((3, 2), jnp.int32) * 5, prefix_lengths=jnp.array([0, 3, 1])),
            r"prefix_lengths must lie in \[0, P=2\]",
        ),
        (dict(prefix_lengths=jnp.array([0, 1, 1])), "prefix_lengths given without a prefix"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(change, message):
    kwargs = dict(bos_id=BOS, eos_id=EOS, batch_size=3, max_len=4)
    with pytest.raises(ValueError, match=message) as error:
        decoding.greedy(prefix_hash_step_fn(TABLE), jnp.zeros(3, jnp.int32), **{**kwargs, **change})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_greedy_matches_the_step_by_step_reference(n):
    # Few content tokens and long outputs: the unblocked greedy path repeats itself.
    table = 2.0 * jax.random.normal(jax.random.key(5), (ROWS, 6)) + jnp.array([0, 0, -3.0, 0, 0, 0])
    h = jnp.arange(16, dtype=jnp.int32) * 3
    result = run_greedy(table, h, max_len=8, no_repeat_ngram_size=n)
    changed = 0
    for b in range(16):
        tokens, token_log_probs, _ = reference_greedy(table, int(h[b]), 8, n)
        np.testing.assert_array_equal(result.sequences[b], tokens + [0] * (8 - len(tokens)))
        np.testing.assert_allclose(result.token_log_probs[b, : len(tokens)], token_log_probs, 1e-5)
        changed += tokens != reference_greedy(table, int(h[b]), 8)[0]
    assert changed > 0, "the test needs sentences that blocking changes"
