"""Pieces shared by the model families: masks, RNN cells, masked softmax, dropout, validation."""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from contracts import PAD_ID, check_positive  # noqa: F401 (re-exported)

CELLS = ("gru", "lstm")


def check_choice(field: str, value: Any, choices: tuple) -> None:
    """Raises a one-line ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not supported: use one of {', '.join(choices)}")


def check_rate(**fields: float) -> None:
    """Raises a one-line ValueError for the first dropout rate outside [0, 1)."""
    for field, value in fields.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{field}={value!r} must be in [0, 1)")


# Random words drawn in one piece at most. XLA:CPU's threefry slows down past about a million words
# (jax 0.10.2, 2-core Xeon: 7.5 ms for 2^20 words, 75 ms for 2^22), so larger masks draw blocks; at
# most DROPOUT_MAX_BLOCKS of them (larger blocks beyond), so a huge activation stays a few ops.
DROPOUT_BLOCK_WORDS = 1 << 20
DROPOUT_MAX_BLOCKS = 16


def keep_mask(key: jax.Array, shape: tuple, threshold: int, block_words: int = DROPOUT_BLOCK_WORDS):
    """bool `shape`, True where a uniform 16-bit draw is >= `threshold` (probability
    `1 - threshold / 65536`): two elements per random 32-bit word, drawn in blocks of `block_words`
    words (more when that would make over `DROPOUT_MAX_BLOCKS`), block i from `fold_in(key, i)`."""
    size = math.prod(shape)
    words = -(-size // 2)
    block_words = max(block_words, -(-words // DROPOUT_MAX_BLOCKS))
    blocks = [
        jax.random.bits(jax.random.fold_in(key, i), (min(block_words, words - start),), jnp.uint32)
        for i, start in enumerate(range(0, words, block_words))
    ]
    bits = jax.lax.bitcast_convert_type(jnp.concatenate(blocks), jnp.uint16).reshape(-1)
    return bits[:size].reshape(shape) >= threshold


class Dropout(nn.Module):
    """Inverted dropout of `rate` (rounded to 1/65536) with the `dropout` rng, as `nn.Dropout`, from a
    quarter of its random bits: 16 per element instead of a float32 uniform (32), drawn in blocks
    (`keep_mask`). On XLA:CPU this makes a [4096, 1024] mask ~3x cheaper; the masks differ from
    `nn.Dropout`'s, the statistics do not."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        threshold = round(self.rate * 65536)
        if deterministic or threshold == 0:
            return x
        keep = keep_mask(self.make_rng("dropout"), x.shape, threshold)
        return jnp.where(keep, x / ((65536 - threshold) / 65536), 0).astype(x.dtype)


def float32_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` that accumulates into and returns float32 whatever its inputs' dtype: the
    output projections use it, so bfloat16 models still give float32 logits, never rounded ones
    (bfloat16 keeps 8 bits: ~0.06 at |logit| ~ 10, enough to create ties in beam search)."""
    del preferred_element_type
    return jax.lax.dot_general(
        lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32
    )


def fused_attention(dtype: Any, head_dim: int) -> str | None:
    """The fused kernel for teacher-forced attention on this backend, chosen at trace time: "cudnn"
    (cuDNN's fused flash attention through `jax.nn.dot_product_attention`) on GPU for bfloat16 or
    float16 with `head_dim` a multiple of 8 up to 128, which it supports; else None: the einsum +
    masked softmax path (XLA:CPU's fastest, and on GPU XLA's own attention kernel computes just
    that). Both give the same attention (tests/test_transformer.py, XLA's kernel forced on CPU)."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return None


def padding_mask(tokens: jax.Array, pad_id: int = PAD_ID) -> jax.Array:
    """`[batch, length]` bool, True at real tokens (id != `pad_id`)."""
    return tokens != pad_id


def beams_per_sentence(batch_size: int, num_rows: int) -> int:
    """Beam width of a decode step: `num_rows = batch_size x beam` rows, row n in sentence n // beam."""
    if num_rows % batch_size:
        raise ValueError(
            f"decode_step got {num_rows} rows for a memory of {batch_size} sentences: "
            "the rows must be the sentences times the beam width ([batch, beam] flattened)"
        )
    return num_rows // batch_size


def rnn_cell(kind: str, features: int, dtype: Any, param_dtype: Any) -> nn.RNNCellBase:
    """A GRU or (fused-gate) LSTM cell; `cell(carry, x [batch, in]) -> (carry, h [batch, features])`."""
    if kind == "gru":
        return nn.GRUCell(features, dtype=dtype, param_dtype=param_dtype)
    return nn.OptimizedLSTMCell(features, dtype=dtype, param_dtype=param_dtype)


def cell_hidden(kind: str, carry: Any) -> jax.Array:
    """The hidden state `h [batch, features]` inside a cell's carry (an LSTM carry is `(c, h)`)."""
    return carry[1] if kind == "lstm" else carry


def carry_from_hidden(kind: str, hidden: jax.Array) -> Any:
    """A cell carry whose hidden state is `hidden [batch, features]` (an LSTM's memory cell starts at 0)."""
    return (jnp.zeros_like(hidden), hidden) if kind == "lstm" else hidden


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 softmax over the last axis, exactly 0 where `mask` (broadcastable) is False.

    Masked scores become the most negative float32, not -inf, so a row with no unmasked position gives
    a uniform distribution instead of NaN.
    """
    scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)
