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

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, `-O3 -march=native`),
cached under `$SEQZOO_CACHE` or `~/.cache/seqzoo` by everything that shapes the build (`_key`), and
loaded from there only when nobody but the user could have written the folder or the library
(else it is built into a private temporary folder); where that fails, `available()` says why and
nothing is packed.
"""

import _ctypes
import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shlex
import shutil
import signal
import stat
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


BUILD_TIMEOUT_S = 300.0  # a build takes seconds; a compiler that hangs is stopped after this
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
ENTRY = "SeqzooPackedMatmul"  # the FFI handler's symbol in the library
CPUINFO = Path("/proc/cpuinfo")


def _cache_dir() -> Path:
    return Path(os.environ.get("SEQZOO_CACHE") or Path.home() / ".cache" / "seqzoo")


def _compiler() -> list[str]:
    """`$CXX` (default `c++`) split as a shell splits it: `CXX="ccache g++"` is two words."""
    return shlex.split(os.environ.get("CXX") or "c++") or ["c++"]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    """`command` run to its end in a session of its own; a one-line RuntimeError when it cannot
    start, or after `BUILD_TIMEOUT_S` (it is killed with everything it started)."""
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as e:
        raise RuntimeError(f"cannot run {command[0]}: {e.strerror} (set CXX)") from None
    with process:
        try:
            stdout, stderr = process.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise RuntimeError(
                f"{shlex.join(command[:1])} took over {BUILD_TIMEOUT_S} s and was stopped "
                f"(building {SOURCE.name})"
            ) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _cpu_features(cpuinfo: str) -> str:
    """The CPU's instruction-set line of `/proc/cpuinfo`'s text: `flags` on x86, `Features` on
    aarch64 (the first; every core's is the same), or "" where there is none."""
    lines = cpuinfo.splitlines()
    return next((line for line in lines if line.split(":")[0].strip() in ("flags", "Features")), "")


def _key(compiler: list[str]) -> str:
    """16 hex digits naming a build: the source, flags, machine and CPU features (code built with
    `-march=native` for one CPU can crash on another), the compiler (its words, the path of its
    first and its `--version`) and the content of jaxlib's FFI headers."""
    version = _run([*compiler, "--version"])
    cpu = CPUINFO.read_text(errors="replace") if CPUINFO.exists() else ""
    digest = hashlib.sha256()
    for part in [
        SOURCE.read_text(),
        *FLAGS,
        platform.machine(),
        _cpu_features(cpu),
        *compiler,
        shutil.which(compiler[0]) or "",
        f"{version.returncode} {version.stdout} {version.stderr}",
    ]:
        digest.update(part.encode() + b"\0")
    headers = Path(jax.ffi.include_dir())
    for header in sorted(path for path in headers.rglob("*") if path.is_file()):
        digest.update(str(header.relative_to(headers)).encode() + b"\0" + header.read_bytes())
    return digest.hexdigest()[:16]


def _not_private(path: Path, folder: bool = False) -> str | None:
    """Why others could have written `path` (its owner is not this user, or its group or others
    may write to it; a library must be a plain file, not a link), or None: nobody else could."""
    info = path.stat() if folder else path.lstat()
    if not (stat.S_ISDIR if folder else stat.S_ISREG)(info.st_mode):
        return f"{path} is not a {'folder' if folder else 'plain file'}"
    if info.st_uid != os.geteuid():
        return f"{path} belongs to user {info.st_uid}, not to this one ({os.geteuid()})"
    if info.st_mode & 0o022:
        return f"{path} can be written by others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _compile(compiler: list[str], library: Path) -> None:
    """The kernel built into `library` (owner-only), through a temporary folder beside it and an
    atomic rename: concurrent processes may both build, none loads half a file."""
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        include = f"-I{jax.ffi.include_dir()}"
        result = _run([*compiler, *FLAGS, include, str(SOURCE), "-o", str(built)])
        if result.returncode or not built.is_file():
            lines = result.stderr.splitlines()
            first = next((line for line in lines if "error" in line), "no message")
            raise RuntimeError(f"{shlex.join(compiler)} failed on {SOURCE.name}: {first.strip()}")
        built.chmod(0o700)
        os.replace(built, library)


def _open(compiler: list[str], library: Path) -> ctypes.CDLL:
    """`library` loaded, built first where it is missing or others could have written it; one that
    does not load or lacks `ENTRY` is removed and built again once, then a RuntimeError."""
    for attempt in range(2):
        if attempt or not os.path.lexists(library) or _not_private(library):
            _compile(compiler, library)
        try:
            loaded = ctypes.CDLL(str(library))
        except OSError as e:
            why = f"{library} does not load ({str(e).removeprefix(str(library) + ': ')})"
        else:
            if hasattr(loaded, ENTRY):
                return loaded
            _ctypes.dlclose(loaded._handle)  # else the next load of this path returns this one
            why = f"{library} does not load: it has no {ENTRY}"
        library.unlink(missing_ok=True)
    raise RuntimeError(f"{why}, built again")


def _library() -> ctypes.CDLL:
    """The compiled kernel, loaded from the cache (`$SEQZOO_CACHE`, else `~/.cache/seqzoo`,
    created 0700), built there once per `_key`. The cache is used only when this user owns it and
    nobody else may write to it; else (with a warning) the kernel is built into a private
    temporary folder. A one-line RuntimeError says why there is none."""
    compiler = _compiler()
    name = f"packed_matmul-{_key(compiler)}.so"
    cache = _cache_dir()
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = _not_private(cache, folder=True)
    except OSError as e:
        why = f"{cache} cannot be made ({e.strerror})"
    if why is None:
        return _open(compiler, cache / name)
    warnings.warn(
        f"packed kernel cache not used, {why}: building into a private temporary folder (make "
        "the folder yours and chmod 700 it, or set SEQZOO_CACHE)",
        stacklevel=3,
    )
    with tempfile.TemporaryDirectory() as tmp:  # 0700, removed once the library is loaded
        return _open(compiler, Path(tmp) / name)


@functools.cache
def available() -> bool | str:
    """True once the kernel is built and registered with XLA for the CPU; else why not (a string,
    after one warning): JAX's default backend is not the CPU (params there are not packed), no C++
    compiler, a failed or timed-out build, a library that does not load even when built again."""
    if jax.default_backend() != "cpu":
        return f"packed kernels off: the default backend is {jax.default_backend()}, not the CPU"
    try:
        library = _library()
    except (OSError, RuntimeError) as e:  # OSError: a folder where the library should be, ...
        message = f"packed kernels off (decoding at batch 1 runs XLA's slower matmuls): {e}"
        warnings.warn(message, stacklevel=2)
        return f"packed kernels off: {e}"
    handler = jax.ffi.pycapsule(getattr(library, ENTRY))
    jax.ffi.register_ffi_target(TARGET, handler, platform="cpu")
    return True
