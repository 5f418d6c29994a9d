"""experiment/host_memory.py: decoding weights moved onto 2 MB pages, values and shardings kept."""

import gc

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
