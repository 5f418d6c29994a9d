"""Encoder-decoder Transformer (Vaswani et al., 2017) with a KV cache for incremental decoding.

Embeddings scaled by sqrt(d_model) plus sinusoidal positions; multi-head self-attention in the encoder,
causal self-attention and encoder-decoder attention in the decoder; position-wise FFN; residual
connections with LayerNorm before (pre-LN) or after (post-LN, the paper's) each sublayer; dropout on
sublayer outputs, embeddings, FFN activations and attention weights; optional shared source/target
embeddings and output projection tied to the target embedding.

Attention is written here with flax's projections (`nn.DenseGeneral`) rather than taken from
`nn.MultiHeadDotProductAttention`, whose decode cache breaks the decoding contract: it keeps a *scalar*
`cache_index` in a mutable collection (state leaves must have the N = batch x beam rows first, so beam
search can reorder them with one gather) and recomputes the cross-attention keys/values from the encoder
output at every step. Here `encode` computes each decoder layer's cross-attention K/V once, with the
sentence batch first, `decode_step` broadcasts them over the beams of each sentence (the beams of a
sentence are just more queries against the same keys), and the self-attention cache is preallocated in
`init_decode_state` and written in place with `lax.dynamic_update_slice`. The teacher-forced and the
incremental paths call the same `MultiHeadAttention` modules, so they share parameters and agree to
float rounding.

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
from models import common, int8
from models.kv_cache import (
    beam_cache_mix,
    beam_cache_scores,
    cached_decoder_layers,
    empty_decode_state,
    read_then_write,
)

ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,  # the tanh approximation (flax's default)
    "gelu_exact": functools.partial(nn.gelu, approximate=False),  # torch's nn.GELU()
    "silu": nn.silu,  # x * sigmoid(x), Marian's "swish"
}
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


# params key of a tied output projection's table transposed for decoding, [d_model, vocab]
TIED_OUTPUT_KERNEL = "tied_output_kernel"


def with_output_kernel(params: dict, dtype: Any = jnp.float32) -> dict:
    """`params` of a Transformer with a tied output projection plus `TIED_OUTPUT_KERNEL`: the target
    embedding table transposed, `[d_model, vocab]` in the computation `dtype`, a copy made once.

    Decoding steps multiply their rows by it instead of by the table (which lookups still use): on
    XLA:CPU a `[N, d_model] x [d_model, vocab]` product reads the weights faster than the table as
    it lies, `[vocab, d_model]`, contracted on its minor dimension (1.15x a beam 4, batch 1 decode
    of the decode benchmark's model; docs/benchmarks.md, "Batch 1 on the AMD EPYC"). The price is
    the copy: vocab x d_model more floats while decoding (8 MB at 8k x 256, 119 MB at 58k x 512).
    """
    return {**params, TIED_OUTPUT_KERNEL: _transposed(params["tgt_embed"]["embedding"], dtype)}


# params key, in each decoder layer's `ffn`, of its outer kernel transposed, [d_model, ffn_dim]
ONE_ROW_OUTER_KERNEL = "one_row_outer_kernel"


def with_one_row_kernels(params: dict, dtype: Any = jnp.float32) -> dict:
    """`params` of a Transformer decoder plus, in each decoder layer's FFN, `ONE_ROW_OUTER_KERNEL`:
    its outer kernel `[ffn_dim, d_model]` transposed to `[d_model, ffn_dim]` in the computation
    `dtype`, a copy made once. int8 kernels (`int8.Int8Array`) get none.

    A step of one row (greedy or sampling at batch 1) multiplies its row by it, contracted on its
    minor dimension: XLA:CPU's matrix-vector product then runs along the long (`ffn_dim`) rows of
    the copy instead of across its short ones: 1.04-1.08x a greedy batch-1 decode of the decode
    benchmark's model, 1.03-1.05x at opus-mt-en-de's size (docs/benchmarks.md, "Batch 1 on the
    AMD EPYC"); at more rows the kernel as it lies is faster, so both are kept (ffn_dim x d_model
    more floats per decoder layer).
    """
    prepared = dict(params)
    for name, layer in params.items():
        if name.startswith("decoder_layers_") and ONE_ROW_OUTER_KERNEL not in layer["ffn"]:
            kernel = layer["ffn"]["outer"]["kernel"]
            if not isinstance(kernel, int8.Int8Array):
                ffn = {**layer["ffn"], ONE_ROW_OUTER_KERNEL: _transposed(kernel, dtype)}
                prepared[name] = {**layer, "ffn": ffn}
    return prepared


def with_decoding_kernels(model: "TransformerDecoder", params: dict) -> dict:
    """`model`'s `params` plus every copy its decoding steps read: a tied table transposed
    (`with_output_kernel`; not beside int8 params' own int8 table) and each decoder FFN's outer
    kernel transposed (`with_one_row_kernels`). Copies already there are not made again."""
    if model.tie_output and TIED_OUTPUT_KERNEL not in params and int8.TIED_OUTPUT not in params:
        params = with_output_kernel(params, model.dtype)
    return with_one_row_kernels(params, model.dtype)


@functools.partial(jax.jit, static_argnums=1)
def _transposed(table: jax.Array, dtype: Any) -> jax.Array:
    return jnp.asarray(table, dtype).T


def dense_fields(module: nn.Module) -> dict:
    """The fields of every dense layer of the Transformer: the module's dtypes, and `models.int8`'s
    product, which is flax's own for float kernels and the int8 one for `int8.quantize_params`'."""
    return dict(
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        dot_general=int8.dot_general,
        promote_dtype=int8.promote_dtype,
    )


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with `num_heads` heads; keys/values projected separately (`kv`) so
    they can be computed once and cached.

    Queries `[batch, q_len, d_model]` attend over keys/values `[batch, kv_len, heads, head_dim]` of the
    same leading `batch`; beams of a sentence are passed as extra query positions of that sentence.
    """

    d_model: int
    num_heads: int
    dropout_rate: float
    dtype: Any
    param_dtype: Any

    def setup(self):
        head_dim = self.d_model // self.num_heads
        dense = dict(kernel_init=nn.initializers.xavier_uniform(), **dense_fields(self))
        self.query = nn.DenseGeneral((self.num_heads, head_dim), **dense)
        self.key = nn.DenseGeneral((self.num_heads, head_dim), **dense)
        self.value = nn.DenseGeneral((self.num_heads, head_dim), **dense)
        self.out = nn.DenseGeneral(self.d_model, axis=(-2, -1), **dense)
        self.dropout = common.Dropout(self.dropout_rate)

    def fused_kernel(self, train: bool) -> str | None:
        """The fused kernel this (teacher-forced) call uses (`common.fused_attention`), or None for
        the einsum path: always None when its weights are asked for (sown `intermediates`) or dropped
        out (training with attention dropout), which a fused kernel cannot give."""
        if (train and self.dropout_rate > 0) or self.is_mutable_collection("intermediates"):
            return None
        return common.fused_attention(self.dtype, self.d_model // self.num_heads)

    def kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values `[batch, len, heads, head_dim]` of `x [batch, len, d_model]`."""
        return self.key(x), self.value(x)

    def __call__(
        self,
        x: jax.Array,
        keys: jax.Array,
        values: jax.Array,
        mask: jax.Array,
        train: bool,
        head_major: bool = False,
        holds: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Args:
          x: queries `[batch, q_len, d_model]`.
          keys, values: `[batch, kv_len, heads, head_dim]`; or with `head_major` a KV cache, keys
            `[batch, heads, head_dim, kv_len]` and values `[batch, heads, kv_len, head_dim]`, which
            per-head batched matmuls read as they lie (the sequence-major layout would be
            transposed whole at every decoding step).
          mask: bool, broadcastable to `[batch, heads, q_len, kv_len]`, True where attention is allowed.
          holds: with a beam-shared cache (`head_major`, q_len 1, beam > 1), bool `[batch, beam, 1,
            beam, kv_len]`: which cache row of a sentence holds each position of each of its
            hypotheses (`beam_cache_scores`); None reads row n's past in cache row n.

        Returns:
          (output `[batch, q_len, d_model]`, float32 weights `[batch, heads, q_len, kv_len]` before
          attention dropout; None from a fused kernel, see `fused_kernel`).
        """
        query = self.query(x) * (self.d_model // self.num_heads) ** -0.5
        kernel = None if head_major else self.fused_kernel(train)
        if kernel is not None:
            shape = (x.shape[0], self.num_heads, x.shape[1], keys.shape[1])
            mixed = jax.nn.dot_product_attention(
                query,
                keys,
                values,
                mask=jnp.broadcast_to(mask, shape),
                scale=1.0,
                implementation=kernel,
            )
            return self.out(mixed), None
        if not head_major:
            scores = jnp.einsum("bqhd,bkhd->bhqk", query, keys)
        elif holds is None:
            scores = jnp.einsum("bqhd,bhdk->bhqk", query, keys)
        else:
            scores = beam_cache_scores(query, keys, holds)
        weights = common.masked_softmax(scores, mask)
        dropped = self.dropout(weights, deterministic=not train).astype(self.dtype)
        if not head_major:
            mixed = jnp.einsum("bhqk,bkhd->bqhd", dropped, values)
        elif holds is None:
            mixed = jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", dropped, values), 1, 2)
        else:
            mixed = beam_cache_mix(dropped, values, holds)
        return self.out(mixed), weights


class FeedForward(nn.Module):
    """Position-wise FFN: Dense(ffn_dim) -> activation -> dropout -> Dense(d_model)."""

    d_model: int
    ffn_dim: int
    activation: str
    dropout_rate: float  # on the activations (fairseq's activation dropout)
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dense = dict(kernel_init=nn.initializers.xavier_uniform(), **dense_fields(self))
        x = ACTIVATIONS[self.activation](nn.Dense(self.ffn_dim, name="inner", **dense)(x))
        x = common.Dropout(self.dropout_rate)(x, deterministic=not train)
        outer = nn.Dense(self.d_model, name="outer", **dense)
        if math.prod(x.shape[:-1]) == 1 and self.has_variable("params", ONE_ROW_OUTER_KERNEL):
            return self.one_row_outer(x)
        return outer(x)

    def one_row_outer(self, x: jax.Array) -> jax.Array:
        """The outer projection of one row `x [1, ..., ffn_dim]` through `with_one_row_kernels`'
        transposed copy, `[d_model, ffn_dim]`, contracted on its minor dimension."""
        kernel = self.get_variable("params", ONE_ROW_OUTER_KERNEL)
        bias = self.variables["params"]["outer"]["bias"]
        row, kernel, bias = int8.promote_dtype(x.reshape(1, -1), kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(row, kernel, (((1,), (1,)), ((), ()))) + bias
        return y.reshape(*x.shape[:-1], self.d_model)


class Sublayers(nn.Module):
    """Shared machinery of encoder and decoder layers: residual + LayerNorm (pre or post) around each
    sublayer, dropout on the sublayer output."""

    d_model: int
    num_heads: int
    ffn_dim: int
    activation: str
    dropout_rate: float
    attention_dropout_rate: float
    activation_dropout_rate: float
    pre_ln: bool
    layer_norm_epsilon: float
    dtype: Any
    param_dtype: Any

    def setup(self):
        self.residual_dropout = common.Dropout(self.dropout_rate)

    def attention(self) -> MultiHeadAttention:
        return MultiHeadAttention(
            self.d_model, self.num_heads, self.attention_dropout_rate, self.dtype, self.param_dtype
        )

    def feed_forward(self) -> FeedForward:
        return FeedForward(
            self.d_model,
            self.ffn_dim,
            self.activation,
            self.activation_dropout_rate,
            self.dtype,
            self.param_dtype,
        )

    def layer_norm(self) -> nn.LayerNorm:
        return nn.LayerNorm(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype
        )

    def residual(self, x: jax.Array, norm: nn.LayerNorm, sublayer, train: bool):
        """`x + drop(f(LN(x)))` (pre-LN) or `LN(x + drop(f(x)))` (post-LN); `sublayer` returns
        `(output, aux)` and `aux` is passed through."""
        y, aux = sublayer(norm(x) if self.pre_ln else x)
        x = x + self.residual_dropout(y, deterministic=not train)
        return (x if self.pre_ln else norm(x)), aux


class EncoderLayer(Sublayers):
    def setup(self):
        super().setup()
        self.self_attention = self.attention()
        self.ffn = self.feed_forward()
        self.norm1, self.norm2 = self.layer_norm(), self.layer_norm()

    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        """x `[batch, src_len, d_model]`, mask bool `[batch, 1, 1, src_len]` -> `[batch, src_len, d_model]`."""

        def attend(h):
            return self.self_attention(h, *self.self_attention.kv(h), mask, train)

        x, _ = self.residual(x, self.norm1, attend, train)
        x, _ = self.residual(x, self.norm2, lambda h: (self.ffn(h, train), None), train)
        return x


class DecoderLayer(Sublayers):
    def setup(self):
        super().setup()
        self.self_attention = self.attention()
        self.cross_attention = self.attention()
        self.ffn = self.feed_forward()
        self.norm1, self.norm2, self.norm3 = self.layer_norm(), self.layer_norm(), self.layer_norm()

    def __call__(
        self,
        x: jax.Array,
        self_mask: jax.Array,
        cross_kv: tuple[jax.Array, jax.Array],
        cross_mask: jax.Array,
        train: bool,
        cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array | None] | None = None,
    ) -> tuple[jax.Array, Any, jax.Array]:
        """One decoder layer, teacher-forced or incremental.

        Args:
          x: `[rows, q_len, d_model]` (teacher-forced: rows = batch; incremental: rows = N, q_len = 1).
          self_mask: bool, broadcastable to `[rows, heads, q_len, kv_len]`: over the positions of `x`
            (teacher-forced) or of the cache (incremental: up to and including the position being written).
          cross_kv: this layer's encoder keys/values, sentence batch first: `[batch, src_len, heads,
            head_dim]` (teacher-forced), or head-major like the cache (incremental; `cached_decoder_layers`).
          cross_mask: bool `[batch, 1, 1, src_len]`.
          cache: None (teacher-forced), or `(keys, values, pos, holds)`: this layer's self-attention
            cache, keys `[rows, heads, head_dim, max_len]` and values `[rows, heads, max_len,
            head_dim]`; the int32 position where `x`'s keys/values go (in each row's own cache row);
            and where each row's past is (`MultiHeadAttention`'s `holds`).

        Returns:
          (`[rows, q_len, d_model]`, the written cache (keys, values) or None, float32 cross-attention
          weights `[batch, heads, rows // batch * q_len, src_len]`).
        """

        def attend_self(h):
            keys, values = self.self_attention.kv(h)
            if cache is None:
                return self.self_attention(h, keys, values, self_mask, train)[0], None
            cache_k, cache_v, pos, holds = cache
            new_k = jnp.transpose(keys, (0, 2, 3, 1)).astype(cache_k.dtype)  # [rows, heads, hd, 1]
            new_v = jnp.swapaxes(values, 1, 2).astype(cache_v.dtype)  # [rows, heads, 1, hd]
            if cache_k.shape[0] == 1:
                return read_then_write(
                    self.self_attention, h, cache_k, cache_v, new_k, new_v, pos, self_mask
                )
            # Written before it is read: XLA updates the cache in place (read first, it copies it).
            cache_k = jax.lax.dynamic_update_slice(cache_k, new_k, (0, 0, 0, pos))
            cache_v = jax.lax.dynamic_update_slice(cache_v, new_v, (0, 0, pos, 0))
            out, _ = self.self_attention(
                h, cache_k, cache_v, self_mask, train, head_major=True, holds=holds
            )
            return out, (cache_k, cache_v)

        def attend_source(h):
            # Rows of the same sentence (its beams) become extra query positions of that sentence.
            rows, q_len, _ = h.shape
            batch = cross_mask.shape[0]
            beam = common.beams_per_sentence(batch, rows)
            grouped = h.reshape(batch, beam * q_len, self.d_model)
            out, weights = self.cross_attention(
                grouped, *cross_kv, cross_mask, train, head_major=cache is not None
            )
            return out.reshape(h.shape), weights

        x, kv = self.residual(x, self.norm1, attend_self, train)
        x, weights = self.residual(x, self.norm2, attend_source, train)
        x, _ = self.residual(x, self.norm3, lambda h: (self.ffn(h, train), None), train)
        return x, kv, weights


def teacher_forced_decoder_layers(
    module: nn.Module, layers, x: jax.Array, tgt_in: jax.Array, memory: dict, train
):
    """Teacher-forced `layers` (`DecoderLayer`s of `module`) over a whole target, causally masked.

    Sows each layer's encoder-decoder attention `[batch, heads, tgt_len, src_len]` in `module`'s
    intermediates as `cross_attention_<layer>`.

    Args:
      x: `[batch, tgt_len, d_model]`, the embedded `tgt_in` (int32 `[batch, tgt_len]`).
      memory: `cross_kv` per layer and `mask`, from the model's `encode`.

    Returns:
      `[batch, tgt_len, d_model]`.
    """
    causal = nn.make_causal_mask(tgt_in, dtype=jnp.bool_)  # [batch, 1, tgt_len, tgt_len]
    for i, layer in enumerate(layers):
        x, _, weights = layer(x, causal, memory["cross_kv"][i], memory["mask"], train)
        module.sow("intermediates", f"cross_attention_{i}", weights)
    return x


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
                        int8.dot_general, preferred_element_type=jnp.float32
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

    def _embed(self, embed: nn.Embed, tokens: jax.Array, positions: jax.Array, train: bool):
        """`[..., d_model]` = sqrt(d_model) * E[tokens] + PE[positions] (E[tokens] unscaled without
        `scale_embeddings`), then dropout."""
        x = embed(tokens)
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
        elif decoding and self.has_variable("params", TIED_OUTPUT_KERNEL):
            kernel = self.get_variable("params", TIED_OUTPUT_KERNEL)
            logits = jnp.dot(rows.astype(self.dtype), kernel, preferred_element_type=jnp.float32)
        elif decoding:
            # Without `with_output_kernel`'s copy: rows [N, d_model] times the table [vocab,
            # d_model] transposed. Written as rows . table^T, XLA either re-packs the table at every
            # step or (behind a barrier) copies it transposed once per decode: 119 MB for opus-mt's
            # 58k x 512, ~25% of a batch-1 decode there. With the table as the left operand,
            # contracted on its minor dimension as it lies in memory, neither copy is made; only the
            # small [vocab, rows] result is transposed.
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
