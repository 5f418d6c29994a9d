"""models/int8.py: int8 kernels and tables, the int8 product, and a Transformer decoding with them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SRC, TGT_IN, TGT_OUT, TINY_TRANSFORMER, overfit

import decoding
from experiment import decode_programs
from models import int8
from models.transformer import Transformer

TINY = {**TINY_TRANSFORMER, "num_encoder_layers": 1}


def test_quantize_is_within_half_a_step_per_output_channel():
    kernel = jax.random.normal(jax.random.key(0), (24, 4, 5)).at[:, 1, 2].set(0.0)
    q = int8.quantize(kernel, contracting=1)
    assert q.values.dtype == jnp.int8 and q.shape == kernel.shape and q.scale.shape == (4, 5)
    np.testing.assert_allclose(q.scale * 127, jnp.max(jnp.abs(kernel), axis=0).at[1, 2].set(127))
    error = jnp.abs(q.dequantize() - kernel)
    assert bool(jnp.all(error <= q.scale / 2 + 1e-7))
    assert int(jnp.max(jnp.abs(q.values))) == 127  # each channel's largest weight is +-127


@pytest.mark.parametrize("rows", [1, 3])
def test_int8_matmul_is_the_float_product_within_quantization_error(rows):
    x = jax.random.normal(jax.random.key(1), (rows, 2, 16))  # contracted on its last two axes
    kernel = jax.random.normal(jax.random.key(2), (2, 16, 7))
    q = int8.quantize(kernel, contracting=2)
    got = jax.jit(int8.int8_matmul)(x, q)
    want = jnp.einsum("rab,abf->rf", x, kernel)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(got - want))) < 0.02 * float(jnp.max(jnp.abs(want)))
    if rows > 1:  # a row alone (padded to two) is computed as within a batch
        np.testing.assert_allclose(jax.jit(int8.int8_matmul)(x[:1], q), got[:1], rtol=1e-6)


def test_a_non_finite_weight_or_input_makes_its_column_or_row_non_finite():
    """NaN (and inf) in a kernel's output channel or an input row is not quantized into finite
    numbers: that channel's or row's outputs are non-finite (NaN for NaN), the others exact."""
    kernel = jax.random.normal(jax.random.key(0), (8, 5))
    kernel = kernel.at[3, 1].set(jnp.nan).at[0, 4].set(jnp.inf)
    x = jax.random.normal(jax.random.key(1), (3, 8)).at[2, 5].set(jnp.nan)
    q = int8.quantize(kernel)
    assert bool(jnp.all(jnp.isnan(q.dequantize()[:, 1])))
    got = int8.int8_matmul(x, q)
    assert bool(jnp.all(jnp.isnan(got[2]))) and bool(jnp.all(jnp.isnan(got[:, 1])))
    assert not bool(jnp.any(jnp.isfinite(got[:, 4])))
    finite = got[:2][:, jnp.array([0, 2, 3])]
    want = (x[:2] @ jnp.nan_to_num(kernel))[:, jnp.array([0, 2, 3])]
    assert float(jnp.max(jnp.abs(finite - want))) < 0.02 * float(jnp.max(jnp.abs(want)))
    table = {"values": q.values.T, "scale": q.scale}  # TIED_OUTPUT's layout: one scale per row
    logits = int8.int8_logits(x, table)
    assert bool(jnp.all(jnp.isnan(logits[2]))) and bool(jnp.all(jnp.isnan(logits[:, 1])))


def test_batched_products_of_an_int8_kernel_are_refused():
    q = int8.quantize(jnp.ones((3, 4, 5)))
    with pytest.raises(ValueError, match="dense layers only"):
        int8.dot_general(jnp.ones((3, 2, 4)), q, (((2,), (1,)), ((0,), (0,))))


@pytest.mark.parametrize(
    "dimension_numbers",
    [
        (((0,), (0,)), ((), ())),  # x's first axis: x.T @ w, not x @ w
        (((1,), (1,)), ((), ())),  # the kernel's output axis
        (((1,), (0,)), ((0,), ())),  # a batch axis on one side only
    ],
)
def test_a_product_over_other_axes_than_a_dense_layers_is_refused(dimension_numbers):
    x, q = jnp.ones((4, 4)), int8.quantize(jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="int8 kernels support dense layers only"):
        int8.dot_general(x, q, dimension_numbers)


def test_a_dense_layers_product_is_accepted_with_axes_counted_from_either_end():
    x, w = jax.random.normal(jax.random.key(0), (3, 2, 4)), jnp.eye(4, 5)
    q = int8.quantize(w)
    want = int8.int8_matmul(x, q)
    for lhs_axis in (2, -1):
        got = int8.dot_general(x, q, (((lhs_axis,), (0,)), ((), ())))
        np.testing.assert_array_equal(got, want)


@functools.cache
def trained(tie_output: bool):
    """(model, float params, int8 params) of a tiny Transformer that knows the four toy pairs."""
    model = Transformer(13, 13, tie_output=tie_output, share_embeddings=tie_output, **TINY)
    params = jax.jit(model.init)(jax.random.key(0), SRC, TGT_IN)["params"]
    params, _ = overfit(model, params, steps=150)
    return model, params, int8.quantize_params(params, tied_output=tie_output)


@pytest.mark.parametrize("tie_output", [True, False])
def test_quantize_params_turns_every_dense_kernel_and_nothing_else(tie_output):
    _, params, quantized = trained(tie_output)
    flat = jax.tree_util.tree_flatten_with_path(
        quantized, is_leaf=lambda x: isinstance(x, int8.Int8Array)
    )[0]
    turned = {jax.tree_util.keystr(p) for p, v in flat if isinstance(v, int8.Int8Array)}
    kernels = {
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        if jax.tree_util.keystr(p).endswith("['kernel']")
    }
    assert turned == kernels
    assert (int8.TIED_OUTPUT in quantized) == tie_output
    if tie_output:
        table = quantized[int8.TIED_OUTPUT]
        assert table["values"].dtype == jnp.int8
        assert table["values"].shape == params["tgt_embed"]["embedding"].shape
    assert np.array_equal(quantized["tgt_embed"]["embedding"], params["tgt_embed"]["embedding"])


@pytest.mark.parametrize("tie_output", [True, False])
def test_an_int8_transformer_decodes_what_the_float_one_does(tie_output):
    model, params, quantized = trained(tie_output)
    forward = jax.jit(model.apply)
    want = forward({"params": params}, SRC, TGT_IN)
    got = forward({"params": quantized}, SRC, TGT_IN)
    assert float(jnp.max(jnp.abs(got - want))) < 0.05 * float(jnp.max(jnp.abs(want)))

    @jax.jit
    def greedy(params):
        step_fn, state = decode_programs.step_function(model, params, SRC, TGT_IN.shape[1])
        return decoding.greedy(
            step_fn,
            state,
            bos_id=1,
            eos_id=2,
            pad_id=0,
            batch_size=SRC.shape[0],
            max_len=TGT_IN.shape[1],
        )

    floats, ints = greedy(params), greedy(quantized)
    np.testing.assert_array_equal(floats.sequences, TGT_OUT)  # it knows the pairs...
    np.testing.assert_array_equal(ints.sequences, floats.sequences)  # ...and so does its int8
    np.testing.assert_allclose(ints.log_probs, floats.log_probs, atol=0.05)
