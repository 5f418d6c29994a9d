"""Image captioner: a small CNN encoder and an attention decoder (Show, Attend and Tell; Xu et al., 2015).

The conditional language model of the text models with the source sentence replaced by an image. A
CNN (flax.linen.Conv; per stage a 3x3 convolution then a 3x3 stride-2 convolution, each with ReLU,
channels doubling per stage) turns an image `[B, H, W, C]` into a grid of feature vectors
`[B, H', W', F]`, `H' = ceil(H / 2^num_stages)`. Each grid vector is projected to `d_model`, a fixed
2D sinusoidal position code is added (half the channels code the row, half the column: captions say
where things are, and convolutions alone hardly know), then LayerNorm. The grid flattened row-major,
`[B, H'*W', d_model]`, with a mask of ones, is the memory the decoder attends over at every step, as
it would attend over a source sentence's annotations:

- `RNNCaptioner` (model "captioner_rnn"; Show, Attend and Tell): the attention RNN's decoder
  (`models.attention_rnn.AttentionRNNDecoder`: Bahdanau or Luong attention over the grid from the
  previous state, GRU/LSTM cells fed [E y_{t-1}; context], deep output), started from
  `tanh(W_l mean(grid))` per layer as in the paper;
- `TransformerCaptioner` (model "captioner_transformer"): the Transformer's decoder
  (`models.transformer.TransformerDecoder`: causal self-attention with a KV cache, cross-attention
  over the grid, FFN), target embeddings scaled by sqrt(d_model) plus sinusoidal positions.

The interface is the text models' (docs/design.md), so `decoding`, `train.py` and `eval.py` use it
unchanged: `__call__(src, tgt_in, train)`, `encode(src)`, `init_decode_state(memory, max_len)`,
`decode_step(memory, tokens, state)`, with `src` float `[B, H, W, C]` images instead of token ids.
Attention weights are sown as `intermediates/attention` `[B, T, H'*W']` (rnn) or
`cross_attention_<layer>` `[B, heads, T, H'*W']` (transformer); `grid_shape(H, W)` gives `(H', W')`
to fold them back onto the image.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models import common
from models.attention_rnn import AttentionRNNDecoder
from models.transformer import TransformerDecoder, sinusoidal_positions


def grid_positions(height: int, width: int, d_model: int) -> np.ndarray:
    """float32 `[height * width, d_model]`, row-major: the row's sinusoidal code (`d_model / 2`
    channels) next to the column's. `d_model` must be a multiple of 4."""
    half = d_model // 2
    rows = np.repeat(sinusoidal_positions(height, half), width, axis=0)
    cols = np.tile(sinusoidal_positions(width, half), (height, 1))
    return np.concatenate([rows, cols], axis=-1)


class ConvEncoder(nn.Module):
    """`num_stages` x (3x3 conv, ReLU, 3x3 stride-2 conv, ReLU); channels `channels * 2^stage`.

    `[B, H, W, C]` -> `[B, ceil(H / 2^num_stages), ceil(W / 2^num_stages), channels * 2^(num_stages-1)]`
    ('SAME' padding).
    """

    num_stages: int
    channels: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for stage in range(self.num_stages):
            features = self.channels * 2**stage
            for strides in ((1, 1), (2, 2)):
                conv = nn.Conv(
                    features,
                    (3, 3),
                    strides=strides,
                    padding="SAME",
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                )
                x = nn.relu(conv(x))
        return x


class ImageEncoder(nn.Module):
    """The captioners' encoder and the fields every captioner has: `ConvEncoder`, a projection of
    each grid vector to `d_model`, the 2D position code, LayerNorm and dropout (the decoder's
    `dropout`). A captioner adds its decoder's fields and calls `setup_encoder` in its `setup`.

    Attributes:
      src_vocab_size: unused (the source is an image); kept for the registry's common constructor.
      tgt_vocab_size: caption vocabulary size (id 0 is padding).
      image_channels: channels of the input images (1: grey).
      num_stages: CNN stages, each halving the height and width.
      channels: first stage's convolution channels, doubled at each further stage.
      d_model: size of a grid feature vector in the memory (a multiple of 4 for the 2D position
        code; the Transformer decoder's width).
      dropout_rate: dropout on the grid features and in the decoder.
      dtype: computation dtype (e.g. jnp.bfloat16 on accelerators); logits are always float32.
      param_dtype: parameter dtype.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    image_channels: int = 1
    num_stages: int = 2
    channels: int = 32
    d_model: int = 128
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup_encoder(self):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.cnn = ConvEncoder(self.num_stages, self.channels, **dtypes)
        self.project = nn.Dense(self.d_model, **dtypes)
        self.grid_norm = nn.LayerNorm(**dtypes)

    def check_encoder_fields(self) -> None:
        common.check_positive(
            src_vocab_size=self.src_vocab_size,
            image_channels=self.image_channels,
            num_stages=self.num_stages,
            channels=self.channels,
            d_model=self.d_model,
        )
        if self.d_model % 4:
            raise ValueError(
                f"d_model={self.d_model} must be a multiple of 4 (the 2D position code gives each "
                "of row and column d_model / 2 sine/cosine channels)"
            )

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') of the feature grid of `height x width` images: memory positions are
        `H' * W'`, row-major (each stride-2 'SAME' convolution rounds up)."""
        for _ in range(self.num_stages):
            height, width = -(-height // 2), -(-width // 2)
        return height, width

    def example_source(self) -> jax.Array:
        """A one-image batch float32 `[1, 2^num_stages, 2^num_stages, image_channels]` of zeros, for
        `init`: no parameter depends on the image size."""
        side = 2**self.num_stages
        return jnp.zeros((1, side, side, self.image_channels), jnp.float32)

    def grid_features(self, src: jax.Array, train: bool) -> jax.Array:
        """`[batch, S, d_model]` grid features of float images `src [batch, height, width,
        image_channels]` (S = H' * W', row-major)."""
        if (
            src.ndim != 4
            or not jnp.issubdtype(src.dtype, jnp.floating)
            or src.shape[-1] != self.image_channels
        ):
            raise ValueError(
                f"captioner reads float images [batch, height, width, {self.image_channels}], got "
                f"{src.dtype} {list(src.shape)}: use an image-captioning dataset (digit_captions)"
            )
        grid = self.cnn(src.astype(self.dtype))  # [batch, H', W', channels']
        batch, height, width, features = grid.shape
        x = self.project(grid.reshape(batch, height * width, features))
        x = x + jnp.asarray(grid_positions(height, width, self.d_model), x.dtype)
        return self.dropout(self.grid_norm(x), deterministic=not train)


class RNNCaptioner(ImageEncoder, AttentionRNNDecoder):
    """CNN encoder + attention RNN decoder over the grid (Show, Attend and Tell).

    Attributes: `ImageEncoder`'s, and `cell`, `embed_dim`, `hidden_dim`, `num_layers`, `attention`,
    `attention_dim` as in `AttentionRNN` (`luong_dot` needs hidden_dim == d_model).
    """

    cell: str = "gru"
    embed_dim: int = 64
    hidden_dim: int = 128
    num_layers: int = 1
    attention: str = "bahdanau"
    attention_dim: int = 128

    def __post_init__(self):
        self.check_encoder_fields()
        self.check_decoder_fields()
        if self.attention == "luong_dot" and self.d_model != self.hidden_dim:
            raise ValueError(
                f"attention='luong_dot' needs d_model == hidden_dim, got {self.d_model} and "
                f"{self.hidden_dim}: use luong_general or bahdanau, or equal sizes"
            )
        super().__post_init__()

    def setup(self):
        self.setup_encoder()
        self.setup_decoder()

    def __call__(self, src: jax.Array, tgt_in: jax.Array, train: bool = False) -> jax.Array:
        """Teacher-forced logits `[batch, tgt_len, tgt_vocab_size]` (float32) of captions `tgt_in`
        (int32, BOS y1 .. y_{T-1}) for images `src [batch, height, width, image_channels]`; sows
        the attention over the grid `[batch, tgt_len, S]` as `intermediates/attention`."""
        return self.teacher_forced(self.encode(src, train=train), tgt_in, train)

    def encode(self, src: jax.Array, train: bool = False) -> dict:
        """dict of `annotations [batch, S, d_model]` (the grid, S = H' * W', row-major), attention
        `keys [batch, S, key_dim]` and `mask [batch, S]` (bool, all True)."""
        x = self.grid_features(src, train)
        mask = jnp.ones(x.shape[:2], jnp.bool_)
        return {"annotations": x, "keys": self.attention_keys(x), "mask": mask}


class TransformerCaptioner(ImageEncoder, TransformerDecoder):
    """CNN encoder + Transformer decoder over the grid.

    Attributes: `ImageEncoder`'s (d_model: also a multiple of num_heads), and `num_heads`,
    `num_decoder_layers`, `ffn_dim`, `attention_dropout_rate`, `activation_dropout_rate`, `pre_ln`,
    `tie_output`, `activation`, `max_positions`, `scale_embeddings`, `position_layout`,
    `final_logits_bias`, `layer_norm_epsilon` as in `Transformer` (max_positions: longest caption
    or decode).
    """

    num_heads: int = 4
    num_decoder_layers: int = 2
    ffn_dim: int = 256
    attention_dropout_rate: float = 0.1
    activation_dropout_rate: float | None = None
    pre_ln: bool = True
    tie_output: bool = False
    activation: str = "relu"
    max_positions: int = 128
    scale_embeddings: bool = True
    position_layout: str = "interleaved"
    final_logits_bias: bool = False
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        self.check_encoder_fields()
        self.check_decoder_fields()
        super().__post_init__()

    def setup(self):
        self.setup_encoder()
        self.setup_decoder()

    def __call__(self, src: jax.Array, tgt_in: jax.Array, train: bool = False) -> jax.Array:
        """Teacher-forced logits `[batch, tgt_len, tgt_vocab_size]` (float32) of captions `tgt_in`
        for images `src`; sows `cross_attention_<layer>` `[batch, heads, tgt_len, S]`."""
        return self.teacher_forced(self.encode(src, train=train), tgt_in, train)

    def encode(self, src: jax.Array, train: bool = False) -> dict:
        """dict of `cross_kv`, per decoder layer (keys, values) `[batch, S, heads, head_dim]` of the
        grid, and `mask` bool `[batch, 1, 1, S]` (all True)."""
        x = self.grid_features(src, train)
        mask = jnp.ones((x.shape[0], 1, 1, x.shape[1]), jnp.bool_)
        return {"cross_kv": self.cross_kv(x), "mask": mask}
