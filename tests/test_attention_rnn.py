"""models/attention_rnn.py: attention scores, weights and the bidirectional encoder (the common
interface is checked for every model in test_registry.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SRC, SRC_MASK, TGT_IN, overfit

from models.attention_rnn import AttentionRNN

ATTENTIONS = ["bahdanau", "luong_dot", "luong_general"]
BEAM = 2


class Tiny:
    """A tiny model with `attention`, its parameters and jitted entry points."""

    def __init__(self, attention: str):
        self.model = model = AttentionRNN(
            11,
            13,
            embed_dim=16,
            hidden_dim=32,
            attention=attention,
            attention_dim=16,
            dropout_rate=0.0,
        )
        self.variables = jax.jit(model.init)(jax.random.key(0), SRC, TGT_IN)
        self.forward = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
        self.encode = jax.jit(functools.partial(model.apply, method=model.encode))
        self.step = jax.jit(
            functools.partial(model.apply, method=model.decode_step, mutable=["intermediates"])
        )

    def forward_attention(self):
        """float32 `[batch, tgt_len, src_len]` attention weights of the teacher-forced pass."""
        _, sown = self.forward(self.variables, SRC, TGT_IN)
        return np.asarray(sown["intermediates"]["attention"][0])


@functools.cache
def tiny(attention: str) -> Tiny:
    return Tiny(attention)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_attention_weights_are_a_distribution_over_real_source_positions(attention):
    weights = tiny(attention).forward_attention()
    assert weights.shape == (4, 6, 6)
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert np.all(weights[~np.broadcast_to(SRC_MASK[:, None, :], weights.shape)] == 0)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_decode_step_attention_equals_teacher_forced_attention_for_every_beam(attention):
    t = tiny(attention)
    memory = t.encode(t.variables, SRC)
    state = t.model.apply(t.variables, memory, 6, method=t.model.init_decode_state)
    state = jax.tree.map(lambda x: jnp.repeat(x, BEAM, axis=0), state)
    expected = t.forward_attention()
    for step in range(TGT_IN.shape[1]):
        tokens = jnp.repeat(TGT_IN[:, step], BEAM)
        (_, state), sown = t.step(t.variables, memory, tokens, state)
        weights = np.asarray(sown["intermediates"]["attention"][0]).reshape(4, BEAM, -1)
        for beam in range(BEAM):
            np.testing.assert_allclose(weights[:, beam], expected[:, step], atol=1e-6)


def expected_first_step_weights(t: Tiny, attention: str) -> np.ndarray:
    """The first decoder step's attention `[batch, src_len]` recomputed from the parameters in numpy."""
    params = jax.tree.map(np.asarray, t.variables["params"])
    memory = jax.tree.map(np.asarray, t.encode(t.variables, SRC))
    annotations = memory["annotations"]  # [batch, src_len, hidden]
    # Initial decoder state: tanh(W mean_j h_j + b), mean over real positions.
    mean = (annotations * SRC_MASK[..., None]).sum(1) / SRC_MASK.sum(1, keepdims=True)
    bridge = params["bridge_0"]
    query = np.tanh(mean @ bridge["kernel"] + bridge["bias"])  # [batch, hidden]
    if attention == "bahdanau":  # v^T tanh(W s + U h + b)
        keys = annotations @ params["key"]["kernel"] + params["key"]["bias"]
        hidden = np.tanh((query @ params["decoder"]["query"]["kernel"])[:, None, :] + keys)
        scores = (hidden @ params["decoder"]["energy"]["kernel"])[..., 0]
    elif attention == "luong_dot":  # s^T h
        scores = np.einsum("bd,bsd->bs", query, annotations)
    else:  # s^T W h
        scores = np.einsum("bd,bsd->bs", query, annotations @ params["key"]["kernel"])
    scores = np.where(SRC_MASK, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_scores_follow_the_bahdanau_and_luong_formulas(attention):
    t = tiny(attention)
    np.testing.assert_allclose(
        t.forward_attention()[:, 0], expected_first_step_weights(t, attention), atol=1e-5
    )


def test_encoder_is_bidirectional_and_ignores_padding():
    t = tiny("bahdanau")
    annotations = np.asarray(t.encode(t.variables, SRC)["annotations"])
    assert annotations.shape == (4, 6, t.model.hidden_dim)
    # Changing the last real token of sentence 0 reaches its first annotation (backward direction)...
    last_changed = np.asarray(
        t.encode(t.variables, jnp.asarray(SRC).at[0, 4].set(3))["annotations"]
    )
    assert not np.allclose(last_changed[0, 0], annotations[0, 0])
    # ...and changing its first token reaches its last annotation (forward direction).
    first_changed = np.asarray(
        t.encode(t.variables, jnp.asarray(SRC).at[0, 0].set(3))["annotations"]
    )
    assert not np.allclose(first_changed[0, 4], annotations[0, 4])
    # The other sentences are untouched.
    np.testing.assert_array_equal(first_changed[1:], annotations[1:])


def test_overfits_four_examples():
    t = tiny("bahdanau")
    _, losses = overfit(t.model, t.variables["params"])
    assert losses[-1] < 0.05
