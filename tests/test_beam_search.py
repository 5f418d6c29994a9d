"""decoding/beam_search.py against brute force, greedy and `decoding.score`, on model-free step functions:
exactness, the n-best, stopping, sentence limits, state that is never reordered, compilation, errors.
"""

import functools

import jax
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
    make_step_fn,
    random_table,
    rescore,
    run_beam,
    run_greedy,
)
from conftest import counting_steps

import decoding


@pytest.mark.parametrize("length_penalty, alpha", PENALTIES)
def test_a_beam_wider_than_the_search_space_returns_every_hypothesis_in_exact_order(
    length_penalty, alpha
):
    # vocab 5 (two content tokens) and max_len 5: 63 hypotheses, and never more than 48 candidates
    # per step, so a beam of 64 prunes nothing: it must return all 63, ranked like brute force.
    table, sentences = random_table(0, 5), [0, 1, 2]
    result = run_beam(
        table, init_state(sentences), alpha, beam_size=64, max_len=5, length_penalty=length_penalty
    )
    everything = all_sequences(5, 5)
    for b, sentence in enumerate(sentences):
        exact = brute_force(table, sentence, everything, alpha, length_penalty)
        order = np.argsort(-exact)
        assert np.all(np.diff(exact[order]) < 0), "ties would make the order ambiguous"
        np.testing.assert_array_equal(result.valid[b], np.arange(64) < 63)
        np.testing.assert_array_equal(result.sequences[b, :63], everything[order])
        np.testing.assert_allclose(result.scores[b, :63], exact[order], rtol=1e-5)
        # The slot no hypothesis fills is empty, whatever the length penalty.
        assert result.scores[b, 63] == -np.inf and result.log_probs[b, 63] == -np.inf
        assert result.lengths[b, 63] == 0 and not np.any(result.sequences[b, 63])


@pytest.mark.parametrize(
    "length_penalty, alpha",
    [*PENALTIES, ("average", 0.5), ("average", -0.5), ("gnmt", 2.0), ("gnmt", -1.0)],
)
def test_early_termination_never_drops_an_n_best_hypothesis(length_penalty, alpha):
    # One content token: a single alive prefix and two candidates per step, so a beam of 2 never
    # prunes and only the stopping rule can lose a hypothesis; the 2-best must be exactly brute
    # force's, for every penalty and sign of alpha (the bound must hold for each).
    table, sentences = random_table(1, 4, bias=[0, 0, 0, 3.0]), list(range(64))
    result = run_beam(
        table, init_state(sentences), alpha, beam_size=2, max_len=8, length_penalty=length_penalty
    )
    everything = all_sequences(4, 8)
    for b, sentence in enumerate(sentences):
        exact = brute_force(table, sentence, everything, alpha, length_penalty)
        best = np.argsort(-exact)[:2]
        np.testing.assert_array_equal(result.sequences[b], everything[best])
        np.testing.assert_allclose(result.scores[b], exact[best], rtol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 2, 5])
def test_n_best_are_distinct_sorted_and_scored_like_decoding_score(beam_size):
    table, sentences, alpha = random_table(2, 7), [0, 1, 2, 3], 0.8
    result = run_beam(table, init_state(sentences), alpha, beam_size=beam_size, max_len=6)
    assert result.sequences.shape == (4, beam_size, 6) and result.sequences.dtype == jnp.int32
    assert result.token_log_probs.shape == (4, beam_size, 6)
    assert np.all(result.valid)
    assert np.all(np.diff(result.scores, axis=1) <= 0)
    for b in range(4):
        assert len({tuple(row) for row in np.asarray(result.sequences[b])}) == beam_size
    scored = rescore(table, result, sentences, alpha, "gnmt")
    np.testing.assert_allclose(result.scores, scored.scores, rtol=1e-5)
    np.testing.assert_allclose(result.log_probs, scored.log_probs, rtol=1e-5)
    np.testing.assert_array_equal(result.lengths, scored.lengths)
    np.testing.assert_allclose(result.token_log_probs, scored.token_log_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.log_probs, result.token_log_probs.sum(-1), rtol=1e-5)
    # EOS (if any) is the last token and only padding follows it.
    positions = np.arange(6)
    within = positions < np.asarray(result.lengths)[..., None]
    assert not np.any(np.asarray(result.sequences)[~within])
    assert np.all(
        np.asarray(result.sequences)[within & (positions < result.lengths[..., None] - 1)]
    )
    eos_at = np.asarray(result.sequences) == EOS
    assert np.all(eos_at.sum(-1) <= 1)
    ended = eos_at.any(-1)
    assert np.all(np.asarray(result.lengths)[~ended] == 6)


def test_empty_slots_are_invalid_and_minus_inf():
    # vocab 4, max_len 2: only "eos", "a eos" and "a a" exist; the other 2 slots must stay empty even
    # with a length penalty that divides by T^3.
    result = run_beam(
        random_table(3, 4),
        init_state([0, 1]),
        3.0,
        beam_size=5,
        max_len=2,
        length_penalty="average",
    )
    np.testing.assert_array_equal(result.valid, [[True] * 3 + [False] * 2] * 2)
    assert np.all(np.isfinite(result.scores[:, :3]))
    assert np.all(result.scores[:, 3:] == -np.inf) and np.all(result.log_probs[:, 3:] == -np.inf)
    assert not np.any(result.sequences[:, 3:]) and not np.any(result.lengths[:, 3:])
    assert not np.any(result.token_log_probs[:, 3:])
    for b in range(2):
        got = {tuple(row) for row in np.asarray(result.sequences[b, :3])}
        assert got == {(EOS, 0), (3, EOS), (3, 3)}


def test_beam_size_one_is_greedy():
    table, sentences = random_table(4, 9, bias=[0, 0, 1.0] + [0] * 6), list(range(12))
    beam = run_beam(table, init_state(sentences), 0.6, beam_size=1, max_len=7)
    greedy = run_greedy(table, init_state(sentences), max_len=7)
    assert len(set(np.asarray(greedy.lengths).tolist())) > 1, "the test needs varied lengths"
    np.testing.assert_array_equal(beam.sequences[:, 0], greedy.sequences)
    np.testing.assert_array_equal(beam.lengths[:, 0], greedy.lengths)
    np.testing.assert_allclose(beam.log_probs[:, 0], greedy.log_probs, rtol=1e-6)
    np.testing.assert_allclose(beam.token_log_probs[:, 0], greedy.token_log_probs, rtol=1e-6)


def test_a_sentence_decodes_the_same_alone_and_in_any_batch():
    table = random_table(2, 7)
    batch = run_beam(table, init_state([5, 6, 7, 8]), 0.8, beam_size=5, max_len=6)
    other = run_beam(table, init_state([9, 7, 10, 11]), 0.8, beam_size=5, max_len=6)
    alone = run_beam(table, init_state([7]), 0.8, beam_size=5, max_len=6)
    for result, row in ((batch, 2), (other, 1)):
        for got, want in zip(result[:6], alone[:6], strict=True):  # alignments are None
            np.testing.assert_array_equal(got[row], want[0])


def prefix_logits(table, start, prefix, t):
    """Logits `[N, vocab]` from a hash of `start [N]` and the tokens `prefix [N, max_len]` up to `t`."""
    h = start
    for s in range(prefix.shape[1]):
        h = jnp.where(s <= t, (h * 31 + prefix[:, s] + 1) % ROWS, h)
    return table[(h + 7 * prefix[:, t]) % ROWS]


def prefix_step_fn(table):
    """The prefix kept in ordinary state: reordered by the search with its hypothesis."""

    def step_fn(tokens, state):
        t = state["t"][0]
        prefix = state["prefix"].at[:, t].set(tokens)
        logits = prefix_logits(table, state["start"], prefix, t)
        return logits, {**state, "prefix": prefix, "t": state["t"] + 1}

    return step_fn


def shared_history_step_fn(table, beam):
    """The prefix kept as a flat KV cache is: each row writes its token in its own row of a history
    that the beams of a sentence share, and reads its hypothesis' earlier tokens from the rows that
    `slots` (ordinary state, reordered by the search) names, position by position."""

    def step_fn(tokens, state):
        rows, t = tokens.shape[0], state["t"][0]
        history = state["history"]
        shared = isinstance(history, decoding.BeamShared)
        history = (history.value if shared else history).at[:, t].set(tokens)
        slots = state["slots"].at[:, t].set(jnp.arange(rows) % beam)
        first_row = jnp.arange(rows)[:, None] // beam * beam
        prefix = history[first_row + slots, jnp.arange(history.shape[1])]
        logits = prefix_logits(table, state["start"], prefix, t)
        history = decoding.BeamShared(history) if shared else history
        return logits, {**state, "history": history, "slots": slots, "t": state["t"] + 1}

    return step_fn


def test_beam_shared_state_is_never_reordered():
    table, beam, max_len, batch = random_table(6, 6), 3, 6, 4
    start = jnp.arange(batch, dtype=jnp.int32) * 17 + 3
    zeros = jnp.zeros((batch, max_len), jnp.int32)
    search = functools.partial(
        decoding.beam_search,
        bos_id=BOS,
        eos_id=EOS,
        batch_size=batch,
        beam_size=beam,
        max_len=max_len,
        alpha=0.6,
    )
    t0 = jnp.zeros((batch,), jnp.int32)
    want = jax.jit(
        lambda: search(prefix_step_fn(table), {"start": start, "prefix": zeros, "t": t0})
    )()
    state = {"start": start, "slots": zeros, "t": t0}
    shared_step_fn = shared_history_step_fn(table, beam)
    got = jax.jit(
        lambda: search(shared_step_fn, {**state, "history": decoding.BeamShared(zeros)})
    )()
    for name, x, y in zip(want._fields, want, got, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=name)
    # The same history as ordinary state is reordered, and then read through `slots`, wrongly.
    wrong = jax.jit(lambda: search(shared_step_fn, {**state, "history": zeros}))()
    assert np.any(np.asarray(wrong.sequences) != np.asarray(want.sequences))


@pytest.mark.parametrize("decode", ["beam", "greedy"])
def test_a_sentence_limit_decodes_it_as_alone_with_that_max_len(decode):
    # Limits per sentence (e.g. from source lengths): each sentence's result is exactly its search
    # with max_len = its limit, padded; 9 is clipped to max_len.
    table, sentences, limits = random_table(2, 7), [5, 6, 7, 8], [2, 9, 3, 1]
    if decode == "beam":
        run = functools.partial(run_beam, table, alpha=0.8, beam_size=3)
    else:
        run = functools.partial(run_greedy, table)
    batch = run(state=init_state(sentences), max_lengths=jnp.array(limits), max_len=6)
    cut = 0
    for row, (sentence, limit) in enumerate(zip(sentences, limits, strict=True)):
        limit = min(limit, 6)
        alone = run(state=init_state([sentence]), max_len=limit)
        for got, want in zip(batch, alone, strict=True):
            if got is None:  # alignments, not asked for
                continue
            got = np.asarray(got[row])
            if (
                got.ndim and got.shape[-1] == 6
            ):  # sequences, token_log_probs: padded after the limit
                assert not np.any(got[..., limit:])
                got = got[..., :limit]
            np.testing.assert_array_equal(got, want[0])
        cut += int(np.sum(np.asarray(batch.lengths[row]) == limit))
    assert cut, "some hypothesis must be cut at its sentence's limit"


def test_bad_max_lengths_raise_a_one_line_value_error():
    with pytest.raises(ValueError, match=r"max_lengths has shape \(3,\).*shape \(2,\)"):
        run_beam(
            random_table(2, 7),
            init_state([0, 1]),
            0.6,
            jnp.array([1, 2, 3]),
            beam_size=2,
            max_len=4,
        )


def test_alpha_and_table_are_traced_and_only_shapes_recompile():
    state, table = init_state([0, 1]), random_table(6, 6)
    kwargs = dict(beam_size=3, max_len=4, length_penalty="average")
    results = [run_beam(table, state, 0.0, **kwargs)]
    traced = TRACES["beam"]
    results += [run_beam(table, state, alpha, **kwargs) for alpha in (0.5, 1.0, 2.0)]
    run_beam(random_table(7, 6), state, 1.0, **kwargs)
    assert TRACES["beam"] == traced, "changing alpha or the table must not retrace"
    assert not all(np.array_equal(results[0].scores, r.scores) for r in results[1:])
    run_beam(table, state, 1.0, **dict(kwargs, max_len=5))
    assert TRACES["beam"] == traced + 1, "a new max_len is a new program"


def test_the_loop_stops_once_no_alive_hypothesis_can_win():
    steps = []

    @jax.jit
    def run(table, state):
        counted = counting_steps(make_step_fn(table), steps)
        return decoding.beam_search(
            counted,
            state,
            bos_id=BOS,
            eos_id=EOS,
            batch_size=2,
            beam_size=2,
            max_len=20,
            alpha=0.0,
            length_penalty="none",
        )

    # EOS is by far the likeliest token: every hypothesis after the first few is worse than the
    # 2-best already finished.
    result = run(random_table(8, 5, bias=[0, 0, 6.0, 0, 0]), init_state([0, 1]))
    jax.block_until_ready(result)
    assert np.all(result.valid) and np.all(result.lengths <= 3)
    assert 2 <= len(steps) <= 4


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(beam_size=0), "beam_size=0 must be a positive integer"),
        (dict(max_len=0), "max_len=0 must be a positive integer"),
        (dict(beam_size=2.0), "beam_size=2.0 must be a positive integer"),
        (dict(eos_id=5), r"eos_id=5 is outside the vocabulary: use an id in \[0, 5\)"),
        (dict(bos_id=-1), "bos_id=-1 is outside the vocabulary"),
        (dict(bos_id=EOS), "eos_id must differ from pad_id and bos_id"),
        (dict(length_penalty="wu"), "length_penalty='wu' is not supported"),
        (dict(min_len=4), r"min_len=4 must be an int in \[0, max_len=4\)"),
        (dict(batch_size=3), r"init_state\['h'\] has shape \(2,\)"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(change, message):
    kwargs = dict(
        bos_id=BOS, eos_id=EOS, batch_size=2, beam_size=2, max_len=4, length_penalty="gnmt"
    )
    with pytest.raises(ValueError, match=message) as error:
        decoding.beam_search(
            make_step_fn(random_table(0, 5)), init_state([0, 1]), **{**kwargs, **change}
        )
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "step_fn, message",
    [
        (
            lambda tokens, state: (jnp.zeros((4, 5)), {"h": state["h"][:, None]}),
            r"step_fn changed state\['h'\] from int32\[4\] to int32\[4, 1\]",
        ),
        (lambda tokens, state: jnp.zeros((4, 5)), "step_fn must return a pair"),
        (lambda tokens, state: (jnp.zeros((4, 5, 1)), state), r"float logits \[4, vocab\]"),
        (lambda tokens, state: ({"h": state["h"]}, state), r"float logits \[4, vocab\]"),
    ],
)
def test_a_step_function_that_does_not_fit_is_rejected(step_fn, message):
    with pytest.raises(ValueError, match=message) as error:
        decoding.beam_search(
            step_fn,
            {"h": jnp.zeros(2, jnp.int32)},
            bos_id=BOS,
            eos_id=EOS,
            batch_size=2,
            beam_size=2,
            max_len=3,
        )
    assert "\n" not in str(error.value)


def test_top_k_kernels_agree_and_are_chosen_per_backend(monkeypatch):
    # Ties (values rounded to 0.5) and rows longer than k x block, where the blockwise kernel cuts.
    x = jnp.round(2 * jax.random.normal(jax.random.key(0), (3, 4, 2000))) / 2
    want = jax.lax.top_k(x, 5)
    for got in (decoding.common.blockwise_top_k(x, 5), decoding.common.top_k(x, 5)):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])

    def primitives(fn):
        return {str(e.primitive) for e in jax.make_jaxpr(fn)(x).jaxpr.eqns}

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert "reduce_max" in primitives(lambda x: decoding.common.top_k(x, 5))  # CPU: blockwise
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert primitives(lambda x: decoding.common.top_k(x, 5)) == {"top_k"}  # XLA's own
