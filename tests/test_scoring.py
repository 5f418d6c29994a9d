"""decoding/scoring.py and decoding/length_penalty.py against numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HASH_ROWS, prefix_hash_step_fn, prefix_log_probs

import decoding
from decoding import length_penalty
from decoding.scoring import sequence_lengths

BOS, EOS = 1, 2
ROWS = HASH_ROWS
TABLE = 2.0 * jax.random.normal(jax.random.key(0), (ROWS, 6))


TRACES = {"score": 0}


@functools.partial(jax.jit, static_argnames=("length_penalty",))
def run_score(table, h, targets, alpha, *, length_penalty):
    TRACES["score"] += 1
    return decoding.score(
        prefix_hash_step_fn(table),
        h,
        targets,
        bos_id=BOS,
        eos_id=EOS,
        alpha=alpha,
        length_penalty=length_penalty,
    )


TARGETS = np.array(
    [
        [3, 4, EOS, 0, 0],  # EOS then padding: T = 3
        [5, 3, 4, 5, 3],  # cut at max_len without EOS: T = 5
        [EOS, 0, 0, 0, 0],  # EOS at once: T = 1
        [4, 4, 0, 0, 0],  # padding without EOS: T = 2
        [3, EOS, 5, EOS, 0],  # tokens after the first EOS do not count: T = 2
    ],
    np.int32,
)
LENGTHS = [3, 5, 1, 2, 2]


def test_sequence_lengths_count_eos_but_not_padding():
    np.testing.assert_array_equal(sequence_lengths(TARGETS, EOS), LENGTHS)
    np.testing.assert_array_equal(
        sequence_lengths(np.array([[3, 0, EOS, 0], [0, 0, 0, 0], [3, 4, 5, EOS]]), EOS), [1, 0, 4]
    )


@pytest.mark.parametrize(
    "kind, alpha, divisor",
    [
        ("none", 0.7, lambda t, a: np.ones_like(t)),
        ("average", 0.7, lambda t, a: t**a),
        ("gnmt", 0.7, lambda t, a: ((5 + t) / 6) ** a),
    ],
)
def test_score_matches_the_reference_under_every_length_penalty(kind, alpha, divisor):
    h = jnp.array([3, 7, 11, 13, 17], jnp.int32)
    result = run_score(TABLE, h, TARGETS, alpha, length_penalty=kind)
    np.testing.assert_array_equal(result.lengths, LENGTHS)
    for b, length in enumerate(LENGTHS):
        tokens = TARGETS[b, :length]
        expected = prefix_log_probs(TABLE, int(h[b]), tokens)[np.arange(length), tokens]
        np.testing.assert_allclose(result.token_log_probs[b, :length], expected, rtol=1e-5)
        assert not np.any(result.token_log_probs[b, length:])
        np.testing.assert_allclose(result.log_probs[b], expected.sum(), rtol=1e-5)
        np.testing.assert_allclose(
            result.scores[b], expected.sum() / divisor(np.float64(length), alpha), rtol=1e-5
        )


def test_alpha_zero_is_no_normalization_and_alpha_is_traced():
    h = jnp.arange(5, dtype=jnp.int32)
    plain = run_score(TABLE, h, TARGETS, 0.0, length_penalty="none")
    for kind in ("average", "gnmt"):
        zero = run_score(TABLE, h, TARGETS, 0.0, length_penalty=kind)
        np.testing.assert_allclose(zero.scores, plain.scores, rtol=1e-6)
        traced = TRACES["score"]
        scores = [run_score(TABLE, h, TARGETS, a, length_penalty=kind).scores for a in (0.5, 1.5)]
        assert TRACES["score"] == traced, "changing alpha must not retrace"
        assert not np.allclose(scores[0], scores[1])


def test_penalty_values():
    lengths = jnp.array([0, 1, 4, 9])
    np.testing.assert_allclose(length_penalty.penalty(lengths, 0.5, "average"), [1, 1, 2, 3])
    np.testing.assert_allclose(length_penalty.penalty(lengths, 1.0, "gnmt"), [1, 1, 1.5, 14 / 6])
    np.testing.assert_allclose(length_penalty.penalty(lengths, 2.0, "none"), [1, 1, 1, 1])
    assert length_penalty.normalize(jnp.float32(-jnp.inf), 3, 0.6, "gnmt") == -jnp.inf


@pytest.mark.parametrize(
    "targets, kwargs, message",
    [
        (TARGETS[0], {}, r"targets must be non-empty int token ids \[batch, T\], got int32\(5,\)"),
        (TARGETS.astype(np.float32), {}, "targets must be non-empty int token ids"),
        (TARGETS + 3, {}, r"targets hold ids in \[3, 8\], outside the vocabulary \[0, 6\)"),
        (TARGETS, dict(eos_id=6), r"eos_id=6 is outside the vocabulary"),
        (TARGETS, dict(length_penalty="norm"), "length_penalty='norm' is not supported"),
        (TARGETS[:2], {}, r"init_state has shape \(5,\): every leaf must have the batch \(2\)"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(targets, kwargs, message):
    kwargs = {**dict(bos_id=BOS, eos_id=EOS), **kwargs}
    with pytest.raises(ValueError, match=message) as error:
        decoding.score(prefix_hash_step_fn(TABLE), jnp.zeros(5, jnp.int32), targets, **kwargs)
    assert "\n" not in str(error.value)


def test_unknown_length_penalty_kind_is_a_value_error():
    with pytest.raises(ValueError, match="use one of none, average, gnmt"):
        length_penalty.penalty(jnp.ones(2), 0.6, "wu")
