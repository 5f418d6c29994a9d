"""decoding/beam_search.py under constraints, on model-free step functions: min_len, blocked repeated
n-grams, forced prefixes (each against brute force and together), and the alignments it carries.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from beam_scaffolding import (
    BOS,
    EOS,
    PENALTIES,
    ROWS,
    TRACES,
    all_sequences,
    brute_force,
    init_state,
    random_table,
    rescore,
    run_beam,
)


def test_min_len_blocks_eos_and_pad_and_bos_are_never_generated():
    # EOS, pad and BOS are the likeliest tokens of this table.
    table, sentences = random_table(5, 6, bias=[4.0, 4.0, 3.0, 0, 0, 0]), list(range(6))
    free = run_beam(table, init_state(sentences), 0.6, beam_size=4, max_len=7)
    held = run_beam(table, init_state(sentences), 0.6, beam_size=4, max_len=7, min_len=3)
    assert np.any(free.lengths < 4), "without min_len some hypotheses must end before 4 tokens"
    assert np.all(held.valid) and np.all(held.lengths >= 4)
    assert not np.any(held.sequences[:, :, :3] == EOS)
    for result in (free, held):
        within = np.arange(7) < np.asarray(result.lengths)[..., None]
        assert not np.any(np.isin(np.asarray(result.sequences)[within], [0, BOS]))
    # Blocking EOS does not renormalize: the scores are still the model's.
    scored = rescore(table, held, sentences, 0.6, "gnmt")
    np.testing.assert_allclose(held.scores, scored.scores, rtol=1e-5)


def repeats_an_ngram(tokens, n: int) -> bool:
    """Whether the hypothesis `tokens` (up to and including EOS) holds some n-gram twice."""
    body = list(tokens)
    if EOS in body:
        body = body[: body.index(EOS) + 1]
    else:
        body = [t for t in body if t != 0]
    grams = [tuple(body[i : i + n]) for i in range(len(body) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("length_penalty, alpha", PENALTIES)
def test_no_repeat_ngram_beam_search_returns_exactly_the_brute_force_ranking(
    n, length_penalty, alpha
):
    # vocab 6 (three content tokens), max_len 4: 121 hypotheses and at most 27 alive prefixes x 4
    # tokens per step, so a beam of 128 prunes nothing: it returns every hypothesis without a
    # repeated n-gram, ranked like brute force over that set.
    table, sentences = random_table(3, 6), [0, 1]
    result = run_beam(
        table,
        init_state(sentences),
        alpha,
        beam_size=128,
        max_len=4,
        length_penalty=length_penalty,
        no_repeat_ngram_size=n,
    )
    everything = all_sequences(6, 4)
    allowed = everything[[not repeats_an_ngram(row, n) for row in everything]]
    assert 0 < len(allowed) < len(everything)
    for b, sentence in enumerate(sentences):
        exact = brute_force(table, sentence, allowed, alpha, length_penalty)
        order = np.argsort(-exact)
        np.testing.assert_array_equal(result.valid[b], np.arange(128) < len(allowed))
        np.testing.assert_array_equal(result.sequences[b, : len(allowed)], allowed[order])
        np.testing.assert_allclose(result.scores[b, : len(allowed)], exact[order], rtol=1e-5)
    # The returned log-probabilities stay the model's own: decoding.score agrees.
    rescored = rescore(table, result, sentences, alpha, length_penalty)
    valid = np.asarray(result.valid)
    np.testing.assert_allclose(rescored.scores[valid], np.asarray(result.scores)[valid], rtol=1e-5)


def test_no_repeat_ngram_composes_with_min_len_and_sentence_limits():
    table, sentences = random_table(4, 7, bias=[0, 0, -2.0, 3.0, 0, 0, 0]), list(range(8))
    limits = jnp.array([3, 4, 5, 6, 6, 5, 4, 3])
    blocked = run_beam(
        table,
        init_state(sentences),
        0.6,
        limits,
        beam_size=4,
        max_len=6,
        min_len=2,
        no_repeat_ngram_size=2,
    )
    free = run_beam(table, init_state(sentences), 0.6, limits, beam_size=4, max_len=6, min_len=2)
    valid = np.asarray(blocked.valid)
    assert not any(repeats_an_ngram(row, 2) for row in np.asarray(blocked.sequences)[valid])
    assert any(
        repeats_an_ngram(row, 2) for row in np.asarray(free.sequences)[np.asarray(free.valid)]
    )
    lengths = np.asarray(blocked.lengths)
    assert np.all(lengths[valid] >= 3) and np.all(lengths <= np.asarray(limits)[:, None])


def test_a_forced_prefix_beam_search_returns_exactly_the_brute_force_ranking_of_its_completions():
    # vocab 6, max_len 4: every hypothesis that starts with the sentence's prefix (of 0, 1 or 2
    # tokens, traced in one compilation), ranked like brute force; the prefix counts in the score.
    table, sentences, alpha = random_table(7, 6), [0, 1, 2], 0.6
    prefix = jnp.array([[0, 0], [4, 0], [5, 3]])
    result = run_beam(table, init_state(sentences), alpha, None, prefix, beam_size=128, max_len=4)
    everything = all_sequences(6, 4)
    for b, sentence in enumerate(sentences):
        forced = [int(t) for t in prefix[b] if t]
        allowed = everything[np.all(everything[:, : len(forced)] == forced, axis=1)]
        allowed = allowed[(allowed != EOS).sum(1) >= len(forced)]  # EOS never inside the prefix
        exact = brute_force(table, sentence, allowed, alpha, "gnmt")
        order = np.argsort(-exact)
        np.testing.assert_array_equal(result.valid[b], np.arange(128) < len(allowed))
        np.testing.assert_array_equal(result.sequences[b, : len(allowed)], allowed[order])
        np.testing.assert_allclose(result.scores[b, : len(allowed)], exact[order], rtol=1e-5)
    rescored = rescore(table, result, sentences, alpha, "gnmt")
    valid = np.asarray(result.valid)
    np.testing.assert_allclose(rescored.log_probs[valid], np.asarray(result.log_probs)[valid], 1e-5)
    traces = TRACES["beam"]
    run_beam(table, init_state(sentences), alpha, None, prefix[::-1], beam_size=128, max_len=4)
    assert TRACES["beam"] == traces, "a new prefix of the same shape must not recompile"


def test_a_forced_prefix_composes_with_min_len_limits_and_ngram_blocking():
    # A prefix that repeats a 2-gram is still followed (forced tokens are not blocked); the free
    # tokens after it never repeat one; each sentence's limit leaves room for EOS after its prefix.
    table, sentences = random_table(8, 7, bias=[0, 0, -1.0, 0, 0, 0, 0]), list(range(4))
    prefix = jnp.array([[3, 4, 3, 4], [5, 0, 0, 0], [0, 0, 0, 0], [6, 6, 6, 0]])
    limits = jnp.array([2, 3, 6, 2])
    result = run_beam(
        table,
        init_state(sentences),
        0.6,
        limits,
        prefix,
        beam_size=4,
        max_len=7,
        min_len=2,
        no_repeat_ngram_size=2,
    )
    sequences, valid = np.asarray(result.sequences), np.asarray(result.valid)
    lengths = np.asarray(result.lengths)
    for b in range(4):
        forced = [int(t) for t in prefix[b] if t]
        for k in np.flatnonzero(valid[b]):
            row = sequences[b, k]
            assert row[: len(forced)].tolist() == forced
            free = row[max(len(forced) - 1, 0) : lengths[b, k]]
            assert not repeats_an_ngram(free, 2), row
            assert max(len(forced) + 1, 3) <= lengths[b, k] <= max(int(limits[b]), len(forced) + 1)
    rescored = rescore(table, result, sentences, 0.6, "gnmt")
    np.testing.assert_allclose(rescored.scores[valid], np.asarray(result.scores)[valid], rtol=1e-5)


def teacher_forced_alignments(sentence_id, row):
    """`make_step_fn`'s alignment (h mod 5) before each token of one hypothesis, -1 after it."""
    h, previous, out = sentence_id * 17 + 3, BOS, []
    for token in row:
        if previous in (EOS, 0) and out:
            out.append(-1)
            continue
        h = (h * 31 + previous + 1) % ROWS
        out.append(h % 5 if token else -1)
        previous = token
    return out


def test_alignments_follow_each_hypothesis_through_the_reordering():
    table, sentences = random_table(2, 7), [0, 1, 2, 3]
    aligned = run_beam(
        table, init_state(sentences), 0.8, beam_size=5, max_len=6, with_alignment=True
    )
    plain = run_beam(table, init_state(sentences), 0.8, beam_size=5, max_len=6)
    assert plain.alignments is None
    for name in ("sequences", "scores", "lengths"):
        np.testing.assert_array_equal(getattr(aligned, name), getattr(plain, name), err_msg=name)
    for b, sentence in enumerate(sentences):
        for k in range(5):
            row = np.asarray(aligned.sequences[b, k]).tolist()
            expected = teacher_forced_alignments(sentence, row)
            np.testing.assert_array_equal(aligned.alignments[b, k], expected, err_msg=f"{b},{k}")
