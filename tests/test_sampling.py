"""decoding/sampling.py: reproducibility per example, truncation, the sampled distribution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HASH_ROWS, prefix_hash_step_fn, prefix_log_probs

import decoding
from decoding.sampling import truncate

BOS, EOS = 1, 2
ROWS, VOCAB = HASH_ROWS, 8
TABLE = jax.random.normal(jax.random.key(0), (ROWS, VOCAB)) + jnp.array([1.0, 1.0] + [0] * 6)


TRACES = {"sample": 0}


@functools.partial(jax.jit, static_argnames=("max_len", "no_repeat_ngram_size"))
def run_sample(
    h,
    example_ids,
    rng,
    temperature,
    top_k,
    top_p,
    prefix=None,
    *,
    max_len=6,
    no_repeat_ngram_size=0,
):
    TRACES["sample"] += 1
    return decoding.sample(
        prefix_hash_step_fn(TABLE),
        h,
        bos_id=BOS,
        eos_id=EOS,
        batch_size=h.shape[0],
        max_len=max_len,
        rng=rng,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        example_ids=example_ids,
        no_repeat_ngram_size=no_repeat_ngram_size,
        prefix=prefix,
    )


PLAIN = (1.0, 0, 1.0)  # temperature, top_k, top_p: sampling from the model as it is


def sentences(n, seed=0):
    return (jnp.arange(n, dtype=jnp.int32) * 7 + seed) % ROWS


def test_a_sample_depends_on_its_example_id_and_the_seed_not_on_the_batch():
    rng, h = jax.random.key(42), sentences(4)
    batch = run_sample(h, jnp.array([10, 11, 12, 13]), rng, *PLAIN)
    mixed = run_sample(h.at[0].set(50).at[3].set(60), jnp.array([20, 11, 12, 21]), rng, *PLAIN)
    alone = run_sample(h[2:3], jnp.array([12]), rng, *PLAIN)
    for result in (batch, mixed):
        for got, want in zip(result[:4], alone[:4], strict=True):  # alignments are None
            np.testing.assert_array_equal(got[2], want[0])
    again = run_sample(h, jnp.array([10, 11, 12, 13]), jax.random.key(42), *PLAIN)
    np.testing.assert_array_equal(again.sequences, batch.sequences)
    other_seed = run_sample(h, jnp.array([10, 11, 12, 13]), jax.random.key(43), *PLAIN)
    other_ids = run_sample(h, jnp.array([0, 1, 2, 3]), rng, *PLAIN)
    assert not np.array_equal(other_seed.sequences, batch.sequences)
    assert not np.array_equal(other_ids.sequences, batch.sequences)


def test_default_example_ids_are_the_batch_positions_and_raw_keys_work():
    h = sentences(4)
    default = decoding.sample(
        prefix_hash_step_fn(TABLE),
        h,
        bos_id=BOS,
        eos_id=EOS,
        batch_size=4,
        max_len=6,
        rng=jax.random.PRNGKey(5),
    )
    explicit = run_sample(h, jnp.arange(4), jax.random.PRNGKey(5), *PLAIN)
    np.testing.assert_array_equal(default.sequences, explicit.sequences)


def test_top_k_one_is_greedy_and_log_probs_are_the_models():
    h = sentences(16)
    sampled = run_sample(h, jnp.arange(16), jax.random.key(0), 0.5, 1, 1.0)
    greedy = decoding.greedy(
        prefix_hash_step_fn(TABLE), h, bos_id=BOS, eos_id=EOS, batch_size=16, max_len=6
    )
    np.testing.assert_array_equal(sampled.sequences, greedy.sequences)
    # log-probabilities are the model's: not tempered, not truncated.
    for b in range(16):
        length = int(sampled.lengths[b])
        tokens = np.asarray(sampled.sequences[b, :length])
        expected = prefix_log_probs(TABLE, int(h[b]), tokens)[np.arange(length), tokens]
        np.testing.assert_allclose(sampled.token_log_probs[b, :length], expected, rtol=1e-5)
        np.testing.assert_allclose(sampled.log_probs[b], expected.sum(), rtol=1e-5)


def support_ranks(result, h):
    """For every sampled token: (its rank among allowed tokens, the probability mass ranked above it)."""
    ranks, mass_above = [], []
    for b in range(len(h)):
        length = int(result.lengths[b])
        tokens = np.asarray(result.sequences[b, :length])
        for log_probs, token in zip(
            prefix_log_probs(TABLE, int(h[b]), tokens), tokens, strict=True
        ):
            log_probs[[0, BOS]] = -np.inf
            probs = np.exp(log_probs) / np.exp(log_probs).sum()
            ranks.append(int(np.sum(probs > probs[token])))
            mass_above.append(float(np.sum(probs[probs > probs[token]])))
    return np.array(ranks), np.array(mass_above)


def test_samples_stay_inside_top_k_and_top_p():
    h, ids, rng = sentences(64, seed=3), jnp.arange(64), jax.random.key(1)
    ranks, mass_above = support_ranks(run_sample(h, ids, rng, *PLAIN), h)
    assert ranks.max() >= 3 and mass_above.max() >= 0.6, "untruncated samples must go beyond"
    ranks, _ = support_ranks(run_sample(h, ids, rng, 1.0, 3, 1.0), h)
    assert ranks.max() <= 2
    _, mass_above = support_ranks(run_sample(h, ids, rng, 1.0, 0, 0.6), h)
    assert mass_above.max() < 0.6


def test_first_tokens_follow_the_tempered_distribution_and_scalars_do_not_retrace():
    n = 4000
    h, ids = jnp.full((n,), 9, jnp.int32), jnp.arange(n)
    log_probs = prefix_log_probs(TABLE, 9, [0])[0]
    log_probs[[0, BOS]] = -np.inf
    run_sample(h, ids, jax.random.key(7), 1.0, 0, 1.0, max_len=1)
    traced = TRACES["sample"]
    for temperature in (1.0, 0.5, 2.0):
        result = run_sample(h, ids, jax.random.key(7), temperature, 0, 1.0, max_len=1)
        counts = np.bincount(np.asarray(result.sequences[:, 0]), minlength=VOCAB)
        expected = np.exp(log_probs / temperature)
        expected /= expected.sum()
        assert 0.5 * np.abs(counts / n - expected).sum() < 0.03  # total variation distance
    run_sample(h, ids, jax.random.key(7), 1.0, 4, 0.9, max_len=1)
    assert TRACES["sample"] == traced, "temperature, top_k and top_p must not retrace"


def test_truncate_keeps_the_top_k_then_the_nucleus():
    log_probs = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25], [0.25, 0.25, 0.4, 0.1]]))
    kept = lambda top_k, top_p: np.isfinite(truncate(log_probs, 1.0, top_k, top_p))
    np.testing.assert_array_equal(kept(0, 1.0), np.ones((2, 4), bool))
    np.testing.assert_array_equal(kept(2, 1.0), [[0, 1, 0, 1], [1, 0, 1, 0]])  # ties: lower id
    np.testing.assert_array_equal(kept(0, 0.5), [[0, 1, 0, 0], [1, 0, 1, 0]])
    np.testing.assert_array_equal(kept(0, 0.7), [[0, 1, 0, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(kept(0, 0.01), [[0, 1, 0, 0], [0, 0, 1, 0]])
    # top_p applies to the distribution renormalized over the top-k: 0.4 / 0.65 > 0.6.
    np.testing.assert_array_equal(kept(0, 0.6), [[0, 1, 0, 1], [1, 0, 1, 0]])
    np.testing.assert_array_equal(kept(2, 0.6), [[0, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_allclose(truncate(log_probs, 2.0, 0, 1.0), log_probs / 2.0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(temperature=0.0), "temperature=0.0 must be > 0"),
        (dict(top_k=-1), "top_k=-1 must be >= 0"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(rng=3), "rng must be one JAX PRNG key"),
        (dict(rng=jax.random.split(jax.random.key(0))), "rng must be one JAX PRNG key"),
        (dict(example_ids=jnp.arange(3)), r"example_ids has shape \(3,\)"),
        (dict(max_len=0), "max_len=0 must be a positive integer"),
        (dict(eos_id=VOCAB), "eos_id=8 is outside the vocabulary"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(change, message):
    kwargs = dict(bos_id=BOS, eos_id=EOS, batch_size=4, max_len=3, rng=jax.random.key(0))
    with pytest.raises(ValueError, match=message) as error:
        decoding.sample(prefix_hash_step_fn(TABLE), sentences(4), **{**kwargs, **change})
    assert "\n" not in str(error.value)


def test_no_repeat_ngram_samples_never_repeat_and_keep_the_models_log_probs():
    h, ids, rng = sentences(64, seed=5), jnp.arange(64), jax.random.key(2)
    free = run_sample(h, ids, rng, *PLAIN, max_len=10)
    blocked = run_sample(h, ids, rng, *PLAIN, max_len=10, no_repeat_ngram_size=2)

    def repeats(result, b):
        row = np.asarray(result.sequences[b, : int(result.lengths[b])]).tolist()
        grams = list(zip(row, row[1:]))
        return len(grams) != len(set(grams))

    assert any(repeats(free, b) for b in range(64)), "the test needs repeating samples"
    assert not any(repeats(blocked, b) for b in range(64))
    for b in range(64):
        length = int(blocked.lengths[b])
        tokens = np.asarray(blocked.sequences[b, :length])
        expected = prefix_log_probs(TABLE, int(h[b]), tokens)[np.arange(length), tokens]
        np.testing.assert_allclose(blocked.token_log_probs[b, :length], expected, rtol=1e-5)


def test_samples_follow_their_forced_prefix_and_keep_the_models_log_probs():
    h, ids, rng = sentences(32, seed=3), jnp.arange(32), jax.random.key(4)
    prefix = jnp.tile(jnp.array([[7, 6, 0], [5, 0, 0], [0, 0, 0], [3, 3, 3]]), (8, 1))
    result = run_sample(h, ids, rng, 0.7, 3, 0.9, prefix, max_len=8)
    free = run_sample(h, ids, rng, 0.7, 3, 0.9, max_len=8)
    differs = 0
    for b in range(32):
        forced = [int(t) for t in prefix[b] if t]
        length = int(result.lengths[b])
        tokens = np.asarray(result.sequences[b, :length])
        assert tokens[: len(forced)].tolist() == forced and length > len(forced)
        expected = prefix_log_probs(TABLE, int(h[b]), tokens)[np.arange(length), tokens]
        np.testing.assert_allclose(result.token_log_probs[b, :length], expected, rtol=1e-5)
        differs += forced != np.asarray(free.sequences[b, : len(forced)]).tolist()
    assert differs > 8, "the test needs prefixes the free samples do not start with"
    # Reproducible per sentence: the same sentences in another batch sample the same.
    again = run_sample(h[::-1], ids[::-1], rng, 0.7, 3, 0.9, prefix[::-1], max_len=8)
    np.testing.assert_array_equal(again.sequences[::-1], result.sequences)
