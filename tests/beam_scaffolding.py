"""Scaffolding of the beam search tests (tests/test_beam_search.py, tests/test_beam_constraints.py):
model-free step functions over random logit tables, the searches jitted once per static option set,
`decoding.score` of their hypotheses, and brute force over every hypothesis a tiny search space holds.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

import decoding

BOS, EOS = 1, 2
ROWS = 1009  # rows of the random logit tables, indexed by a hash of the prefix


def make_step_fn(table, with_alignment=False):
    """A step function whose logits depend on the whole prefix, through both leaves of its state.

    state: `h` int32 `[N]`, a hash of the prefix; `recent` int32 `[N, 3]`, the last three tokens. A
    beam reorder that mixes up rows (of either leaf) changes the logits that follow. With
    `with_alignment` it also returns `h mod 5` as the alignment of the token it predicts.
    """

    def step_fn(tokens, state):
        h = (state["h"] * 31 + tokens + 1) % ROWS
        recent = jnp.concatenate([state["recent"][:, 1:], tokens[:, None]], axis=1)
        logits, state = table[(h + 7 * recent[:, 0]) % ROWS], {"h": h, "recent": recent}
        return (logits, state, h % 5) if with_alignment else (logits, state)

    return step_fn


def init_state(sentence_ids):
    """The state before BOS of the given sentences (each id starts its own hash)."""
    ids = jnp.asarray(sentence_ids, jnp.int32)
    return {"h": ids * 17 + 3, "recent": jnp.zeros((len(ids), 3), jnp.int32)}


def random_table(seed, vocab, bias=None):
    table = 2.0 * jax.random.normal(jax.random.key(seed), (ROWS, vocab))
    return table if bias is None else table + jnp.asarray(bias, jnp.float32)


TRACES = {"beam": 0}


@functools.partial(
    jax.jit,
    static_argnames=(
        "beam_size",
        "max_len",
        "length_penalty",
        "min_len",
        "no_repeat_ngram_size",
        "with_alignment",
    ),
)
def run_beam(
    table,
    state,
    alpha,
    max_lengths=None,
    prefix=None,
    *,
    beam_size,
    max_len,
    length_penalty="gnmt",
    min_len=0,
    no_repeat_ngram_size=0,
    with_alignment=False,
):
    TRACES["beam"] += 1
    return decoding.beam_search(
        make_step_fn(table, with_alignment),
        state,
        bos_id=BOS,
        eos_id=EOS,
        batch_size=state["h"].shape[0],
        beam_size=beam_size,
        max_len=max_len,
        alpha=alpha,
        length_penalty=length_penalty,
        min_len=min_len,
        max_lengths=max_lengths,
        no_repeat_ngram_size=no_repeat_ngram_size,
        prefix=prefix,
        with_alignment=with_alignment,
    )


@functools.partial(jax.jit, static_argnames=("length_penalty",))
def run_score(table, state, targets, alpha, *, length_penalty):
    return decoding.score(
        make_step_fn(table),
        state,
        targets,
        bos_id=BOS,
        eos_id=EOS,
        alpha=alpha,
        length_penalty=length_penalty,
    )


@functools.partial(jax.jit, static_argnames=("max_len",))
def run_greedy(table, state, max_lengths=None, *, max_len):
    return decoding.greedy(
        make_step_fn(table),
        state,
        bos_id=BOS,
        eos_id=EOS,
        batch_size=state["h"].shape[0],
        max_len=max_len,
        max_lengths=max_lengths,
    )


def all_sequences(vocab, max_len):
    """Every hypothesis the search may return: `[n, max_len]`, content tokens 3.., EOS-ended or cut."""
    content = range(EOS + 1, vocab)
    rows = []
    for length in range(1, max_len + 1):
        for body in itertools.product(content, repeat=length - 1):
            rows.append([*body, EOS] + [0] * (max_len - length))
    rows.extend(list(body) for body in itertools.product(content, repeat=max_len))
    return np.array(rows, np.int32)


def rescore(table, result, sentence_ids, alpha, length_penalty):
    """`decoding.score` of every returned hypothesis, arrays `[batch, beam, ...]`."""
    batch, beam, max_len = result.sequences.shape
    state = init_state(np.repeat(sentence_ids, beam))
    targets = result.sequences.reshape(batch * beam, max_len)
    scored = run_score(table, state, targets, alpha, length_penalty=length_penalty)
    return jax.tree.map(lambda x: np.asarray(x).reshape(batch, beam, *x.shape[1:]), scored)


def brute_force(table, sentence_id, sequences, alpha, length_penalty):
    """Normalized scores of `sequences [n, max_len]` for one sentence, as numpy `[n]`."""
    state = init_state(np.full(len(sequences), sentence_id))
    return np.asarray(
        run_score(table, state, sequences, alpha, length_penalty=length_penalty).scores
    )


PENALTIES = [("none", 0.0), ("average", 1.0), ("gnmt", 0.6)]
