"""Scale-out with JAX's SPMD machinery: a device mesh, FSDP-style shardings and global batches.

    mesh = sharding.mesh_from_config(config)         # axes ("data", "fsdp") over every device
    shardings = sharding.tree_shardings(mesh, state)  # params / optimizer state, FSDP rule
    index, count = sharding.host_shard(mesh)         # which rows of each global batch this host reads
    batch = sharding.global_batch(next(it), mesh)    # host rows -> one global jax.Array per field

The mesh has two axes. The batch dimension of every batch is split over both of them
(`P(("data", "fsdp"))`), so each device sees distinct examples; params and optimizer state are
sharded over `fsdp` only (each leaf on its largest dimension divisible by the axis size, the rest
replicated, as in t5x and big_vision) and replicated over `data`. With `fsdp=1` this is plain data
parallelism; with `data=1` it is fully sharded data parallelism. The same jitted programs run on one
device, on N local devices and on many hosts (one process per host, `jax.distributed.initialize`).
"""

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over both axes


def initialize_distributed(config) -> None:
    """`jax.distributed.initialize` for a multi-host run when `config.distributed` is set.

    `config.coordinator_address`, `num_processes` and `process_id` are passed on when given; on
    Cloud TPU pods, SLURM and Open MPI JAX detects them itself. Must run before any JAX computation;
    a second call in one process does nothing.
    """
    if not config.get("distributed", False) or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=config.get("coordinator_address"),
        num_processes=config.get("num_processes"),
        process_id=config.get("process_id"),
    )


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A `(data, fsdp)` mesh over all devices (of all hosts); -1 for `data` takes the rest.

    Raises:
      ValueError: the sizes do not multiply to the device count (one-line message).
    """
    count = jax.device_count()
    if fsdp < 1 or data == 0 or data < -1:
        raise ValueError(
            f"mesh data={data}, fsdp={fsdp}: sizes must be positive (data may be -1 = the rest)"
        )
    if data == -1:
        if count % fsdp:
            raise ValueError(
                f"mesh fsdp={fsdp} does not divide the {count} devices: use a divisor of {count}"
            )
        data = count // fsdp
    if data * fsdp != count:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, but there are {count}: "
            "set --config.mesh.data=-1 (all devices not used by fsdp) or sizes that multiply to "
            f"{count}"
        )
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def mesh_from_config(config) -> Mesh:
    """The mesh of `config.mesh.data` x `config.mesh.fsdp` (default: every device on `data`)."""
    mesh = config.get("mesh") or {}
    return make_mesh(data=int(mesh.get("data", -1)), fsdp=int(mesh.get("fsdp", 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Dimension 0 (examples) split over every device of the mesh, the other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> PartitionSpec:
    """The FSDP rule for one array: its largest dimension divisible by `fsdp_size` is split over
    the `fsdp` axis (the first such one on ties); arrays with none such are replicated."""
    candidates = [d for d, n in enumerate(shape) if n and n % fsdp_size == 0]
    if fsdp_size == 1 or not candidates:
        return PartitionSpec()
    dim = max(candidates, key=lambda d: (shape[d], -d))
    return PartitionSpec(*([None] * dim), FSDP)


def tree_shardings(mesh: Mesh, tree):
    """A `NamedSharding` per leaf of `tree` (arrays or `ShapeDtypeStruct`s) by the FSDP rule."""
    size = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, size)), tree)


def abstract(tree, shardings):
    """`ShapeDtypeStruct`s of `tree` carrying `shardings`: a restore target for orbax, which then
    reads a checkpoint written on any device count straight into these shardings."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def host_shard(mesh: Mesh) -> tuple[int, int]:
    """`(shard_index, shard_count)`: this process feeds rows `[i*B/n, (i+1)*B/n)` of every global
    batch of `B` rows, the block its devices hold under `batch_sharding` (on a standard mesh,
    `(jax.process_index(), jax.process_count())`). Pass it to the input pipeline's iterator.

    Raises:
      ValueError: this process's devices do not hold one contiguous block of rows.
    """
    indices = batch_sharding(mesh).devices_indices_map((mesh.size,))  # one row per device
    rows = sorted(
        index[0].start or 0
        for device, index in indices.items()
        if device.process_index == jax.process_index()
    )
    count = len(rows)
    if not count or rows != list(range(rows[0], rows[0] + count)) or rows[0] % count:
        raise ValueError(
            f"process {jax.process_index()} holds batch rows {rows} of {mesh.size} under the "
            "mesh: build the mesh with each host's devices adjacent (jax.make_mesh does)"
        )
    return rows[0] // count, mesh.size // count


def _to_global(batch: dict[str, np.ndarray], mesh: Mesh, rows: int) -> dict[str, jax.Array]:
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))
        for key, x in batch.items()
    }


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """One global array per field from this host's rows (its `host_shard` of the global batch).

    Args:
      host_batch: arrays `[global_batch / shard_count, ...]`, as the input pipeline's iterator
        yields them for `host_shard(mesh)`.

    Returns:
      arrays `[global_batch, ...]` sharded by `batch_sharding(mesh)`.
    """
    _, count = host_shard(mesh)
    return _to_global(host_batch, mesh, next(iter(host_batch.values())).shape[0] * count)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from a batch every host holds whole (evaluation, user input): each device
    keeps its rows. The batch size must be a multiple of `mesh.size`."""
    rows = next(iter(batch.values())).shape[0]
    if rows % mesh.size:
        raise ValueError(
            f"batch of {rows} rows does not split over {mesh.size} devices: use a batch size "
            f"divisible by {mesh.size}"
        )
    return _to_global(batch, mesh, rows)


def round_up(batch_size: int, mesh: Mesh) -> int:
    """The least multiple of the mesh size (the devices a batch is split over) >= `batch_size`."""
    return math.ceil(batch_size / mesh.size) * mesh.size
