"""models/packed.py: dense kernels in column panels and their FFI product on the CPU."""

import math
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import linen as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st

from models import int8, packed


def kernel(*shape, seed=0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def isolated(code: str) -> subprocess.CompletedProcess:
    """`code` run by a fresh Python (the same cache and compiler): a crash there fails the test
    instead of killing the test worker."""
    code = "import jax, jax.numpy as jnp\nfrom models import packed\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_the_kernel_builds_and_registers_on_this_machine():
    assert packed.available() is True


def test_panels_multiply_as_the_kernel_does_at_every_row_count():
    """Every row count from 1 to 130 (a beam of 4 at batch 32 is 128 rows) through the panels, odd
    K, a full panel and a narrower last one; float32 to rounding."""
    k, n = 37, 100
    w, x = kernel(k, n), kernel(130, k, seed=1)
    weights, want = packed.pack(w), np.asarray(x) @ np.asarray(w)
    for rows in range(1, 131):
        got = MATMUL(x[:rows], weights)
        assert got.shape == (rows, n) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want[:rows], rtol=2e-5, atol=2e-5 * math.sqrt(k))


def test_the_panels_are_what_every_row_count_reads():
    """No other copy of the weights is kept or read: zeroed panels give zeros at 1 row and at
    many (XLA's product on the kernel as it lies once took over above 64 rows)."""
    weights = packed.pack(kernel(64, 96))
    assert jax.tree.leaves(weights) == [weights.panels]
    zeroed = weights.replace(panels=jnp.zeros_like(weights.panels))
    for rows in (1, 64, 65, 130):
        np.testing.assert_array_equal(MATMUL(kernel(rows, 64), zeroed), 0.0)


def test_the_ffi_kernel_checks_every_shape_and_writes_nothing_it_does_not_own():
    """x [1, 4] times panels of another N, another K, or not [K, N] into y [1, 10]: refused before
    the kernel reads or writes (panels of 3 x 64 columns into y [1, 10] once wrote past y)."""
    result = isolated("""
        assert packed.available() is True
        call = jax.ffi.ffi_call(packed.TARGET, jax.ShapeDtypeStruct((1, 10), jnp.float32))
        for x, panels in [((1, 4), (4, 192)), ((1, 4), (5, 10)), ((1, 4), (4, 10, 1))]:
            try:
                call(jnp.ones(x), jnp.ones(panels)).block_until_ready()
            except jax.errors.JaxRuntimeError as e:
                print("refused:", str(e).splitlines()[0])
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    refusals = [line for line in result.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusals) == 3, result.stdout
    assert "x [1, 4], panels [4, 192], y [1, 10]" in refusals[0]
    assert all("INVALID_ARGUMENT: packed_matmul" in line for line in refusals)


@pytest.mark.parametrize(
    "x_shape, w_shape, contracting, problem",
    [
        ((1, 5), (4, 10), 1, "input's trailing axes (5,) do not match"),
        ((4, 1), (2, 2, 10), 2, "input's trailing axes (4, 1) do not match"),  # K = 4 both
        ((2,), (2, 2, 10), 2, "input's trailing axes (2,) do not match"),
    ],
)
def test_an_input_whose_trailing_axes_are_not_the_kernels_is_refused(
    x_shape, w_shape, contracting, problem
):
    weights = packed.pack(kernel(*w_shape), contracting)
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        packed.matmul(jnp.ones(x_shape), weights)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda w: w.replace(panels=w.panels.astype(jnp.bfloat16)), "panels are bfloat16"),
        (lambda w: w.replace(contracting=2), r"\(3, 70\) with 2 contracted axes: want 1 to 1"),
        (lambda w: w.replace(contracting=0), r"\(3, 70\) with 0 contracted axes"),
    ],
)
def test_panels_of_another_dtype_or_contraction_are_refused(change, problem):
    weights = change(packed.pack(kernel(3, 70)))
    for rows in (1, 130):
        with pytest.raises(ValueError, match=problem):
            jax.jit(packed.matmul)(kernel(rows, 3), weights)


# Sizes around a panel's edge (1, 63, 64, 65) and any other up to two panels and a bit.
SIZES = st.sampled_from([1, 2, 63, 64, 65]) | st.integers(1, 130)
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)  # ~0.3 s an example
MATMUL = jax.jit(packed.matmul)  # one function: each new shape compiles once


@st.composite
def products(draw) -> tuple[tuple, tuple, int]:
    """(x's shape, the kernel's shape, contracted axes): 1-70 rows in one or two leading axes,
    K and F in one or two axes each."""
    rows = draw(st.integers(1, 70))
    lead = draw(st.sampled_from([(rows,), (1, rows)]))
    contracted = draw(st.sampled_from([(draw(SIZES),), (draw(st.integers(1, 3)), draw(SIZES))]))
    out = draw(st.sampled_from([(draw(SIZES),), (draw(st.integers(1, 3)), draw(SIZES))]))
    return lead + contracted, contracted + out, len(contracted)


@PROPERTY
@given(products(), st.integers(0, 2**16))
@example(((1, 1), (1, 1), 1), 0)
@example(((70, 63), (63, 65), 1), 0)
@example(((64, 64), (64, 64), 1), 0)
@example(((1, 65, 3, 65), (3, 65, 1), 2), 0)
@example(((1, 2, 64), (2, 64, 2, 63), 2), 0)
def test_panels_multiply_as_jnp_dot_does_for_any_shape(shapes, seed):
    x_shape, w_shape, contracting = shapes
    x, w = kernel(*x_shape, seed=seed), kernel(*w_shape, seed=seed + 1)
    got = MATMUL(x, packed.pack(w, contracting))
    k = math.prod(w_shape[:contracting])
    want = jnp.dot(x.reshape(-1, k), w.reshape(k, -1)).reshape(got.shape)
    assert got.shape == x_shape[: x.ndim - contracting] + w_shape[contracting:]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * math.sqrt(k))


@PROPERTY
@given(products(), products())
def test_an_input_of_other_contracted_axes_is_refused_whatever_the_shapes(shapes, other):
    """An input with the trailing axes of another kernel: a ValueError unless they are this
    kernel's contracting axes (then the product is the dot) - never a call that reads wrongly."""
    (_, w_shape, contracting), (x_shape, _, _) = shapes, other
    x, w = kernel(*x_shape), kernel(*w_shape, seed=1)
    weights = packed.pack(w, contracting)
    if x_shape[len(x_shape) - contracting :] != w_shape[:contracting]:
        with pytest.raises(ValueError, match="do not match the kernel's contracting axes"):
            MATMUL(x, weights)
    else:
        k = math.prod(w_shape[:contracting])
        want = jnp.dot(x.reshape(-1, k), w.reshape(k, -1))
        np.testing.assert_allclose(
            MATMUL(x, weights).reshape(want.shape), want, rtol=2e-5, atol=1e-4
        )


def test_panels_hold_64_columns_of_every_kernel_row_in_the_kernels_own_size():
    """W [3, 70]: its first 64 columns row after row, then the last 6 (a narrower panel), in an
    array of W's shape: one copy, no padding; `unpack` gives W back."""
    w = kernel(3, 70)
    weights = packed.pack(w)
    flat = np.asarray(weights.panels).reshape(-1)
    assert weights.shape == (3, 70) and weights.panels.dtype == jnp.float32
    np.testing.assert_array_equal(flat[: 3 * 64].reshape(3, 64), w[:, :64])
    np.testing.assert_array_equal(flat[3 * 64 :].reshape(3, 6), w[:, 64:])
    np.testing.assert_array_equal(packed.unpack(weights), w)
    w3 = kernel(2, 4, 33, seed=1)  # two contracted axes: K 8, N 33
    np.testing.assert_array_equal(packed.unpack(packed.pack(w3, contracting=2)), w3)


@pytest.mark.parametrize("k, n", [(5, 64), (3, 70), (16, 200)])
def test_columns_are_the_kernels_columns(k, n):
    """A table packed as [K, N] read by columns (the embedding lookups of a tied table): in the full
    panels and in a narrower last one, for ids of any shape."""
    w = kernel(k, n)
    ids = np.random.default_rng(2).integers(0, n, size=(3, 7))
    ids[0, :3] = [0, n - 1, 63]
    got = jax.jit(packed.columns)(packed.pack(w), ids)
    np.testing.assert_array_equal(got, np.asarray(w).T[ids])
    with pytest.raises(ValueError, match="want a kernel \\[K, N\\] with one contracted axis"):
        packed.columns(packed.pack(kernel(2, 3, 4), contracting=2), ids)


def test_dense_layers_read_packed_kernels_with_several_contracted_and_output_axes():
    """flax's DenseGeneral with this module's product, as the Transformer's attention uses it:
    [d_model] -> [heads, head_dim] and [heads, head_dim] -> [d_model]."""
    fields = dict(dot_general=packed.dot_general, promote_dtype=int8.promote_dtype)
    split = nn.DenseGeneral((4, 8), **fields)
    merge = nn.DenseGeneral(32, axis=(-2, -1), **fields)
    x = kernel(1, 3, 32)
    for layer, inputs in ((split, x), (merge, x.reshape(1, 3, 4, 8))):
        params = layer.init(jax.random.key(0), inputs)["params"]
        packed_params = packed.pack_params(params)
        assert isinstance(packed_params["kernel"], packed.PackedKernel)
        got = layer.apply({"params": packed_params}, inputs)
        np.testing.assert_allclose(
            got, layer.apply({"params": params}, inputs), rtol=1e-5, atol=1e-6
        )


def test_pack_params_packs_float_dense_kernels():
    params = {
        "a": {"kernel": kernel(4, 4), "bias": jnp.zeros(4)},
        "b": {"kernel": kernel(4, 4)},  # no bias: not a dense layer's
        "table": {"embedding": kernel(4, 4)},
        "c": {"kernel": jnp.ones((4, 4), jnp.int8), "bias": jnp.zeros(4)},
    }
    got = packed.pack_params(params)
    assert isinstance(got["a"]["kernel"], packed.PackedKernel)
    assert got["b"]["kernel"] is params["b"]["kernel"]
    assert got["table"] is not None and got["table"]["embedding"] is params["table"]["embedding"]
    assert got["c"]["kernel"] is params["c"]["kernel"]
    again = packed.pack_params(got)
    assert again["a"]["kernel"] is got["a"]["kernel"]


def test_a_batched_product_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="packed kernels support dense layers only"):
        packed.dot_general(kernel(2, 4, 4), packed.pack(kernel(4, 4)), (((2,), (0,)), ((0,), ())))


def test_contracting_the_inputs_first_axis_is_refused():
    """x [4, 4] contracted on its first axis with w [4, 5] is x.T @ w, not what the panels give."""
    with pytest.raises(ValueError, match="packed kernels support dense layers only"):
        packed.dot_general(kernel(4, 4), packed.pack(kernel(4, 5)), (((0,), (0,)), ((), ())))
