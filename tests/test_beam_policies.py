"""decoding.beam_search's policies and stopping rules: against a plain-Python reference and brute force on
a model-free step function, and against the peers' own beam search (transformers' `generate`,
CTranslate2's `translate_batch`): test_beam_policies_peers.py."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HASH_ROWS, prefix_hash_step_fn, prefix_log_probs

import decoding
from decoding.beam_search import POLICIES, STOPPING

PAD, BOS, EOS = 0, 1, 2
COMBINATIONS = list(itertools.product(POLICIES, STOPPING))


@functools.partial(
    jax.jit, static_argnames=("beam_size", "max_len", "beam_policy", "stopping", "min_len")
)
def run_beam(
    table, h, alpha, max_lengths=None, *, beam_size, max_len, beam_policy, stopping, min_len=0
):
    return decoding.beam_search(
        prefix_hash_step_fn(table),
        h,
        bos_id=BOS,
        eos_id=EOS,
        batch_size=h.shape[0],
        beam_size=beam_size,
        max_len=max_len,
        alpha=alpha,
        length_penalty="average",
        min_len=min_len,
        max_lengths=max_lengths,
        beam_policy=beam_policy,
        stopping=stopping,
    )


def reference_beam_search(
    next_log_probs, *, beam, limit, alpha, policy, stopping, min_len=0
) -> list[tuple[float, tuple[int, ...], float]]:
    """One sentence's n-best `[(score, tokens, log P)]`, best first, by the policies' definitions in
    plain Python lists (`next_log_probs(prefix) -> [vocab]`, float64), ranked by `log P / T^alpha`.

    Each step ranks every extension of every alive prefix (pad and BOS never; EOS not before
    `min_len` tokens); "classic" keeps the `beam` best, "full" the `2 x beam` best. Of those, the ones
    that end (EOS, or `limit` tokens) and rank among the first `beam` join the n-best, the others
    that end are dropped; the `beam` best that do not end stay alive. Then the sentence stops:
    "exact" when the best alive log P over the best penalty any completion can have does not beat
    the worst of a full n-best, "heuristic" when it does not at the alive prefixes' own length,
    "nbest" when the n-best is full; always when nothing is alive or at `limit`.
    """
    alive, finished = [(0.0, ())], []  # (log P, tokens)
    for step in range(limit):
        length = step + 1
        extensions = []
        for log_prob, tokens in alive:  # in rank order, tokens ascending: top-k's tie order
            for token, token_log_prob in enumerate(next_log_probs(tokens)):
                if token in (PAD, BOS) or (token == EOS and step < min_len):
                    continue
                extensions.append((log_prob + token_log_prob, tokens + (token,)))
        extensions.sort(key=lambda e: -e[0])  # stable
        candidates = extensions[: 2 * beam if policy == "full" else beam]
        ends = [tokens[-1] == EOS or length == limit for _, tokens in candidates]
        for rank, ((log_prob, tokens), end) in enumerate(zip(candidates, ends, strict=True)):
            if end and rank < beam:
                finished.append((log_prob / length**alpha, tokens, log_prob))
        finished = sorted(finished, key=lambda f: -f[0])[:beam]  # stable: the older first on ties
        alive = [c for c, end in zip(candidates, ends, strict=True) if not end][:beam]
        worst = finished[-1][0] if len(finished) == beam else -math.inf
        best = alive[0][0] if alive else -math.inf
        if stopping == "nbest":
            stop = len(finished) == beam
        elif stopping == "heuristic":
            stop = best / length**alpha <= worst
        else:
            stop = best / max((length + 1) ** alpha, limit**alpha) <= worst
        if stop or not alive:
            break
    return finished


def table_log_probs(table, h: int):
    """`next_log_probs` of the sentence that starts from hash `h` under `prefix_hash_step_fn(table)`."""

    def next_log_probs(prefix):
        return prefix_log_probs(table, h, [*prefix, PAD])[-1]

    return next_log_probs


def toy_table(seed: int, vocab: int, eos_bias: float) -> jax.Array:
    """Random logits `[HASH_ROWS, vocab]` with EOS `eos_bias` likelier: hypotheses end at many lengths."""
    table = 2.0 * jax.random.normal(jax.random.key(seed), (HASH_ROWS, vocab))
    return table.at[:, EOS].add(eos_bias)


def assert_same_nbest(result, b: int, expected, max_len: int) -> None:
    """Sentence `b` of a `BeamSearchResult` holds exactly `expected` (`reference_beam_search`'s)."""
    count = len(expected)
    np.testing.assert_array_equal(result.valid[b], np.arange(result.valid.shape[1]) < count)
    tokens = np.zeros((count, max_len), np.int32)
    for k, (_, hypothesis, _) in enumerate(expected):
        tokens[k, : len(hypothesis)] = hypothesis
    np.testing.assert_array_equal(result.sequences[b, :count], tokens)
    np.testing.assert_allclose(result.scores[b, :count], [e[0] for e in expected], rtol=1e-5)
    np.testing.assert_allclose(result.log_probs[b, :count], [e[2] for e in expected], rtol=1e-5)
    np.testing.assert_array_equal(result.lengths[b, :count], [len(e[1]) for e in expected])


SENTENCES = np.arange(24, dtype=np.int32) * 4 + 1  # start hashes


@pytest.mark.parametrize("policy, stopping", COMBINATIONS)
@pytest.mark.parametrize("beam", [1, 3])
def test_each_policy_and_stopping_rule_returns_exactly_the_references_n_best(
    policy, stopping, beam
):
    table, max_len = toy_table(0, 7, eos_bias=1.0), 6
    for alpha in (0.0, 0.6, 2.0, -0.5):
        result = run_beam(
            table,
            jnp.asarray(SENTENCES),
            alpha,
            beam_size=beam,
            max_len=max_len,
            beam_policy=policy,
            stopping=stopping,
        )
        for b, h in enumerate(SENTENCES):
            expected = reference_beam_search(
                table_log_probs(table, int(h)),
                beam=beam,
                limit=max_len,
                alpha=alpha,
                policy=policy,
                stopping=stopping,
            )
            assert_same_nbest(result, b, expected, max_len)


def test_the_reference_policies_and_stopping_rules_return_different_n_bests():
    # The test above could not tell the options apart if they agreed on its sentences: each policy
    # and each stopping rule must change some sentence's n-best there.
    table = toy_table(0, 7, eos_bias=1.0)
    nbest = {
        (policy, stopping, alpha, h): reference_beam_search(
            table_log_probs(table, int(h)),
            beam=3,
            limit=6,
            alpha=alpha,
            policy=policy,
            stopping=stopping,
        )
        for (policy, stopping), alpha, h in itertools.product(COMBINATIONS, (0.6, 2.0), SENTENCES)
    }

    def differ(a, b):
        return sum(
            nbest[(*a, alpha, h)] != nbest[(*b, alpha, h)]
            for alpha, h in itertools.product((0.6, 2.0), SENTENCES)
        )

    assert differ(("classic", "exact"), ("full", "exact")) > 0
    for stop_a, stop_b in itertools.combinations(STOPPING, 2):
        assert differ(("full", stop_a), ("full", stop_b)) > 0, (stop_a, stop_b)


@pytest.mark.parametrize("policy, stopping", COMBINATIONS)
def test_min_len_and_sentence_limits_follow_the_reference(policy, stopping):
    table, max_len, beam = toy_table(1, 6, eos_bias=2.0), 7, 2
    limits = np.array([3, 7, 5, 2, 6, 4] * 4, np.int32)
    result = run_beam(
        table,
        jnp.asarray(SENTENCES),
        0.8,
        jnp.asarray(limits),
        beam_size=beam,
        max_len=max_len,
        beam_policy=policy,
        stopping=stopping,
        min_len=1,
    )
    for b, h in enumerate(SENTENCES):
        expected = reference_beam_search(
            table_log_probs(table, int(h)),
            beam=beam,
            limit=int(limits[b]),
            alpha=0.8,
            policy=policy,
            stopping=stopping,
            min_len=1,
        )
        assert_same_nbest(result, b, expected, max_len)


def all_hypotheses(vocab: int, max_len: int) -> list[tuple[int, ...]]:
    """Every hypothesis a search may return: content tokens 3.., EOS-ended or cut at `max_len`."""
    content = range(EOS + 1, vocab)
    ended = [(*body, EOS) for n in range(max_len) for body in itertools.product(content, repeat=n)]
    return ended + list(itertools.product(content, repeat=max_len))


def brute_force_nbest(table, h: int, hypotheses, alpha: float):
    """Every hypothesis' `(score, tokens, log P)` for the sentence from hash `h`, best first."""
    scored = []
    for tokens in hypotheses:
        log_prob = float(np.sum(prefix_log_probs(table, h, tokens)[np.arange(len(tokens)), tokens]))
        scored.append((log_prob / len(tokens) ** alpha, tokens, log_prob))
    return sorted(scored, key=lambda s: -s[0])


def test_a_full_beam_wider_than_the_search_space_returns_every_hypothesis_in_exact_order():
    # vocab 5 (two content tokens), max_len 5: 63 hypotheses and at most 48 extensions per step, so a
    # beam of 64 prunes nothing and its n-best never fills (no rule stops early): all 63, ranked.
    table, hypotheses = toy_table(2, 5, eos_bias=0.0), all_hypotheses(5, 5)
    result = run_beam(
        table,
        jnp.asarray(SENTENCES[:3]),
        0.7,
        beam_size=64,
        max_len=5,
        beam_policy="full",
        stopping="exact",
    )
    for b, h in enumerate(SENTENCES[:3]):
        exact = brute_force_nbest(table, int(h), hypotheses, 0.7)
        assert len(exact) == 63 and all(a[0] > b[0] for a, b in itertools.pairwise(exact))
        assert_same_nbest(result, b, exact, 5)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0, -1.0])
def test_full_exact_stopping_never_drops_an_n_best_hypothesis(alpha):
    # One content token: two extensions per alive prefix, so a full beam of 2 never prunes (its four
    # candidates hold every extension) and only the stopping rule could lose one of the 2-best.
    table, hypotheses = toy_table(3, 4, eos_bias=-1.5), all_hypotheses(4, 8)
    sentences = np.arange(64, dtype=np.int32)
    result = run_beam(
        table,
        jnp.asarray(sentences),
        alpha,
        beam_size=2,
        max_len=8,
        beam_policy="full",
        stopping="exact",
    )
    for b, h in enumerate(sentences):
        assert_same_nbest(result, b, brute_force_nbest(table, int(h), hypotheses, alpha)[:2], 8)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(beam_policy="keep_full"),
            "beam_policy='keep_full' is not supported: use one of classic, full",
        ),
        (
            dict(stopping="never"),
            "stopping='never' is not supported: use one of exact, heuristic, nbest",
        ),
    ],
)
def test_bad_policies_raise_one_line_value_errors(change, message):
    args = dict(bos_id=BOS, eos_id=EOS, batch_size=2, beam_size=2, max_len=4, **change)
    with pytest.raises(ValueError, match=message) as error:
        decoding.beam_search(prefix_hash_step_fn(toy_table(0, 5, 0.0)), jnp.arange(2), **args)
    assert "\n" not in str(error.value)


# ------------------------------------------------------ the option from configs and eval.py's flags


def test_decode_settings_check_and_report_the_policy():
    for field, value, choices in (
        ("beam_policy", "keep_full", "classic, full"),
        ("beam_stopping", "never", "exact, heuristic, nbest"),
    ):
        settings = decoding.DecodeSettings(**{field: value})
        with pytest.raises(ValueError, match=f"^--config.decoding.{field}={value}: use one of "):
            settings.check("--config.decoding.")
        with pytest.raises(ValueError, match=f"^--{field}={value}: use one of {choices}$"):
            settings.check("--")
    report = decoding.DecodeSettings(beam_policy="full", beam_stopping="nbest").report()
    assert (report["beam_policy"], report["beam_stopping"]) == ("full", "nbest")
    assert "beam_policy" not in decoding.DecodeSettings(decode="greedy").report()


def test_configs_and_training_take_the_policy_from_config_decoding():
    from configs import default
    from experiment import RunError, training

    config = default.get_config()
    assert (config.decoding.beam_policy, config.decoding.beam_stopping) == ("classic", "exact")
    config.decoding.update(decode="beam", beam_policy="full", beam_stopping="heuristic")
    settings = training.validation_settings(config)
    assert (settings.beam_policy, settings.beam_stopping) == ("full", "heuristic")
    config.decoding.beam_stopping = "early"
    with pytest.raises((ValueError, RunError), match="^--config.decoding.beam_stopping=early: "):
        training.validation_settings(config)


def test_eval_takes_the_policy_from_its_flags(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    import eval as eval_script
    from configs import default
    from experiment import RunError

    config, options = default.get_config(), eval_script.Options
    settings = eval_script.decode_settings(
        config, options(decoding={"beam_policy": "full", "beam_stopping": "nbest"})
    )
    assert (settings.beam_policy, settings.beam_stopping) == ("full", "nbest")
    with pytest.raises(RunError, match="^--beam_policy=wide: use one of classic, full$"):
        eval_script.decode_settings(config, options(decoding={"beam_policy": "wide"}))
    # The flags exist, with the settings' choices (eval.py makes one per DecodeSettings field).
    result = subprocess.run(
        [sys.executable, "eval.py", "--workdir", str(tmp_path), "--beam_policy=wide"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "flag --beam_policy=wide: value should be one of <classic|full>" in result.stderr
