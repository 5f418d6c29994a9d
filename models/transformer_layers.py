"""The Transformer's layers: multi-head attention, the position-wise FFN, and the encoder and
decoder layers that put them together with residual connections and LayerNorm (`models/transformer.py`
assembles them into the model and its decoder).

Attention is written here with flax's projections (`nn.DenseGeneral`) rather than taken from
`nn.MultiHeadDotProductAttention`, whose decode cache breaks the decoding contract: it keeps a *scalar*
`cache_index` in a mutable collection (state leaves must have the N = batch x beam rows first, so beam
search can reorder them with one gather) and recomputes the cross-attention keys/values from the encoder
output at every step. Here the model's `encode` computes each decoder layer's cross-attention K/V
once, with the sentence batch first, the decoding step broadcasts them over the beams of each sentence
(the beams of a sentence are just more queries against the same keys), and the self-attention cache
is preallocated and written in place with `lax.dynamic_update_slice` (`models/kv_cache.py`). The
teacher-forced and the incremental paths call the same `MultiHeadAttention` modules, so they share
parameters and agree to float rounding.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from models import common, int8, packed
from models.kv_cache import beam_cache_mix, beam_cache_scores, read_then_write

ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,  # the tanh approximation (flax's default)
    "gelu_exact": functools.partial(nn.gelu, approximate=False),  # torch's nn.GELU()
    "silu": nn.silu,  # x * sigmoid(x), Marian's "swish"
}


def dense_fields(module: nn.Module) -> dict:
    """The fields of every dense layer of the Transformer: the module's dtypes, and `models.packed`'s
    product, which is flax's own for float kernels, the int8 one for `int8.quantize_params`' and
    the panels' for `packed.pack_params`'."""
    return dict(
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        dot_general=packed.dot_general,
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
        return nn.Dense(self.d_model, name="outer", **dense)(x)


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
