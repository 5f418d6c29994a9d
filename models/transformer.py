"""Encoder-decoder Transformer (Vaswani et al., 2017) with a KV cache for incremental decoding.

Embeddings scaled by sqrt(d_model) plus sinusoidal positions; multi-head self-attention in the encoder,
causal self-attention and encoder-decoder attention in the decoder; position-wise FFN; residual
connections with LayerNorm before (pre-LN) or after (post-LN, the paper's) each sublayer; dropout on
sublayer outputs, embeddings, FFN activations and attention weights; optional shared source/target
embeddings and output projection tied to the target embedding.

The layers (attention, FFN, encoder and decoder layers) are in `models/transformer_layers.py`; here
they become the model: embeddings, the decoder with its KV cache (`encode`, `init_decode_state`,
`decode_step`), the output projection, and the kernels laid out as decoding reads them (`with_decoding_kernels`).

Decoding speed (see benchmarks/decode.py): the self-attention cache is beam-shared, written in place
and laid out head-major, and the encoder keys/values are read head-major too: `models/kv_cache.py`.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from contracts import BOS_ID, EOS_ID, PAD_ID
from models import common, int8, packed
from models.kv_cache import cached_decoder_layers, empty_decode_state
from models.transformer_layers import (
    ACTIVATIONS,
    DecoderLayer,
    EncoderLayer,
    dense_fields,
    teacher_forced_decoder_layers,
)

POSITION_LAYOUTS = ("interleaved", "halves")


def sinusoidal_positions(max_len: int, d_model: int, layout: str = "interleaved") -> np.ndarray:
    """float32 `[max_len, d_model]` of sin(p / 10000^(2i/d)) and cos(same), i < d/2: "interleaved"
    (Vaswani et al.: PE[p, 2i] = sin, PE[p, 2i+1] = cos) or "halves" (Marian/opus-mt: the sines in
    the first half, PE[p, i], the cosines in the second, PE[p, d/2 + i])."""
    positions = np.arange(max_len, dtype=np.float64)[:, None]
    inv_freq = 10000.0 ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    table = np.zeros((max_len, d_model), np.float64)
    sines, cosines = (slice(0, None, 2), slice(1, None, 2))
    if layout == "halves":
        sines, cosines = slice(0, d_model // 2), slice(d_model // 2, None)
    table[:, sines] = np.sin(positions * inv_freq)
    table[:, cosines] = np.cos(positions * inv_freq)
    return table.astype(np.float32)


# params key of a tied output projection's table packed for decoding: `[d_model, vocab]` in panels
TIED_OUTPUT_KERNEL = "tied_output_kernel"
# the params whose dense layers multiply through `packed.dot_general` (names or name prefixes)
PACKED_LAYERS = ("encoder_layers_", "decoder_layers_", "output")


def with_decoding_kernels(model: "TransformerDecoder", params: dict, empty=np.empty) -> dict:
    """`model`'s `params` as decoding steps read them fastest, one float32 copy of each weight: for
    a float32 model on the CPU, every dense kernel of its layers packed in column panels
    (`packed.pack_params`; the encoder's too) and a tied output projection's table packed as
    `[d_model, vocab]` under `TIED_OUTPUT_KERNEL` in place of `tgt_embed`: the output product
    multiplies by it and the embedding lookups read its columns (`packed.columns`). The panels
    are written into `empty`'s arrays (`packed.pack`). Other dtypes and platforms, and int8 params
    (`int8.TIED_OUTPUT`), come back as they are (a tied projection then multiplies by the table as
    it lies); so do params already prepared."""
    if jnp.dtype(model.dtype) != jnp.float32 or packed.available() is not True:
        return params
    if int8.TIED_OUTPUT in params:
        return params
    layers = {k: v for k, v in params.items() if k.startswith(PACKED_LAYERS)}
    params = {**params, **packed.pack_params(layers, empty)}
    if model.tie_output and "tgt_embed" in params:
        table = np.asarray(params["tgt_embed"]["embedding"])
        params = {k: v for k, v in params.items() if k != "tgt_embed"}
        params[TIED_OUTPUT_KERNEL] = packed.pack(table.T, empty=empty)
    return params


class TransformerDecoder(nn.Module):
    """The Transformer's decoder over a memory of encoder keys/values, shared by the text
    `Transformer` and `models.captioner.TransformerCaptioner` (a field-less base: the model declares
    `tgt_vocab_size`, `d_model`, `num_heads`, `num_decoder_layers`, `ffn_dim`, `dropout_rate`,
    `attention_dropout_rate`, `activation_dropout_rate`, `pre_ln`, `tie_output`, `activation`,
    `max_positions`, `scale_embeddings`, `position_layout`, `final_logits_bias`,
    `layer_norm_epsilon`, `dtype`, `param_dtype`, and calls `setup_decoder` in its `setup`).

    Target embeddings (scaled by sqrt(d_model) with `scale_embeddings`) plus sinusoidal positions,
    `DecoderLayer`s (causal self-attention with the KV cache, encoder-decoder attention, FFN), a
    final LayerNorm when pre-LN, and the output projection (tied to the target embedding or its
    own), plus a learned bias over the vocabulary with `final_logits_bias`.
    """

    def setup_decoder(self):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Std d_model^-1/2, so the sqrt(d_model)-scaled embeddings start with unit variance.
        embed_init = nn.initializers.normal(stddev=self.d_model**-0.5)
        self.tgt_embed = nn.Embed(
            self.tgt_vocab_size, self.d_model, embedding_init=embed_init, **dtypes
        )
        self.decoder_layers = [
            DecoderLayer(**self._layer_fields()) for _ in range(self.num_decoder_layers)
        ]
        if self.pre_ln:
            self.decoder_norm = nn.LayerNorm(epsilon=self.layer_norm_epsilon, **dtypes)
        if self.final_logits_bias:
            self.logits_bias = self.param(
                "logits_bias", nn.initializers.zeros, (self.tgt_vocab_size,), jnp.float32
            )
        if not self.tie_output:
            self.output = nn.Dense(
                self.tgt_vocab_size,
                **{
                    **dense_fields(
                        self
                    ),  # float32 logits whatever the dtype (common.float32_dot_general)
                    "dot_general": functools.partial(
                        packed.dot_general, preferred_element_type=jnp.float32
                    ),
                },
            )
        self.dropout = common.Dropout(self.dropout_rate)
        self.positions = sinusoidal_positions(
            self.max_positions, self.d_model, self.position_layout
        )

    def _layer_fields(self) -> dict:
        return dict(
            d_model=self.d_model,
            num_heads=self.num_heads,
            ffn_dim=self.ffn_dim,
            activation=self.activation,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            activation_dropout_rate=self.activation_dropout,
            pre_ln=self.pre_ln,
            layer_norm_epsilon=self.layer_norm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    @property
    def activation_dropout(self) -> float:
        """The FFN activations' dropout: `activation_dropout_rate`, or `dropout_rate` when None."""
        rate = self.activation_dropout_rate
        return self.dropout_rate if rate is None else rate

    def check_decoder_fields(self) -> None:
        """One-line ValueErrors for the decoder's fields (call in `__post_init__`)."""
        common.check_positive(
            tgt_vocab_size=self.tgt_vocab_size,
            d_model=self.d_model,
            num_heads=self.num_heads,
            num_decoder_layers=self.num_decoder_layers,
            ffn_dim=self.ffn_dim,
            max_positions=self.max_positions,
        )
        common.check_rate(
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            activation_dropout_rate=self.activation_dropout,
        )
        common.check_choice("activation", self.activation, tuple(ACTIVATIONS))
        common.check_choice("position_layout", self.position_layout, POSITION_LAYOUTS)
        if self.d_model % self.num_heads or self.d_model % 2:
            raise ValueError(
                f"d_model={self.d_model} must be even and divisible by num_heads={self.num_heads}"
            )

    def _check_length(self, what: str, length: int) -> None:
        if length > self.max_positions:
            raise ValueError(
                f"{what} length {length} exceeds max_positions={self.max_positions}: raise the "
                "model's max_positions"
            )

    def _packed_table(self) -> packed.PackedKernel | None:
        """A tied table packed for decoding (`with_decoding_kernels`), or None."""
        if self.tie_output and self.has_variable("params", TIED_OUTPUT_KERNEL):
            table = self.get_variable("params", TIED_OUTPUT_KERNEL)
            return table if isinstance(table, packed.PackedKernel) else None
        return None

    def _embed(self, embed: nn.Embed, tokens: jax.Array, positions: jax.Array, train: bool):
        """`[..., d_model]` = sqrt(d_model) * E[tokens] + PE[positions] (E[tokens] unscaled without
        `scale_embeddings`), then dropout. With a tied table packed for decoding, the target
        table's rows are that kernel's columns (`packed.columns`)."""
        table = self._packed_table() if embed is self.tgt_embed else None
        x = embed(tokens) if table is None else packed.columns(table, tokens)
        if self.scale_embeddings:
            x = x * math.sqrt(self.d_model)
        x = x + jnp.asarray(self.positions)[positions]
        return self.dropout(x.astype(self.dtype), deterministic=not train)

    def _logits(self, x: jax.Array, decoding: bool = False) -> jax.Array:
        if self.pre_ln:
            x = self.decoder_norm(x)
        # Over 2-D rows: written on [batch, length, d_model], the teacher-forced gradient for the
        # weights copies the [batch, length, vocab] logits' gradient transposed on XLA:CPU (128 MB,
        # ~13% of Transformer-tiny's train step).
        rows = x.reshape(-1, x.shape[-1])
        if not self.tie_output:
            logits = self.output(rows)
        elif decoding and self.has_variable("params", int8.TIED_OUTPUT):
            logits = int8.int8_logits(rows, self.get_variable("params", int8.TIED_OUTPUT))
        elif (table := self._packed_table()) is not None:
            logits = packed.matmul(rows.astype(jnp.float32), table)
        elif decoding:
            # Rows [N, d_model] times the table [vocab, d_model] transposed. Written as
            # rows . table^T, XLA either re-packs the table at every step or (behind a barrier)
            # copies it transposed once per decode: 119 MB for opus-mt's 58k x 512, ~25% of a
            # batch-1 decode there. With the table as the left operand, contracted on its minor
            # dimension as it lies in memory, neither copy is made; only the small [vocab, rows]
            # result is transposed.
            table = jnp.asarray(self.tgt_embed.embedding, self.dtype)
            logits = jax.lax.dot_general(
                table,
                rows.astype(self.dtype),
                (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
            ).T
        else:
            table = jnp.asarray(self.tgt_embed.embedding, self.dtype)
            logits = jnp.dot(rows.astype(self.dtype), table.T, preferred_element_type=jnp.float32)
        logits = logits.reshape(*x.shape[:-1], logits.shape[-1])
        if self.final_logits_bias:
            logits = logits + self.logits_bias
        return logits  # float32 accumulated: never rounded to the computation dtype

    def cross_kv(self, x: jax.Array) -> tuple:
        """Every decoder layer's encoder-decoder keys/values `[batch, src_len, heads, head_dim]` of
        the encoder output `x [batch, src_len, d_model]`, computed once per source."""
        return tuple(layer.cross_attention.kv(x) for layer in self.decoder_layers)

    def teacher_forced(self, memory: dict, tgt_in: jax.Array, train: bool) -> jax.Array:
        """float32 logits `[batch, tgt_len, tgt_vocab_size]` of `tgt_in` (int32 `[batch, tgt_len]`,
        BOS y1 .. y_{T-1}) given `memory` (`cross_kv`, `mask`); sows each layer's cross-attention
        weights `[batch, heads, tgt_len, src_len]` as `intermediates/cross_attention_<layer>`."""
        tgt_len = tgt_in.shape[1]
        self._check_length("target", tgt_len)
        x = self._embed(self.tgt_embed, tgt_in, jnp.arange(tgt_len), train)
        return self._logits(
            teacher_forced_decoder_layers(self, self.decoder_layers, x, tgt_in, memory, train)
        )

    def init_decode_state(self, memory: dict, max_len: int) -> dict:
        """Empty self-attention KV cache for `max_len` decoded tokens.

        Returns:
          `empty_decode_state`'s dict: `pos` int32 `[batch]` zeros (the next position), `slots` and
          `cache` (`contracts.BeamShared`, per decoder layer (keys, values), computation dtype).
        """
        self._check_length("decode", max_len)
        return empty_decode_state(self, memory, max_len)

    def decode_step(self, memory: dict, tokens: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        """One incremental decoder step; sows each layer's cross-attention weights `[N, heads, src_len]`.

        All rows advance in lockstep (the decoding library feeds every row one token per step), so the
        new keys/values are written into the cache at the shared position `pos[0]` with one
        `dynamic_update_slice`; past positions are never recomputed.

        Args:
          memory: from `encode`, sentence batch first; broadcast over the beams of each sentence.
          tokens: int32 `[N]`, the previous token of each row (N = batch x beam, row n in sentence
            n // beam).
          state: `init_decode_state`'s, rows repeated to N (`cached_decoder_layers`).

        Returns:
          (float32 logits `[N, tgt_vocab_size]`, new state with `pos + 1` and the cache written at `pos`).
        """
        x = self._embed(self.tgt_embed, tokens[:, None], state["pos"][:, None], train=False)
        x, state = cached_decoder_layers(self, self.decoder_layers, x, memory, state)
        return self._logits(x[:, 0], decoding=True), state


class Transformer(TransformerDecoder):
    """Encoder-decoder Transformer.

    Attributes:
      src_vocab_size, tgt_vocab_size: vocabulary sizes (id 0 is padding).
      d_model: model width; num_heads must divide it.
      num_heads: attention heads.
      num_encoder_layers, num_decoder_layers: stack depths.
      ffn_dim: inner size of the position-wise FFN.
      dropout_rate: dropout on embeddings and sublayer outputs.
      attention_dropout_rate: dropout on attention weights.
      activation_dropout_rate: dropout on the FFN's inner activations; None: `dropout_rate`.
      pre_ln: LayerNorm before each sublayer (plus a final one per stack) if True, after the residual
        sum (the original post-LN) if False.
      share_embeddings: one embedding table for source and target (needs equal vocabulary sizes);
        False: separate source and target vocabularies.
      tie_output: the output projection is the target embedding transposed.
      activation: "relu", "gelu" (tanh approximation), "gelu_exact" or "silu" (swish).
      max_positions: longest source, target or decoded sequence (size of the positional table).
      scale_embeddings: token embeddings multiplied by sqrt(d_model) before positions are added.
      position_layout: "interleaved" (sin, cos, sin, ...) or "halves" (Marian's: sines, then cosines).
      final_logits_bias: a float32 bias `[tgt_vocab_size]` added to the logits (Marian's).
      layer_norm_epsilon: every LayerNorm's epsilon (flax's 1e-6; PyTorch's 1e-5).
      pad_id, bos_id, eos_id: the vocabulary's special ids (`contracts.SpecialIds`): sources are
        masked where they hold `pad_id`; decoding starts from `bos_id` and ends at `eos_id`.
      dtype: computation dtype (e.g. jnp.bfloat16 on accelerators); logits are always float32.
      param_dtype: parameter dtype.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 256
    num_heads: int = 4
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    ffn_dim: int = 1024
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    activation_dropout_rate: float | None = None
    pre_ln: bool = True
    share_embeddings: bool = False
    tie_output: bool = True
    activation: str = "relu"
    max_positions: int = 256
    scale_embeddings: bool = True
    position_layout: str = "interleaved"
    final_logits_bias: bool = False
    layer_norm_epsilon: float = 1e-6
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self.check_decoder_fields()
        common.check_positive(
            src_vocab_size=self.src_vocab_size, num_encoder_layers=self.num_encoder_layers
        )
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f"share_embeddings needs equal vocabularies, got src {self.src_vocab_size} and tgt "
                f"{self.tgt_vocab_size}: use a shared vocabulary or share_embeddings=False"
            )
        super().__post_init__()

    def setup(self):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.setup_decoder()
        embed_init = nn.initializers.normal(stddev=self.d_model**-0.5)
        self.src_embed = (
            self.tgt_embed
            if self.share_embeddings
            else nn.Embed(self.src_vocab_size, self.d_model, embedding_init=embed_init, **dtypes)
        )
        self.encoder_layers = [
            EncoderLayer(**self._layer_fields()) for _ in range(self.num_encoder_layers)
        ]
        if self.pre_ln:
            self.encoder_norm = nn.LayerNorm(epsilon=self.layer_norm_epsilon, **dtypes)

    def __call__(self, src: jax.Array, tgt_in: jax.Array, train: bool = False) -> jax.Array:
        """Teacher-forced logits; sows each decoder layer's cross-attention weights
        `[batch, heads, tgt_len, src_len]` as `intermediates/cross_attention_<layer>`.

        Args:
          src: int32 `[batch, src_len]`, padded with `pad_id`.
          tgt_in: int32 `[batch, tgt_len]` (BOS y1 .. y_{T-1}).
          train: enables dropout (needs the 'dropout' rng).

        Returns:
          float32 logits `[batch, tgt_len, tgt_vocab_size]`.
        """
        return self.teacher_forced(self.encode(src, train=train), tgt_in, train)

    def encode(self, src: jax.Array, train: bool = False) -> dict:
        """Runs the encoder and every decoder layer's cross-attention key/value projection, once.

        Args:
          src: int32 `[batch, src_len]`, padded with `pad_id`.

        Returns:
          dict of `cross_kv`: per decoder layer (keys, values) `[batch, src_len, heads, head_dim]`, and
          `mask`: bool `[batch, 1, 1, src_len]`, True at real tokens.
        """
        self._check_length("source", src.shape[1])
        mask = common.padding_mask(src, self.pad_id)[:, None, None, :]
        x = self._embed(self.src_embed, src, jnp.arange(src.shape[1]), train)
        for layer in self.encoder_layers:
            x = layer(x, mask, train)
        if self.pre_ln:
            x = self.encoder_norm(x)
        return {"cross_kv": self.cross_kv(x), "mask": mask}
