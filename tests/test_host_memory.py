"""experiment/host_memory.py: decoding weights moved onto 2 MB pages, values and shardings kept."""

import gc
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiment import host_memory

needs_huge_pages = pytest.mark.skipif(
    not host_memory.huge_pages_available(),
    reason="needs Linux with transparent huge pages on (/sys/kernel/mm/transparent_hugepage/enabled"
    " set to always or madvise)",
)


def mapping_flags(address: int) -> list[str]:
    """The VmFlags of this process' mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_huge_pages
def test_arrays_move_onto_one_mapping_that_asks_for_huge_pages_values_unchanged():
    tree = {
        "kernel": jax.random.normal(jax.random.key(0), (300, 257)),
        "int8": {"values": jnp.arange(1000, dtype=jnp.int8), "scale": jnp.ones((), jnp.float32)},
        "bf16": jnp.linspace(0, 1, 77, dtype=jnp.bfloat16),
        "host": np.ones(3, np.float32),  # not a device array: left as it is
    }
    key = jax.random.key(0)  # a PRNG key has no numpy form: left as it is
    want = jax.tree.map(np.array, tree)
    moved = host_memory.on_huge_pages({**tree, "key": key})
    assert moved.pop("key") is key and moved["host"] is tree["host"]
    del tree
    gc.collect()  # the moved arrays keep their mapping alive
    for (path, got), expected in zip(
        jax.tree_util.tree_leaves_with_path(moved), jax.tree.leaves(want)
    ):
        assert got.dtype == expected.dtype and got.shape == expected.shape, path
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=str(path))
    arrays = [x for x in jax.tree.leaves(moved) if isinstance(x, jax.Array)]
    pointers = sorted(x.unsafe_buffer_pointer() for x in arrays)
    assert pointers[0] % host_memory.HUGE_PAGE == 0, "the first array starts a 2 MB page"
    assert all(p % 4096 == 0 for p in pointers), "each array page-aligned, so XLA aliases it"
    assert all("hg" in mapping_flags(p) for p in pointers), "the mapping is madvised MADV_HUGEPAGE"
    np.testing.assert_allclose(
        jax.jit(lambda t: t["kernel"].sum())(moved), want["kernel"].sum(), rtol=1e-5
    )


@needs_huge_pages
def test_shardings_and_commitment_are_kept():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tree = {"placed": jax.device_put(jnp.ones((64, 64)), replicated), "free": jnp.ones((64, 64))}
    moved = host_memory.on_huge_pages(tree)
    for name in tree:
        assert moved[name].unsafe_buffer_pointer() != tree[name].unsafe_buffer_pointer(), name
        assert "hg" in mapping_flags(moved[name].unsafe_buffer_pointer()), name
        assert moved[name].committed == tree[name].committed, name
    assert moved["placed"].sharding == replicated


def test_without_huge_pages_nothing_moves(monkeypatch):
    tree = {"w": jnp.ones((64, 64))}
    monkeypatch.setattr(host_memory, "huge_pages_available", lambda: False)
    assert host_memory.on_huge_pages(tree) is tree


@needs_huge_pages
def test_huge_pages_give_room_front_to_back_and_refuse_what_does_not_fit():
    """`HugePages.fitting` makes room for arrays as wide as asked (an int8 array as float32), `empty`
    hands out page-aligned numpy arrays on it that `jax.device_put` aliases, `put` copies into it;
    past the room a one-line ValueError."""
    small = jnp.arange(1000, dtype=jnp.int8)
    pages = host_memory.HugePages.fitting([small, np.ones(3)], jnp.float32)  # numpy: no room
    out = pages.empty((1000,), np.float32)
    out[...] = np.arange(1000)
    placed = jax.device_put(out)
    assert placed.unsafe_buffer_pointer() == out.ctypes.data and pages.holds(placed)
    assert placed.unsafe_buffer_pointer() % host_memory.HUGE_PAGE == 0
    assert "hg" in mapping_flags(out.ctypes.data)
    assert not pages.holds(small) and not pages.holds(jnp.ones(3))
    with pytest.raises(ValueError, match="1000 bytes do not fit the 0 left on these pages"):
        pages.put(small)
    assert host_memory.HugePages.fitting([np.ones(3)]) is None  # nothing on a CPU device


@needs_huge_pages
def test_arrays_already_on_the_given_pages_stay_and_the_rest_join_them():
    tree = {"a": jnp.ones((64, 64)), "b": jnp.arange(7)}
    pages = host_memory.HugePages.fitting(jax.tree.leaves(tree))
    placed = pages.put(tree["a"])
    moved = host_memory.on_huge_pages({**tree, "a": placed}, pages)
    assert moved["a"] is placed and pages.holds(moved["b"])
    np.testing.assert_array_equal(moved["b"], tree["b"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_memory_that_the_allocator_kept_is_given_back():
    """Arrays of 1 MB freed between blocks still in use stay in the process (glibc keeps them
    once its mmap threshold has risen past their size) until `return_freed_memory`."""
    np.ones(4 << 20, np.float32)  # a freed 16 MB block raises glibc's mmap threshold to 16 MB
    kept, freed = [], []
    for _ in range(64):
        freed.append(np.ones(1 << 18, np.float32))  # 1 MB, on the heap now
        kept.append(np.ones(1 << 12, np.float32))  # 16 KB between them, still in use
    del freed
    gc.collect()
    before = resident_mib()
    host_memory.return_freed_memory()
    assert resident_mib() < before - 32, "the 64 MB freed stayed in the process"
    assert len(kept) == 64


def resident_mib() -> float:
    line = next(line for line in open("/proc/self/status") if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024
