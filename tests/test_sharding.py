"""sharding.py and the scaled-out train.py / eval.py: 1 device == 4 devices == 2 hosts x 2 devices.

Device counts are fixed when JAX starts, so the multi-device runs happen in subprocesses of this
file (`python tests/test_sharding.py '<jobs json>'`, with `XLA_FLAGS=--xla_force_host_platform_
device_count=N`); they write .npz files that the tests compare. One module fixture runs them all,
each training the tiny config STEPS steps with the same global batches:
  4 devices:         FSDP x data parallel (data=2 x fsdp=2); decode its checkpoint (greedy, beam).
  2 hosts x 2:       data parallel over 4 devices in 2 processes (jax.distributed, CPU collectives).
  1 device:          the reference run; resume the 4-device run from its step-STEPS/2 checkpoint;
                     decode the 4-device checkpoint.
  2 devices:         the same resume with fsdp=2; decode the 4-device checkpoint.
"""

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sharding

REPO = Path(__file__).resolve().parents[1]
STEPS = 8  # checkpoints at STEPS / 2 and STEPS
RTOL, ATOL = 1e-5, 1e-6


# ------------------------------------------------------------------------------- in-process tests


@pytest.mark.parametrize(
    "shape, size, spec",
    [
        ((64, 128), 4, P(None, "fsdp")),  # the largest dimension
        ((128, 6), 4, P("fsdp")),
        ((6, 10, 8), 4, P(None, None, "fsdp")),  # the largest *divisible* dimension
        ((32, 32), 2, P("fsdp")),  # ties: the first
        ((3, 5), 2, P()),  # nothing divisible: replicated
        ((), 4, P()),  # scalars (step, optimizer counts)
        ((0, 8), 4, P(None, "fsdp")),  # an empty dimension is never split
        ((64, 128), 1, P()),  # no fsdp axis: replicated
    ],
)
def test_fsdp_rule(shape, size, spec):
    assert sharding.fsdp_spec(shape, size) == spec


def test_mesh_and_host_shard_on_one_device():
    mesh = sharding.mesh_from_config({})  # a config without `mesh`: everything on data
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
    assert sharding.host_shard(mesh) == (jax.process_index(), jax.process_count())
    batch = {"src": np.arange(12, dtype=np.int32).reshape(6, 2)}
    np.testing.assert_array_equal(sharding.global_batch(batch, mesh)["src"], batch["src"])
    rounded = sharding.round_up(5, mesh)
    assert rounded % mesh.size == 0 and 5 <= rounded < 5 + mesh.size


@pytest.mark.parametrize(
    "data, fsdp, message",
    [
        (0, 1, r"sizes must be positive"),
        (-1, 0, r"sizes must be positive"),
        (-1, 3, r"fsdp=3 does not divide the 1 devices"),
        (2, 1, r"data=2 x fsdp=1 needs 2 devices, but there are 1: set --config.mesh.data=-1"),
    ],
)
def test_bad_mesh_is_a_one_line_error(data, fsdp, message):
    if jax.device_count() != 1:
        pytest.skip("expects the test process to see one device")
    with pytest.raises(ValueError, match=message) as error:
        sharding.make_mesh(data, fsdp)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------ subprocess worker jobs


def _config(paths: dict, **overrides):
    from conftest import tiny_run_config

    fields = dict(
        num_train_steps=STEPS,
        log_every=1,
        eval_every=STEPS,
        checkpoint_every=STEPS // 2,
        num_eval_examples=32,
    )
    return tiny_run_config(paths["data_dir"], paths["tokenizer_dir"], **{**fields, **overrides})


def _gather(tree) -> dict[str, np.ndarray]:
    """Every leaf as a host numpy array (all-gathered across processes), keyed by its path."""
    from jax.experimental import multihost_utils

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path): np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        for path, leaf in flat
    }


def _job_train(paths, workdir, out, mesh, resume_from=None, **overrides):
    """Train (or resume a copy of `resume_from` without its last checkpoint) and dump the state."""
    from experiment import metrics, training

    workdir = Path(workdir)
    if resume_from:
        shutil.copytree(resume_from, workdir)
        shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    config = _config(paths, mesh=mesh, **overrides)
    state, _ = training.train_and_evaluate(config, workdir)
    params, opt_state = _gather(state.params), _gather(state.opt_state)
    specs = {k: str(x.sharding.spec) for k, x in _flat(state.params).items()}
    if jax.process_index() == 0:
        records = metrics.read_metrics(workdir)
        losses = [r["loss"] for r in records if r["split"] == "train"]
        np.savez(
            out,
            losses=np.array(losses),
            specs=json.dumps(specs),
            step=int(state.step),
            **{f"params{k}": v for k, v in params.items()},
            **{f"opt{k}": v for k, v in opt_state.items()},
        )


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _job_decode(workdir, out):
    """Decode the run's best checkpoint (greedy and beam 4) on this process's devices."""
    from data import input_pipeline
    from decoding import DecodeSettings
    from evaluation import decode_report, loading

    run = loading.Run(Path(workdir))
    eval_data = input_pipeline.get_eval_data(
        run.config, "validation", run.src_tokenizer, run.tgt_tokenizer, batch_size=32
    )
    eval_data = input_pipeline.head(eval_data, 32)
    arrays = {"devices": jax.device_count()}
    for decode in ("greedy", "beam"):
        search = DecodeSettings(decode, 4, 0.6, "gnmt", run.config.decoding.max_decode_len)
        ids, _, _ = decode_report.decode_batches(run, eval_data.batches, search, lambda *_: None)
        arrays[decode] = ids
    # The decoding features together: forced prefixes (none for every third sentence), n-gram
    # blocking, per-sentence limits and alignments, for beam search and two draws of sampling.
    prefix = np.zeros((32, 8), np.int32)
    prefix[:, :2] = run.tgt_tokenizer.encode("19")
    prefix[::3] = 0
    batches = [{**batch, "prefix": prefix} for batch in eval_data.batches]
    for decode in ("beam", "sample"):
        search = DecodeSettings(
            decode,
            4,
            0.6,
            "gnmt",
            run.config.decoding.max_decode_len,
            1.0,
            4,
            no_repeat_ngram_size=3,
            num_samples=2,
            top_p=0.9,
            seed=3,
            alignment_layer=-1,
        )
        records = []
        ids, results, _ = decode_report.decode_batches(
            run, batches, search, lambda _, record, records=records: records.append(record)
        )
        arrays[f"{decode}_features"] = ids
        arrays[f"{decode}_alignments"] = np.concatenate([r.alignments for r in results])
        if decode == "sample":
            arrays["sample_draws"] = np.array(
                [[d["text"] for d in record["samples"]] for record in records]
            )
    arrays.update({f"params{k}": np.asarray(v) for k, v in _flat(run.params).items()})
    np.savez(out, **arrays)


def _worker(jobs: list[dict]) -> None:
    for job in jobs:
        {"train": _job_train, "decode": _job_decode}[job.pop("kind")](**job)


def _spawn(jobs: list[dict], devices: int, cache_dir: Path) -> subprocess.Popen:
    """Runs `jobs` in a process with `devices` CPU devices, sharing compiled programs on disk.

    Its output goes to a temporary file (`process.log`), so a chatty process never blocks on a pipe.
    """
    # LLVM optimization level 0 halves compile times; the device counts compared share the flags.
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, __file__, json.dumps(jobs)],
        cwd=REPO,
        env={
            **os.environ,
            "XLA_FLAGS": flags,
            "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    process.log = log
    return process


def _wait(*processes: subprocess.Popen) -> None:
    """Waits for every process; on a failure kills the others (a host would wait for its peer)."""
    try:
        for process in processes:
            process.wait(timeout=300)
            process.log.seek(0)
            assert process.returncode == 0, process.log.read()[-4000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- subprocess results


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tfds_data_dir, tokenizer_dir) -> dict:
    """Runs every subprocess job once; returns each job's .npz contents by name (and the
    multi-host run's workdir as `hosts_workdir`)."""
    root = tmp_path_factory.mktemp("sharding")
    paths = {"data_dir": str(tfds_data_dir), "tokenizer_dir": str(tokenizer_dir)}
    out = lambda name: str(root / f"{name}.npz")
    fsdp4 = str(root / "fsdp4")

    def train(name, data, fsdp, **kw):
        workdir = str(root / name)
        mesh = {"data": data, "fsdp": fsdp}
        return dict(kind="train", paths=paths, workdir=workdir, out=out(name), mesh=mesh, **kw)

    def decode(name):
        return dict(kind="decode", workdir=fsdp4, out=out(name))

    spawn = functools.partial(_spawn, cache_dir=root / "xla_cache")
    port = _free_port()
    multi_host = dict(distributed=True, coordinator_address=f"localhost:{port}", num_processes=2)
    # Two processes at a time (2 cores; the hosts' collectives need both of theirs running).
    # 4 devices, FSDP x data parallel (data=2 x fsdp=2), the batch over all 4; 1-device reference.
    _wait(
        spawn([train("fsdp4", 2, 2), decode("decode4")], devices=4),
        spawn([train("one", -1, 1)], devices=1),
    )
    # 2 hosts x 2 devices, data parallel over the 4 (jax.distributed; CPU collectives: gloo).
    _wait(*[spawn([train("hosts", -1, 1, **multi_host, process_id=i)], devices=2) for i in (0, 1)])
    # Resume the 4-device run from its step-STEPS/2 checkpoint on 1 and 2 devices; decode.
    _wait(
        spawn([train("fsdp4_on1", -1, 1, resume_from=fsdp4), decode("decode1")], devices=1),
        spawn([train("fsdp4_on2", 1, 2, resume_from=fsdp4), decode("decode2")], devices=2),
    )
    results = {path.stem: dict(np.load(path)) for path in root.glob("*.npz")}
    results["hosts_workdir"] = root / "hosts"
    return results


def _assert_close_trees(a: dict, b: dict, prefix: str) -> None:
    keys = sorted(k for k in a if k.startswith(prefix))
    assert keys and keys == sorted(k for k in b if k.startswith(prefix))
    for key in keys:
        np.testing.assert_allclose(a[key], b[key], rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("other", ["fsdp4", "hosts"])
def test_same_losses_and_params_on_1_device_4_devices_and_2_hosts(runs, other):
    one, run = runs["one"], runs[other]
    assert int(one["step"]) == int(run["step"]) == STEPS
    assert len(one["losses"]) == STEPS
    np.testing.assert_allclose(run["losses"], one["losses"], rtol=RTOL)
    _assert_close_trees(run, one, "params")
    _assert_close_trees(run, one, "opt")


def test_fsdp_shards_params_and_data_parallel_replicates_them(runs):
    for name, sharded in [("fsdp4", True), ("fsdp4_on2", True), ("one", False), ("hosts", False)]:
        specs = json.loads(str(runs[name]["specs"])).values()
        assert any("fsdp" in spec for spec in specs) == sharded, name
        assert all(spec == str(P()) for spec in specs) != sharded, name


@pytest.mark.parametrize("resumed", ["fsdp4_on1", "fsdp4_on2"])
def test_checkpoint_written_on_4_devices_resumes_on_1_and_2(runs, resumed):
    """Resumed from step STEPS/2 (written on 4 devices) on 1 or 2: the same state at STEPS."""
    assert int(runs[resumed]["step"]) == STEPS
    _assert_close_trees(runs[resumed], runs["fsdp4"], "params")
    _assert_close_trees(runs[resumed], runs["fsdp4"], "opt")


@pytest.mark.parametrize("devices", [1, 2])
def test_decoding_is_identical_on_1_2_and_4_devices(runs, devices):
    four, fewer = runs["decode4"], runs[f"decode{devices}"]
    assert int(four["devices"]) == 4 and int(fewer["devices"]) == devices
    for decode in ("greedy", "beam", "beam_features", "sample_features"):
        assert four[decode].shape[0] == 32
        np.testing.assert_array_equal(fewer[decode], four[decode], err_msg=decode)
    for key in ("beam_alignments", "sample_alignments", "sample_draws"):
        np.testing.assert_array_equal(fewer[key], four[key], err_msg=key)
    forced = four["beam_features"][:, :2]
    assert np.all(forced[1::3] == forced[1]) and np.any(forced[::3] != forced[1])
    # eval.py read the params written on 4 devices into this device count, bit for bit.
    for key in (k for k in runs["fsdp4"] if k.startswith("params")):
        np.testing.assert_array_equal(fewer[key], runs["fsdp4"][key], err_msg=key)


def test_resuming_on_another_number_of_hosts_is_refused(
    runs, tmp_path, tfds_data_dir, tokenizer_dir
):
    from experiment import RunError, training

    workdir = tmp_path / "hosts"
    shutil.copytree(runs["hosts_workdir"], workdir)
    config = _config({"data_dir": tfds_data_dir, "tokenizer_dir": tokenizer_dir})
    with pytest.raises(RunError, match=r"resume with the number of hosts") as error:
        training.train_and_evaluate(config, workdir)
    assert "process_0-of-2.json" in str(error.value) and "\n" not in str(error.value)


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
