"""Dense kernels stored in column panels for decoding on the CPU.

A decoding step at batch 1 multiplies one row (greedy) or a beam's few rows by every weight of the
decoder once, so its speed is the rate at which the small matmuls read the weights. XLA:CPU's
kernels read a `[K, N]` matrix at 15-30 GB/s at four rows and 40-60 GB/s at one on the machine of
docs/benchmarks_decoding.md; stored in panels of 64 columns, the same product is one sequential
read with each row's 64 sums held in registers (`packed_matmul.cc`, an XLA FFI call): 40-45 GB/s at
four rows, 70-85 at one. CTranslate2 packs its weights for the same reason. The kernel serves every
row count (a single product at 128 rows 0.93-1.2x XLA's GEMM on the kernel as it lies, at 640
0.88-1.07x; a beam 4, batch 32 decode 1.06-1.11x), so the panels are the only copy of a weight
that decoding keeps.

Packing is a transform of the params (as `models.int8`'s quantizing is): `pack_params` replaces every
float dense kernel by a `PackedKernel`, its weights reordered panel after panel into an array of the
kernel's own shape (no padding, no second copy); the layers that pass this module's `dot_general`
(and `int8.promote_dtype`) to flax's dense layers multiply by it through the FFI kernel on the CPU
(`jax.lax.platform_dependent`: on a GPU or TPU the same program puts the kernel back in order and
runs XLA's product). `columns` reads a packed kernel's columns, so a tied output projection's table
packed as `[d_model, vocab]` also serves the embedding lookups.

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
TARGET = "seqzoo_packed_matmul"
SOURCE = Path(__file__).with_name("packed_matmul.cc")


@flax.struct.dataclass
class PackedKernel:
    """A dense kernel `[K..., F...]` (its first `contracting` axes contracted) as float32 column
    panels: `panels` has the kernel's shape and holds, flattened, `W [K, N]` (K and F flattened)
    panel after panel, each panel `[K, w]` row-major for its columns `64p .. 64p + w - 1` (`w` = 64,
    the last `N - 64 (P - 1)`, P = ceil(N / 64)). One array the size of the kernel: decoding keeps
    no other copy of the weights (`unpack` puts them back in order).

    `panels` has the kernel's shape, so flax's shape check of a param sees the kernel's shape.
    """

    panels: jax.Array
    contracting: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def shape(self) -> tuple:
        return self.panels.shape


def pack(kernel: jax.Array, contracting: int = 1, empty=np.empty) -> PackedKernel:
    """`kernel [K..., F...]` (any layout numpy can view, e.g. a table transposed) as float32 panels
    (`PackedKernel`), written on the host into `empty(shape, float32)` (np.empty's signature;
    `host_memory.HugePages.empty` puts them on 2 MB pages, where `jax.device_put` aliases them):
    no other copy is made."""
    host = np.asarray(kernel)
    k, n, full = _sizes(host.shape, contracting)
    matrix, out = host.reshape(k, n), empty(host.shape, np.float32)
    flat = out.reshape(-1)
    head = matrix[:, :full].reshape(k, full // PANEL, PANEL).transpose(1, 0, 2)
    flat[: k * full].reshape(head.shape)[...] = head
    flat[k * full :].reshape(k, n - full)[...] = matrix[:, full:]
    return PackedKernel(jax.device_put(out), contracting)


def _sizes(shape: tuple, contracting: int) -> tuple[int, int, int]:
    """(K, N, the columns in full panels) of a kernel `shape` contracted on `contracting` axes."""
    k, n = math.prod(shape[:contracting]), math.prod(shape[contracting:])
    return k, n, n - n % PANEL


def unpack(weights: PackedKernel) -> jax.Array:
    """The kernel `[K..., F...]` (float32) that `weights` holds in panels, in order (a copy)."""
    k, n, full = _sizes(weights.shape, weights.contracting)
    flat = weights.panels.reshape(-1)
    head = flat[: k * full].reshape(full // PANEL, k, PANEL).transpose(1, 0, 2).reshape(k, full)
    tail = flat[k * full :].reshape(k, n - full)
    return jnp.concatenate([head, tail], axis=1).reshape(weights.shape)


def columns(weights: PackedKernel, ids: jax.Array) -> jax.Array:
    """`W[..., ids]` moved to the end: float32 `[*ids.shape, K]` of a kernel `[K, N]` (one axis
    contracted) packed, column `ids` (int, in `[0, N)`) of every row: a tied output projection's
    table `[d_model, vocab]` read as the embedding table `[vocab, d_model]` for lookups."""
    k, n, full = _sizes(weights.shape, weights.contracting)
    if weights.panels.ndim != 2 or weights.contracting != 1:
        raise ValueError(
            f"packed columns: want a kernel [K, N] with one contracted axis, got "
            f"{tuple(weights.shape)} contracting {weights.contracting}: pack the table as [K, N]"
        )
    if k * n >= 2**31:
        raise ValueError(
            f"packed columns: a kernel of {k * n} weights is past int32 offsets: keep a table "
            "over 2**31 weights unpacked"
        )
    ids = jnp.asarray(ids, jnp.int32)
    panel, column = ids // PANEL, ids % PANEL
    width = jnp.where(panel < full // PANEL, PANEL, n - full)  # the last panel may be narrower
    rows = jnp.arange(k, dtype=jnp.int32)
    offsets = (panel * (k * PANEL) + column)[..., None] + rows * width[..., None]
    return weights.panels.reshape(-1)[offsets]


def pack_params(params: dict, empty=np.empty) -> dict:
    """`params` with every float dense kernel (a `kernel` beside a `bias`) as a `PackedKernel`
    (written into `empty`'s arrays, see `pack`); other leaves unchanged. Nothing is packed when
    `available()` is not true."""
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
            out["kernel"] = pack(kernel, kernel.ndim - bias.ndim, empty)
        return out

    return walk(dict(params))


def check(x_shape: tuple, weights: PackedKernel) -> None:
    """A one-line ValueError unless `weights.panels` are float32 with `1 .. ndim - 1` contracted
    axes and `x_shape` ends in the kernel's contracting axes `K...`."""
    k, shape = weights.contracting, tuple(weights.shape)
    if not 0 < k < len(shape):
        raise ValueError(
            f"packed kernel {shape} with {k} contracted axes: want 1 to {len(shape) - 1} (pack "
            "the kernel with its contracted axes, packed.pack(kernel, contracting))"
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
    """`x [..., K...] . W` for W `[K..., F...]` packed: through the panels (float32, any row count)
    on the CPU, through the kernel put back in order (`unpack`) elsewhere. Shapes are checked first
    (`check`): an input of other trailing axes is a ValueError."""
    check(x.shape, weights)
    k = weights.contracting
    lead, out = x.shape[: x.ndim - k], weights.shape[k:]
    rows, contracted, cols = math.prod(lead), math.prod(weights.shape[:k]), math.prod(out)
    dtype = preferred_element_type or x.dtype

    def plain(x):
        kernel = unpack(weights).reshape(contracted, cols)
        y = jnp.dot(x.reshape(rows, contracted), kernel, preferred_element_type=jnp.float32)
        return y.reshape(*lead, *out).astype(dtype)

    if rows == 0:
        return plain(x)

    def panels(x):
        if (why := available()) is not True:
            raise RuntimeError(why)
        y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, cols), jnp.float32))(
            x.reshape(rows, contracted).astype(jnp.float32),
            weights.panels.reshape(contracted, cols),
        )
        return y.reshape(*lead, *out).astype(dtype)

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
