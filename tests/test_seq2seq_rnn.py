"""models/seq2seq_rnn.py: what is specific to the encoder-decoder RNN (the common interface is checked
for every model in test_registry.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models.seq2seq_rnn import Seq2SeqRNN

# Four examples: trailing source padding, targets of different lengths (BOS=1, EOS=2, pad=0).
SRC = jnp.array(
    [[5, 6, 7, 8, 9, 0], [4, 10, 3, 0, 0, 0], [7, 7, 8, 0, 0, 0], [9, 4, 5, 6, 0, 0]], jnp.int32
)
TGT_IN = jnp.array(
    [[1, 4, 5, 6, 7, 0], [1, 8, 9, 0, 0, 0], [1, 10, 11, 12, 0, 0], [1, 6, 5, 4, 3, 12]], jnp.int32
)
TGT_OUT = jnp.array(
    [[4, 5, 6, 7, 2, 0], [8, 9, 2, 0, 0, 0], [10, 11, 12, 2, 0, 0], [6, 5, 4, 3, 12, 2]], jnp.int32
)


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


def masked_cross_entropy(logits, targets):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    mask = targets != 0
    return jnp.sum(losses * mask) / jnp.sum(mask)


def test_overfits_four_examples():
    model, variables, _ = tiny("gru")
    optimizer = optax.adam(1e-2)

    @jax.jit
    def train_step(params, opt_state):
        loss_fn = lambda p: masked_cross_entropy(model.apply({"params": p}, SRC, TGT_IN), TGT_OUT)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    params = variables["params"]
    opt_state = optimizer.init(params)
    for _ in range(200):
        params, opt_state, loss = train_step(params, opt_state)
    assert loss < 0.05
