"""models/seq2seq_rnn.py: what is specific to the encoder-decoder RNN (the common interface is checked
for every model in test_registry.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SRC, TGT_IN, overfit

from models.seq2seq_rnn import Seq2SeqRNN


@functools.cache
def tiny(cell: str):
    """(model, variables, jitted encode) for a tiny model with `cell`."""
    model = Seq2SeqRNN(
        11, 13, cell=cell, embed_dim=16, hidden_dim=32, num_layers=2, dropout_rate=0.0
    )
    variables = jax.jit(model.init)(jax.random.key(0), SRC, TGT_IN)
    encode = jax.jit(functools.partial(model.apply, variables, method=model.encode))
    return model, variables, encode


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_decoder_starts_from_the_encoder_final_state_at_the_last_real_token(cell):
    model, variables, encode = tiny(cell)
    memory = encode(SRC)
    state = model.apply(variables, memory, 8, method=model.init_decode_state)
    assert len(state["carries"]) == model.num_layers
    for carry in state["carries"]:
        parts = carry if cell == "lstm" else (carry,)  # an LSTM carry is (c, h)
        assert len(parts) == (2 if cell == "lstm" else 1)
        assert all(part.shape == (4, model.hidden_dim) for part in parts)
    np.testing.assert_array_equal(jax.tree.leaves(state), jax.tree.leaves(memory))
    # Each sentence encoded alone, without padding, ends in the same state.
    for i, length in [(0, 5), (1, 3)]:
        alone = encode(SRC[i : i + 1, :length])
        for batched, single in zip(jax.tree.leaves(memory), jax.tree.leaves(alone), strict=True):
            np.testing.assert_allclose(batched[i], single[0], atol=1e-6)


def test_the_decoder_state_carries_the_source():
    """Without attention, the source reaches the decoder only through the state: swapping the two
    sentences' initial states swaps their next-token distributions."""
    model, variables, encode = tiny("gru")
    memory = encode(SRC)
    state = model.apply(variables, memory, 8, method=model.init_decode_state)
    swapped = jax.tree.map(lambda x: x[jnp.array([1, 0, 2, 3])], state)
    bos = jnp.ones((4,), jnp.int32)
    logits, _ = model.apply(variables, memory, bos, state, method=model.decode_step)
    swapped_logits, _ = model.apply(variables, memory, bos, swapped, method=model.decode_step)
    np.testing.assert_allclose(swapped_logits[:2], logits[jnp.array([1, 0])], atol=1e-6)
    assert not np.allclose(logits[0], logits[1])


def test_overfits_four_examples():
    model, variables, _ = tiny("gru")
    _, losses = overfit(model, variables["params"])
    assert losses[-1] < 0.05
