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
comes back unchanged.
"""

import ctypes
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


def on_huge_pages(tree):
    """`tree` with each array that lives on one CPU device moved onto 2 MB pages (values, dtypes,
    shapes, shardings and commitment unchanged; one copy); other leaves as they are. The moved
    arrays share one mapping, which lives as long as any of them."""
    leaves, treedef = jax.tree.flatten(tree)
    movable = [i for i, x in enumerate(leaves) if _on_one_cpu_device(x)]
    if not movable or not huge_pages_available():
        return tree
    hosts = {i: np.asarray(leaves[i]) for i in movable}
    offsets, size = {}, 0
    for i, host in hosts.items():  # each array page-aligned: XLA aliases aligned buffers
        offsets[i] = size
        size += -(-max(host.nbytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
    mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena = np.frombuffer(mapping, np.uint8)
    start = -arena.ctypes.data % HUGE_PAGE  # the first 2 MB boundary inside the mapping
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(arena.ctypes.data + start, size, MADV_HUGEPAGE) != 0:
        return tree  # before any page is touched: a refusal leaves nothing half-moved
    leaves = list(leaves)
    for i, host in hosts.items():
        begin = start + offsets[i]
        view = arena[begin : begin + host.nbytes].view(host.dtype).reshape(host.shape)
        view[...] = host
        # Committed arrays keep their sharding; uncommitted ones stay free to follow other operands.
        leaves[i] = jax.device_put(view, leaves[i].sharding if leaves[i].committed else None)
    return jax.tree.unflatten(treedef, leaves)
