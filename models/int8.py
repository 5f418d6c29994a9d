"""int8 weights for decoding: symmetric per-output-channel int8 kernels, activations quantized per row
at each matmul, integer dot products accumulated in int32 (CTranslate2's `compute_type="int8"` on
CPU works the same way).

Quantizing is a transform of the params, not of the model: `quantize_params` replaces each dense
kernel by an `Int8Array` (int8 values and float32 scales), and the layers that pass `dot_general`
and `promote_dtype` of this module to flax's `nn.Dense`/`nn.DenseGeneral` (the Transformer's) run
the int8 product when they are given one and flax's own float product otherwise. A tied output
projection gets an int8 copy of the embedding table (`TIED_OUTPUT`); lookups keep the float table.

On XLA:CPU (2 cores, AVX-512 VNNI) an int8 x int8 -> int32 `dot` of at least two rows runs on fast
kernels: a [58101, 512] table against 2 / 4 / 32 / 128 rows takes 1.3 / 1.4 / 2.0 / 19 ms where the
float32 product takes 8.9 / 8.4 / 17 / 43 ms; a single row takes a naive loop (52 ms against 5.6), so
single rows are padded to two. Dequantizing the weights to float32 inside the step and multiplying
in float32 is 5-9x slower than float32 weights (50-99 ms).
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax.linen import dtypes

TIED_OUTPUT = "tied_output_int8"  # params key of the int8 copy of a tied output projection's table


@flax.struct.dataclass
class Int8Array:
    """A quantized kernel: `values` int8 of the float kernel's shape, `scale` float32 over its
    output (non-contracted) dimensions; the kernel is `values * scale`.

    `values` is the first leaf, so flax's shape check of a param (its first leaf against the
    initializer's) sees the kernel's shape.
    """

    values: jax.Array
    scale: jax.Array
    contracting: int = flax.struct.field(pytree_node=False, default=1)  # leading axes contracted

    @property
    def shape(self) -> tuple:
        return self.values.shape

    def dequantize(self) -> jax.Array:
        scale = self.scale.reshape((1,) * self.contracting + self.scale.shape)
        return self.values.astype(jnp.float32) * scale


def _scale(peak: jax.Array) -> jax.Array:
    """The int8 step of values whose largest magnitude is `peak`: `peak / 127`, 1 where `peak` is 0
    (all zeros), NaN where it is NaN (`peak > 0` is false for NaN, which a test on it would turn
    into a finite scale and finite outputs)."""
    return jnp.where(peak == 0, 1.0, peak / 127.0)


def quantize(kernel: jax.Array, contracting: int = 1) -> Int8Array:
    """Symmetric int8 of `kernel`, one scale per output channel (max |w| over the `contracting`
    leading axes / 127; all-zero channels get scale 1). A channel holding NaN gets scale NaN (inf:
    inf), so its outputs are NaN (not finite), never a finite number."""
    kernel = jnp.asarray(kernel, jnp.float32)
    peak = jnp.max(jnp.abs(kernel), axis=tuple(range(contracting)))
    scale = _scale(peak)
    values = jnp.round(kernel / scale).astype(jnp.int8)
    return Int8Array(values, scale, contracting)


def quantize_params(params: dict, tied_output: bool = False) -> dict:
    """`params` with every dense kernel (a `kernel` beside a `bias`, whose shape is the kernel's
    output dimensions) as an `Int8Array`; with `tied_output`, `TIED_OUTPUT` added: the int8 table
    `[vocab, d_model]` of `tgt_embed`, one scale per vocabulary row. Everything else is unchanged."""

    def walk(node):
        if not isinstance(node, dict):
            return node
        out = {k: walk(v) for k, v in node.items()}
        kernel, bias = node.get("kernel"), node.get("bias")
        if kernel is not None and bias is not None and not isinstance(kernel, Int8Array):
            out["kernel"] = quantize(kernel, contracting=kernel.ndim - bias.ndim)
        return out

    quantized = walk(dict(params))
    if tied_output:
        q = quantize(jnp.asarray(params["tgt_embed"]["embedding"]).T)  # one scale per token
        quantized[TIED_OUTPUT] = {"values": q.values.T, "scale": q.scale}
    return quantized


def promote_dtype(*args, dtype: Any = None, inexact: bool = True) -> list:
    """flax's `promote_dtype` for the float arguments; a prepared kernel (a dataclass: an
    `Int8Array`, a `packed.PackedKernel`) is passed through as it is."""

    def kept(a) -> bool:
        return a is None or dataclasses.is_dataclass(a)

    promoted = iter(
        dtypes.promote_dtype(*[a for a in args if not kept(a)], dtype=dtype, inexact=inexact)
    )
    return [a if kept(a) else next(promoted) for a in args]


def quantize_rows(x: jax.Array, axes: tuple) -> tuple[jax.Array, jax.Array]:
    """int8 of `x` with one scale per row (max |x| over the contracted `axes` / 127, as `quantize`'s:
    a row holding NaN gets scale NaN) and the scales, of `x`'s shape with `axes` kept as size 1."""
    x = x.astype(jnp.float32)
    peak = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    scale = _scale(peak)
    return jnp.round(x / scale).astype(jnp.int8), scale


def two_rows_at_least(rows: jax.Array) -> jax.Array:
    """`rows [n, ...]`, a zero row added when n is 1: XLA:CPU's int8 dot of one row is a naive
    loop, two rows run on VNNI kernels (callers keep the first n rows of the product)."""
    return jnp.concatenate([rows, jnp.zeros_like(rows)]) if rows.shape[0] == 1 else rows


def int8_matmul(x: jax.Array, weights: Int8Array) -> jax.Array:
    """float32 `x [..., K...] . W`, W `[K..., F...]` int8 contracted on its leading axes against
    `x`'s trailing ones: `x` quantized per row, int32 accumulation, both scales applied after."""
    k = weights.contracting
    lead, contracted = x.shape[:-k], x.shape[-k:]
    rows = x.reshape(-1, *contracted)
    axes = tuple(range(1, k + 1))
    q, row_scale = quantize_rows(two_rows_at_least(rows), axes)
    acc = jax.lax.dot_general(
        q, weights.values, ((axes, tuple(range(k))), ((), ())), preferred_element_type=jnp.int32
    )
    out = acc.astype(jnp.float32) * row_scale.reshape(-1, *(1,) * weights.scale.ndim)
    out = (out * weights.scale)[: rows.shape[0]]
    return out.reshape(*lead, *weights.scale.shape)


def int8_logits(x: jax.Array, table: dict) -> jax.Array:
    """float32 logits `[..., vocab]` of `x [..., d_model]` against `TIED_OUTPUT`'s table (`values`
    int8 `[vocab, d_model]`, `scale` float32 `[vocab]`), the table as the left operand as it lies in
    memory (see the Transformer's `_logits`)."""
    rows = x.reshape(-1, x.shape[-1])
    q, row_scale = quantize_rows(two_rows_at_least(rows), (1,))
    acc = jax.lax.dot_general(
        table["values"], q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32
    )
    logits = (acc.astype(jnp.float32) * table["scale"][:, None] * row_scale[:, 0]).T
    return logits[: rows.shape[0]].reshape(*x.shape[:-1], table["values"].shape[0])


def check_dense(lhs_ndim: int, dimension_numbers, contracting: int, kind: str) -> None:
    """A one-line ValueError unless `dimension_numbers` are a dense layer's: the kernel's leading
    `contracting` axes against exactly the `lhs_ndim`-axis input's trailing ones, in order (as
    flax's Dense/DenseGeneral pass them; negative axes count from the end), no batch axes."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs_axes = tuple(a % lhs_ndim if -lhs_ndim <= a < lhs_ndim else a for a in lhs_contract)
    if (
        lhs_axes != tuple(range(lhs_ndim - contracting, lhs_ndim))
        or tuple(rhs_contract) != tuple(range(contracting))
        or tuple(lhs_batch)
        or tuple(rhs_batch)
    ):
        raise ValueError(
            f"{kind} kernels support dense layers only: the input's last {contracting} axes "
            f"against the kernel's first {contracting}, no batch axes (got input axes "
            f"{tuple(lhs_contract)} of {lhs_ndim}, kernel axes {tuple(rhs_contract)}, batch "
            f"{(tuple(lhs_batch), tuple(rhs_batch))})"
        )


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for float kernels; `int8_matmul` for an `Int8Array` (flax's dense layers
    contract the input's trailing axes with the kernel's leading ones, without batch axes)."""
    if isinstance(rhs, Int8Array):
        check_dense(jnp.ndim(lhs), dimension_numbers, rhs.contracting, "int8")
        return int8_matmul(lhs, rhs).astype(preferred_element_type or lhs.dtype)
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
