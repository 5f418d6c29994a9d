"""Decoding weights on 2 MB pages of host memory, for XLA:CPU.

A decoding step of one sentence multiplies a row or a few rows by every weight matrix: it streams
the weights through the cache, ~19 MB a step for the decode benchmark's model and ~220 MB for
opus-mt's. On Linux's default 4 KB pages that stream crosses a page every 4 KB: the TLB covers a
few MB and the hardware prefetchers stop at each page boundary. Linux backs memory with 2 MB pages
("transparent huge pages") where a process asks for them (`madvise(MADV_HUGEPAGE)`, the default
`[madvise]` mode), and XLA's allocator does not ask.

`on_huge_pages` copies the arrays of a pytree that live on one CPU device into one anonymous mapping
that asks for 2 MB pages, and hands each back to JAX without a copy (`jax.device_put` of an aligned
numpy array aliases it on the CPU backend; the array keeps the mapping alive). A batch-1 decode of
opus-mt-en-de's size is 1.2x faster this way (docs/benchmarks_decoding.md, "Batch 1"). Where
there is nothing to gain (other platforms, arrays split over devices, huge pages disabled) the tree
comes back unchanged. `HugePages` is that mapping, for callers that write arrays onto it as they
make them (`decode_programs.decoding_params` packs kernels straight onto it), and
`return_freed_memory` gives back what glibc keeps of freed arrays.
"""

import ctypes
import math
import mmap
import sys
from pathlib import Path

import jax
import numpy as np

HUGE_PAGE = 1 << 21
MADV_HUGEPAGE = 14  # linux/mman.h
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether this process can ask Linux for transparent huge pages (mode `always` or `madvise`)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def _on_one_cpu_device(x) -> bool:
    if not isinstance(x, jax.Array) or not x.is_fully_addressable:
        return False
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # no host (numpy) form
        return False
    devices = x.devices()
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


class HugePages:
    """Room for arrays on one anonymous mapping that asks Linux for 2 MB pages, handed out front to
    back by `put` (each array page-aligned: XLA aliases aligned buffers). Make it with `fitting`."""

    def __init__(self, mapping: mmap.mmap, arena: np.ndarray):
        self._mapping, self._arena, self._used = mapping, arena, 0

    @classmethod
    def fitting(cls, arrays, dtype=None) -> "HugePages | None":
        """Room for those of `arrays` that live on one CPU device (each as wide as `dtype` at
        least, where given: room that pages left unused never takes memory), or None where there
        are none or this process cannot have 2 MB pages (before any page is touched)."""
        width = np.dtype(dtype).itemsize if dtype is not None else 1
        size = sum(_page_rounded(x.shape, x.dtype, width) for x in arrays if _on_one_cpu_device(x))
        if not size or not huge_pages_available():
            return None
        mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena = np.frombuffer(mapping, np.uint8)
        start = -arena.ctypes.data % HUGE_PAGE  # the first 2 MB boundary inside the mapping
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.madvise(arena.ctypes.data + start, size, MADV_HUGEPAGE) != 0:
            return None
        return cls(mapping, arena[start : start + size])

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        """A numpy array `shape` of `dtype` in the next room (zeros until written); `jax.device_put`
        of it aliases it. A ValueError when it does not fit."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        begin, size = self._used, _page_rounded(shape, dtype)
        if begin + size > self._arena.size:
            raise ValueError(
                f"{nbytes} bytes do not fit the {self._arena.size - begin} left on these pages: "
                "make them with HugePages.fitting(every array put)"
            )
        self._used += size
        return self._arena[begin : begin + nbytes].view(dtype).reshape(shape)

    def put(self, x) -> jax.Array:
        """`x` (an array on one CPU device) copied into the next room, as a JAX array on it: values,
        dtype and shape unchanged; a committed array keeps its sharding, others stay free to
        follow other operands."""
        host = np.asarray(x)
        view = self.empty(host.shape, host.dtype)
        view[...] = host
        return jax.device_put(view, x.sharding if x.committed else None)

    def holds(self, x) -> bool:
        """Whether `x` is an array on these pages."""
        if not isinstance(x, jax.Array) or not _on_one_cpu_device(x):
            return False
        offset = x.unsafe_buffer_pointer() - self._arena.ctypes.data
        return 0 <= offset < self._arena.size


def _page_rounded(shape: tuple, dtype, width: int = 1) -> int:
    """Bytes of an array `shape` of `dtype` (elements `width` bytes at least), whole 4 KB pages."""
    nbytes = math.prod(shape) * max(np.dtype(dtype).itemsize, width)
    return -(-max(nbytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE


def return_freed_memory() -> None:
    """Memory the process has freed but glibc's allocator still holds given back to the system
    (`malloc_trim`; elsewhere nothing happens). glibc keeps freed blocks below its mmap threshold,
    which rises to the largest block freed (up to 32 MiB), so every freed array of a few MB stays
    in the process; XLA's later large buffers are mapped anew beside them. At opus-mt's size a
    decode process so held ~600 MiB of freed weights and compiler buffers while it decoded."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def on_huge_pages(tree, pages: HugePages | None = None):
    """`tree` with each array that lives on one CPU device moved onto 2 MB pages (values, dtypes,
    shapes, shardings and commitment unchanged; one copy); other leaves as they are. The moved
    arrays share one mapping, which lives as long as any of them: `pages` where given (arrays
    already on it stay), else one made to fit."""
    leaves, treedef = jax.tree.flatten(tree)
    movable = [i for i, x in enumerate(leaves) if _on_one_cpu_device(x)]
    if pages is not None:
        movable = [i for i in movable if not pages.holds(leaves[i])]
    if not movable:
        return tree
    pages = pages or HugePages.fitting([leaves[i] for i in movable])
    if pages is None:
        return tree
    for i in movable:
        leaves[i] = pages.put(leaves[i])
    return jax.tree.unflatten(treedef, leaves)
