"""Image captioner: a small CNN encoder and an attention decoder (Show, Attend and Tell; Xu et al., 2015).

The conditional language model of the text models with the source sentence replaced by an image. A
CNN (flax.linen.Conv; per stage a 3x3 convolution then a 3x3 stride-2 convolution, each with ReLU,
channels doubling per stage) turns an image `[B, H, W, C]` into a grid of feature vectors
`[B, H', W', F]`, `H' = ceil(H / 2^num_stages)`. Each grid vector is projected to `d_model`, a fixed
2D sinusoidal position code is added (half the channels code the row, half the column: captions say
where things are, and convolutions alone hardly know), then LayerNorm. The grid flattened row-major,
`[B, H'*W', d_model]`, with a mask of ones, is the memory the decoder attends over at every step, as
it would attend over a source sentence's annotations:

- `decoder="rnn"` (Show, Attend and Tell): the attention RNN's own decoder step
  (`models.attention_rnn.AttentionDecoderStep`: Bahdanau or Luong attention over the grid from the
  previous state, GRU/LSTM cells fed [E y_{t-1}; context], deep output), started from
  `tanh(W_l mean(grid))` per layer as in the paper;
- `decoder="transformer"`: the Transformer's decoder layers (`models.transformer.DecoderLayer`:
  causal self-attention with a KV cache, cross-attention over the grid, FFN), target embeddings
  scaled by sqrt(d_model) plus sinusoidal positions.

The interface is the text models' (README "Design"), so `decoding`, `train.py` and `eval.py` use it
unchanged: `__call__(src, tgt_in, train)`, `encode(src)`, `init_decode_state(memory, max_len)`,
`decode_step(memory, tokens, state)`, with `src` float `[B, H, W, C]` images instead of token ids.
Attention weights are sown as `intermediates/attention` `[B, T, H'*W']` (rnn) or
`cross_attention_<layer>` `[B, heads, T, H'*W']` (transformer); `grid_shape(H, W)` gives `(H', W')`
to fold them back onto the image.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models import common
from models.attention_rnn import ATTENTIONS, AttentionDecoderStep
from models.transformer import (
    ACTIVATIONS,
    DecoderLayer,
    cached_decoder_layers,
    empty_decode_state,
    sinusoidal_positions,
    teacher_forced_decoder_layers,
)

DECODERS = ("rnn", "transformer")


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


class Captioner(nn.Module):
    """CNN encoder + attention RNN (Show, Attend and Tell) or Transformer decoder over the grid.

    Attributes:
      src_vocab_size: unused (the source is an image); kept for the registry's common constructor.
      tgt_vocab_size: caption vocabulary size (id 0 is padding).
      decoder: "rnn" (attention RNN) or "transformer".
      image_channels: channels of the input images (1: grey).
      num_stages: CNN stages, each halving the height and width.
      channels: first stage's convolution channels, doubled at each further stage.
      d_model: size of a grid feature vector in the memory (and the Transformer decoder's width;
        a multiple of 4 for the 2D position code).
      cell, embed_dim, hidden_dim, num_layers, attention, attention_dim: the rnn decoder's, as in
        `AttentionRNN` (`luong_dot` needs hidden_dim == d_model). Unused by the transformer decoder.
      num_heads, num_decoder_layers, ffn_dim, attention_dropout_rate, pre_ln, activation, max_len:
        the transformer decoder's, as in `Transformer` (max_len: longest caption or decode).
        Unused by the rnn decoder.
      dropout_rate: dropout on the grid features, embeddings, between layers and before the output.
      dtype: computation dtype (e.g. jnp.bfloat16 on accelerators); logits are always float32.
      param_dtype: parameter dtype.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    decoder: str = "rnn"
    image_channels: int = 1
    num_stages: int = 2
    channels: int = 32
    d_model: int = 128
    cell: str = "gru"
    embed_dim: int = 64
    hidden_dim: int = 128
    num_layers: int = 1
    attention: str = "bahdanau"
    attention_dim: int = 128
    num_heads: int = 4
    num_decoder_layers: int = 2
    ffn_dim: int = 256
    attention_dropout_rate: float = 0.1
    pre_ln: bool = True
    activation: str = "relu"
    max_len: int = 128
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        common.check_choice("decoder", self.decoder, DECODERS)
        common.check_choice("cell", self.cell, common.CELLS)
        common.check_choice("attention", self.attention, ATTENTIONS)
        common.check_choice("activation", self.activation, tuple(ACTIVATIONS))
        common.check_positive(
            src_vocab_size=self.src_vocab_size,
            tgt_vocab_size=self.tgt_vocab_size,
            image_channels=self.image_channels,
            num_stages=self.num_stages,
            channels=self.channels,
            d_model=self.d_model,
            embed_dim=self.embed_dim,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            attention_dim=self.attention_dim,
            num_heads=self.num_heads,
            num_decoder_layers=self.num_decoder_layers,
            ffn_dim=self.ffn_dim,
            max_len=self.max_len,
        )
        common.check_rate(
            dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate
        )
        if self.d_model % 4:
            raise ValueError(
                f"d_model={self.d_model} must be a multiple of 4 (the 2D position code gives each "
                "of row and column d_model / 2 sine/cosine channels)"
            )
        if self.decoder == "transformer" and self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}"
            )
        if (
            self.decoder == "rnn"
            and self.attention == "luong_dot"
            and self.d_model != self.hidden_dim
        ):
            raise ValueError(
                f"attention='luong_dot' needs d_model == hidden_dim, got {self.d_model} and "
                f"{self.hidden_dim}: use luong_general or bahdanau, or equal sizes"
            )
        super().__post_init__()

    # ----------------------------------------------------------------------------- image helpers

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

    def _check_images(self, src: jax.Array) -> None:
        if (
            src.ndim != 4
            or not jnp.issubdtype(src.dtype, jnp.floating)
            or src.shape[-1] != self.image_channels
        ):
            raise ValueError(
                f"captioner reads float images [batch, height, width, {self.image_channels}], got "
                f"{src.dtype} {list(src.shape)}: use an image-captioning dataset (digit_captions)"
            )

    # ------------------------------------------------------------------------------------- setup

    def setup(self):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.cnn = ConvEncoder(self.num_stages, self.channels, **dtypes)
        self.project = nn.Dense(self.d_model, **dtypes)
        self.grid_norm = nn.LayerNorm(**dtypes)
        self.dropout = nn.Dropout(self.dropout_rate)
        self.output = nn.Dense(self.tgt_vocab_size, **dtypes)
        if self.decoder == "rnn":
            self.tgt_embed = nn.Embed(self.tgt_vocab_size, self.embed_dim, **dtypes)
            if self.attention == "bahdanau":
                self.key = nn.Dense(self.attention_dim, **dtypes)
            elif self.attention == "luong_general":
                self.key = nn.Dense(self.hidden_dim, use_bias=False, **dtypes)
            self.bridge = [nn.Dense(self.hidden_dim, **dtypes) for _ in range(self.num_layers)]
            self.rnn_decoder = AttentionDecoderStep(
                self.cell,
                self.hidden_dim,
                self.num_layers,
                self.attention,
                self.attention_dim,
                self.dropout_rate,
                **dtypes,
            )
        else:
            embed_init = nn.initializers.normal(stddev=self.d_model**-0.5)
            self.tgt_embed = nn.Embed(
                self.tgt_vocab_size, self.d_model, embedding_init=embed_init, **dtypes
            )
            self.decoder_layers = [
                DecoderLayer(
                    d_model=self.d_model,
                    num_heads=self.num_heads,
                    ffn_dim=self.ffn_dim,
                    activation=self.activation,
                    dropout_rate=self.dropout_rate,
                    attention_dropout_rate=self.attention_dropout_rate,
                    activation_dropout_rate=self.dropout_rate,
                    pre_ln=self.pre_ln,
                    **dtypes,
                )
                for _ in range(self.num_decoder_layers)
            ]
            if self.pre_ln:
                self.decoder_norm = nn.LayerNorm(**dtypes)
            self.positions = sinusoidal_positions(self.max_len, self.d_model)

    # ---------------------------------------------------------------------------------- interface

    def __call__(self, src: jax.Array, tgt_in: jax.Array, train: bool = False) -> jax.Array:
        """Teacher-forced logits; sows the attention over the grid (module docstring).

        Args:
          src: float `[batch, height, width, image_channels]` images (the pipeline's are in [0, 1]).
          tgt_in: int32 `[batch, tgt_len]` (BOS y1 .. y_{T-1}), 0-padded.
          train: enables dropout (needs the 'dropout' rng).

        Returns:
          float32 logits `[batch, tgt_len, tgt_vocab_size]`.
        """
        memory = self.encode(src, train=train)
        if self.decoder == "rnn":
            embedded = self.dropout(self.tgt_embed(tgt_in), deterministic=not train)
            scan = nn.scan(
                lambda decoder, carries, x_t, memory: decoder(carries, x_t, memory, train),
                variable_broadcast="params",
                split_rngs={"params": False, "dropout": True},
                in_axes=(1, nn.broadcast),
                out_axes=1,
            )
            _, (features, weights) = scan(
                self.rnn_decoder, self.initial_carries(memory), embedded, memory
            )
            self.sow("intermediates", "attention", weights)
            return self.output(features).astype(jnp.float32)
        tgt_len = tgt_in.shape[1]
        self._check_length("target", tgt_len)
        x = self._embed(tgt_in, jnp.arange(tgt_len), train)
        return self._logits(
            teacher_forced_decoder_layers(self, self.decoder_layers, x, tgt_in, memory, train)
        )

    def encode(self, src: jax.Array, train: bool = False) -> dict:
        """Runs the CNN and builds the memory of grid features (and the decoder's source side).

        Args:
          src: float `[batch, height, width, image_channels]` images.

        Returns:
          rnn: dict of `annotations [batch, S, d_model]` (S = H' * W', row-major), attention
          `keys [batch, S, key_dim]` and `mask [batch, S]` (bool, all True);
          transformer: dict of `cross_kv`, per decoder layer (keys, values)
          `[batch, S, heads, head_dim]`, and `mask` bool `[batch, 1, 1, S]` (all True).
        """
        self._check_images(src)
        grid = self.cnn(src.astype(self.dtype))  # [batch, H', W', channels']
        batch, height, width, features = grid.shape
        x = self.project(grid.reshape(batch, height * width, features))
        x = x + jnp.asarray(grid_positions(height, width, self.d_model), x.dtype)
        x = self.dropout(self.grid_norm(x), deterministic=not train)
        mask = jnp.ones((batch, height * width), jnp.bool_)
        if self.decoder == "rnn":
            keys = x if self.attention == "luong_dot" else self.key(x)
            return {"annotations": x, "keys": keys, "mask": mask}
        cross_kv = tuple(layer.cross_attention.kv(x) for layer in self.decoder_layers)
        return {"cross_kv": cross_kv, "mask": mask[:, None, None, :]}

    def init_decode_state(self, memory: dict, max_len: int) -> dict:
        """Decoder state before BOS, leaves with the sentence batch first.

        rnn: per-layer carries `tanh(W_l mean(grid))`, leaves `[batch, hidden_dim]` (`max_len` unused);
        transformer: `models.transformer.empty_decode_state`'s (`pos`, `slots`, and the self-attention
        `cache` per layer, which beam search does not reorder).
        """
        if self.decoder == "rnn":
            del max_len
            return {"carries": self.initial_carries(memory)}
        self._check_length("decode", max_len)
        return empty_decode_state(self, memory, max_len)

    def decode_step(self, memory: dict, tokens: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        """One incremental decoder step; sows the attention over the grid: `attention [N, S]` (rnn)
        or `cross_attention_<layer> [N, heads, S]` (transformer).

        Args:
          memory: from `encode`, image batch first; broadcast over the beams of each image.
          tokens: int32 `[N]`, the previous token of each row (N = batch x beam, row n in image
            n // beam).
          state: from `init_decode_state` with every leaf's first axis N.

        Returns:
          (float32 logits `[N, tgt_vocab_size]`, new state of the same structure).
        """
        if self.decoder == "rnn":
            carries, (features, weights) = self.rnn_decoder(
                state["carries"], self.tgt_embed(tokens), memory, train=False
            )
            self.sow("intermediates", "attention", weights)
            return self.output(features).astype(jnp.float32), {"carries": carries}
        x = self._embed(tokens[:, None], state["pos"][:, None], train=False)
        x, state = cached_decoder_layers(self, self.decoder_layers, x, memory, state)
        return self._logits(x[:, 0]), state

    # ------------------------------------------------------------------------------------ helpers

    def initial_carries(self, memory: dict) -> tuple:
        """rnn: per-layer decoder carries `tanh(W_l mean(grid))`, leaves `[batch, hidden_dim]`."""
        mean = jnp.mean(memory["annotations"], axis=1)
        return tuple(common.carry_from_hidden(self.cell, jnp.tanh(b(mean))) for b in self.bridge)

    def _check_length(self, what: str, length: int) -> None:
        if length > self.max_len:
            raise ValueError(
                f"{what} length {length} exceeds max_len={self.max_len}: raise the captioner's "
                "max_len"
            )

    def _embed(self, tokens: jax.Array, positions: jax.Array, train: bool) -> jax.Array:
        """transformer: `[..., d_model]` = sqrt(d_model) * E[tokens] + PE[positions], then dropout."""
        x = (
            self.tgt_embed(tokens) * math.sqrt(self.d_model)
            + jnp.asarray(self.positions)[positions]
        )
        return self.dropout(x.astype(self.dtype), deterministic=not train)

    def _logits(self, x: jax.Array) -> jax.Array:
        if self.pre_ln:
            x = self.decoder_norm(x)
        return self.output(x).astype(jnp.float32)
