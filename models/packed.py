"""Dense kernels packed in column panels for decoding at small batches on the CPU.

A decoding step at batch 1 multiplies one row (greedy) or a beam's few rows by every weight of the
decoder once, so its speed is the rate at which the small matmuls read the weights. XLA:CPU's
kernels read a `[K, N]` matrix at 15-30 GB/s at four rows and 40-60 GB/s at one on the machine of
docs/benchmarks_decoding.md; stored in panels of 64 columns, `[P, K, 64]`, the same product is one
sequential read with each row's 64 sums held in registers (`packed_matmul.cc`, an XLA FFI call):
40-45 GB/s at four rows, 70-85 at one. CTranslate2 packs its weights for the same reason. Up to
`MAX_ROWS` = 64 rows the panels' product is the faster one (1.08-2.9x, docs/benchmarks_decoding.md), at 128
level with XLA's.

Packing is a transform of the params (as `models.int8`'s quantizing is): `pack_params` replaces every
float dense kernel by a `PackedKernel`, which keeps the kernel as it was (for many rows, and for
other platforms) beside its panels; the layers that pass this module's `dot_general` (and
`int8.promote_dtype`) to flax's dense layers read the panels at up to `MAX_ROWS` rows on the CPU
(`jax.lax.platform_dependent`: the same program runs XLA's product on a GPU or TPU).

The kernel is compiled on first use with the machine's C++ compiler (`-O3 -march=native`, cached
under `$SEQZOO_CACHE` or `~/.cache/seqzoo`); where that fails, `available()` says why and nothing is
packed.
"""

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models import int8

PANEL = 64  # columns per panel (packed_matmul.cc's kPanel)
MAX_ROWS = 64  # above this many rows a product reads the kernel as it lies (XLA's GEMM kernels)
TARGET = "seqzoo_packed_matmul"
SOURCE = Path(__file__).with_name("packed_matmul.cc")


@flax.struct.dataclass
class PackedKernel:
    """A dense kernel `[K..., F...]` (its first `contracting` axes contracted) and the same weights
    as float32 panels `[P, K, 64]` (K and F flattened, F zero-padded to 64 P columns).

    `kernel` is the first leaf, so flax's shape check of a param sees the kernel's shape.
    """

    kernel: jax.Array
    panels: jax.Array
    contracting: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def shape(self) -> tuple:
        return self.kernel.shape


def pack(kernel: jax.Array, contracting: int = 1) -> PackedKernel:
    """`kernel [K..., F...]` with its panels (float32 `[ceil(F / 64), K, 64]`)."""
    return PackedKernel(kernel, _panels(jnp.asarray(kernel), contracting), contracting)


@functools.partial(jax.jit, static_argnums=1)
def _panels(kernel: jax.Array, contracting: int) -> jax.Array:
    k = math.prod(kernel.shape[:contracting])
    f = math.prod(kernel.shape[contracting:])
    p = -(-f // PANEL)
    matrix = jnp.pad(kernel.reshape(k, f).astype(jnp.float32), ((0, 0), (0, p * PANEL - f)))
    return matrix.reshape(k, p, PANEL).transpose(1, 0, 2)


def pack_params(params: dict) -> dict:
    """`params` with every float dense kernel (a `kernel` beside a `bias`) as a `PackedKernel`;
    other leaves unchanged. Nothing is packed when `available()` is not true."""
    if available() is not True:
        return params

    def walk(node):
        if not isinstance(node, dict):
            return node
        out = {k: walk(v) for k, v in node.items()}
        kernel, bias = node.get("kernel"), node.get("bias")
        if (
            bias is not None
            and isinstance(kernel, jax.Array | np.ndarray)
            and jnp.issubdtype(kernel.dtype, jnp.floating)
        ):
            out["kernel"] = pack(kernel, contracting=kernel.ndim - bias.ndim)
        return out

    return walk(dict(params))


def check(x_shape: tuple, weights: PackedKernel) -> None:
    """A one-line ValueError unless `weights.panels` are float32 `[ceil(F / 64), K, 64]` of its
    kernel `[K..., F...]` and `x_shape` ends in the kernel's contracting axes `K...`."""
    k, shape = weights.contracting, tuple(weights.kernel.shape)
    rows, cols = math.prod(shape[:k]), math.prod(shape[k:])
    want = (-(-cols // PANEL), rows, PANEL)
    if tuple(weights.panels.shape) != want:
        raise ValueError(
            f"packed kernel's panels {tuple(weights.panels.shape)} do not match its kernel {shape} "
            f"(want {want}): pack the kernel again (packed.pack) after changing it"
        )
    if weights.panels.dtype != jnp.float32:
        raise ValueError(
            f"packed kernel's panels are {weights.panels.dtype}, not float32: pack the kernel "
            "again (packed.pack) after changing it"
        )
    if len(x_shape) < k or tuple(x_shape[len(x_shape) - k :]) != shape[:k]:
        raise ValueError(
            f"packed matmul: the input's trailing axes {tuple(x_shape[len(x_shape) - k :])} do "
            f"not match the kernel's contracting axes {shape[:k]} (input {tuple(x_shape)}, kernel "
            f"{shape}): give an input [..., {', '.join(map(str, shape[:k]))}]"
        )


def matmul(x: jax.Array, weights: PackedKernel, preferred_element_type=None) -> jax.Array:
    """`x [..., K...] . W` for W `[K..., F...]` packed: through the panels (float32) on the CPU at
    up to `MAX_ROWS` rows, through the kernel as it lies otherwise. Shapes are checked first
    (`check`): a kernel changed after packing, or an input of other trailing axes, is a ValueError."""
    check(x.shape, weights)
    k = weights.contracting
    lead, out = x.shape[: x.ndim - k], weights.kernel.shape[k:]
    rows = math.prod(lead)

    def plain(x):
        kernel = weights.kernel
        axes = (tuple(range(x.ndim - k, x.ndim)), tuple(range(k)))
        return jax.lax.dot_general(
            x, kernel, (axes, ((), ())), preferred_element_type=preferred_element_type
        )

    if rows > MAX_ROWS or rows == 0:
        return plain(x)

    def panels(x):
        if (why := available()) is not True:
            raise RuntimeError(why)
        y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, math.prod(out)), jnp.float32))(
            x.reshape(rows, -1).astype(jnp.float32), weights.panels
        )
        return y.reshape(*lead, *out).astype(preferred_element_type or x.dtype)

    return jax.lax.platform_dependent(x, cpu=panels, default=plain)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`int8.dot_general` (flax's product for float kernels, int8's for `Int8Array`s), and `matmul`
    for a `PackedKernel` (flax's dense layers contract the input's trailing axes with the kernel's
    leading ones, without batch axes)."""
    if isinstance(rhs, PackedKernel):
        int8.check_dense(jnp.ndim(lhs), dimension_numbers, rhs.contracting, "packed")
        return matmul(lhs, rhs, preferred_element_type)
    return int8.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


def _cache_dir() -> Path:
    return Path(os.environ.get("SEQZOO_CACHE") or Path.home() / ".cache" / "seqzoo")


def _build() -> Path:
    """The compiled kernel, built once per source, compiler flags and CPU (an atomic rename, so
    concurrent processes may both build but never load half a file)."""
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line for line in cpu.splitlines() if line.startswith("flags")), platform.machine())
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), *flags, cpu, jax.ffi.include_dir()]).encode()
    ).hexdigest()[:16]
    library = _cache_dir() / f"packed_matmul-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            built = Path(tmp) / library.name
            cxx = os.environ.get("CXX", "c++")
            command = [cxx, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                lines = result.stderr.splitlines()
                first = next((line for line in lines if "error" in line), "no message")
                raise RuntimeError(f"{cxx} failed on {SOURCE.name}: {first.strip()}")
            os.replace(built, library)
    return library


@functools.cache
def available() -> bool | str:
    """True once the kernel is built and registered with XLA for the CPU; else why not (a string):
    JAX's default backend is not the CPU (params there are not packed), no C++ compiler, a failed
    build."""
    if jax.default_backend() != "cpu":
        return f"packed kernels off: the default backend is {jax.default_backend()}, not the CPU"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, RuntimeError) as e:
        message = f"packed kernels off (decoding at batch 1 runs XLA's slower matmuls): {e}"
        warnings.warn(message, stacklevel=2)
        return f"packed kernels off: {e}"
    handler = jax.ffi.pycapsule(library.SeqzooPackedMatmul)
    jax.ffi.register_ffi_target(TARGET, handler, platform="cpu")
    return True
