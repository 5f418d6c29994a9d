r"""Train-step throughput on 1, 2 and 4 devices: data parallel and FSDP, one global batch.

  python benchmarks/train_throughput.py                          # configs/default.py, 1/2/4 devices
  python benchmarks/train_throughput.py --config dates_transformer --json throughput.json
  python benchmarks/train_throughput.py --devices 1,8 --meshes dp  # on a machine with 8 devices
  python benchmarks/train_throughput.py --config multi30k_transformer --synthetic 128x32 \
      --devices 1 --no_host_devices --dtype bfloat16   # one GPU, no dataset needed
  python benchmarks/train_throughput.py --config multi30k_transformer --synthetic 73x56 \
      --devices 1 --steps 6 --set vocab_size=4000 --set model_hparams.ffn_dim=512  # a variant

Each (device count, mesh) runs in its own subprocess. On a CPU-only machine the devices are host
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`): the N devices share the machine's
cores, so this measures what splitting costs (partitioned programs, collectives) rather than a
speed-up; on GPUs or TPUs it counts real devices (`--devices` must not exceed them).

What is timed: `training.jitted_programs(...).train_step`, exactly as train.py runs it (params and optimizer
state sharded by the mesh, the batch split over every device, state donated), on the config's own
training batches, assembled as global arrays before timing (the input pipeline is not timed).
After `--warmup` steps (compilation), `--steps` steps run back to back and the clock stops when the
last one's result is ready. Reported: steps/s, examples/s, target tokens/s (non-padding), ms per step,
the warm-up seconds (compilation and the warm-up steps), and the speed relative to the 1-device run;
the compiled step's FLOPs (XLA's cost analysis: everything the program computes, forward, backward and
optimizer) and, where the device's peak is known (`--peak_tflops`, or the bfloat16 dense peak of an
H100/H200/A100), the model FLOPs utilization `FLOPs x steps/s / peak`. `--synthetic BxL` trains on
random token batches `[B, L]` of the config's vocabulary instead of its dataset (no data needed).

Meshes: `dp` = data parallel (`data=N, fsdp=1`: params replicated), `fsdp` = fully sharded
(`data=1, fsdp=N`: params and optimizer state split over the devices). Both split the batch over
all N devices.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = "RESULT "  # a child's last stdout line: RESULT {json}


def child(args) -> dict:
    """Measures one (device count, mesh) in this process; the device count is set by XLA_FLAGS."""
    sys.path.insert(0, str(REPO))
    import importlib

    import jax
    import numpy as np

    import sharding
    from experiment import programs, training

    config = importlib.import_module(f"configs.{args.config}").get_config()
    for override in args.set:
        set_field(config, override)
    config.dtype = args.dtype
    if args.batch_size:
        config.batch_size = args.batch_size
    config.num_buckets = 1  # one batch shape: one compilation, comparable steps
    devices = jax.device_count()
    config.mesh.data, config.mesh.fsdp = (devices, 1) if args.mesh == "dp" else (1, devices)
    mesh = sharding.mesh_from_config(config)
    if args.synthetic:
        vocab = config.vocab_size
        host_batches = synthetic_batches(
            args.synthetic, vocab, args.warmup + args.steps, config.seed
        )
        model = programs.create_model(config, vocab, vocab)
    else:
        from data import input_pipeline

        data = input_pipeline.get_datasets(config, batch_multiple=mesh.size)
        model = programs.create_model(
            config, data.src_tokenizer.vocab_size, data.tgt_tokenizer.vocab_size
        )
        iterator = data.train.iterator(*sharding.host_shard(mesh))
        host_batches = [next(iterator) for _ in range(args.warmup + args.steps)]
    run = training.jitted_programs(
        model, programs.make_optimizer(config), config.label_smoothing, mesh
    )
    seed = np.int32(config.seed)
    state = run.init(seed)
    batches = [sharding.global_batch(b, mesh) for b in host_batches]
    cost = run.train_step.lower(state, batches[0], seed).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA counts the FLOPs of one device's partitioned program: the step's total is N times that.
    flops = float(cost.get("flops", 0.0)) * jax.device_count() if cost else 0.0

    start = time.perf_counter()
    for batch in batches[: args.warmup]:
        state, out = run.train_step(state, batch, seed)
    jax.block_until_ready(out)
    warmup_seconds = time.perf_counter() - start

    start = time.perf_counter()
    for batch in batches[args.warmup :]:
        state, out = run.train_step(state, batch, seed)
    jax.block_until_ready((state, out))
    seconds = time.perf_counter() - start

    timed = host_batches[args.warmup :]
    examples = sum(b["src"].shape[0] for b in timed) * sharding.host_shard(mesh)[1]
    tokens = sum(int((b["tgt_out"] != 0).sum()) for b in timed) * sharding.host_shard(mesh)[1]
    params = sum(x.size for x in jax.tree.leaves(state.params))
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(jax.devices()[0])
    sharded = sum(
        x.size for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated
    )
    return {
        "backend": f"{jax.default_backend()} (jax {jax.__version__})",
        "device_kind": jax.devices()[0].device_kind,
        "dtype": config.dtype,
        "flops_per_step": flops,
        "tflops_per_sec": flops * args.steps / seconds / 1e12,
        "mfu": flops * args.steps / seconds / (peak * jax.device_count()) if peak else None,
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "global_batch": int(batches[0]["src"].shape[0]),
        "batch_shape": [int(n) for n in (*batches[0]["src"].shape, batches[0]["tgt_in"].shape[1])],
        "params": int(params),
        "params_sharded": int(sharded),
        "steps": args.steps,
        "steps_per_sec": args.steps / seconds,
        "examples_per_sec": examples / seconds,
        "tokens_per_sec": tokens / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "warmup_seconds": warmup_seconds,
        "final_loss": float(out["loss_sum"]) / max(float(out["tokens"]), 1.0),
    }


def set_field(config, override: str) -> None:
    """Applies `--set a.b=value` to `config`: the value read as a Python literal (else a string);
    `model_hparams` takes any hyperparameter the model has, other fields must exist."""
    import ast

    path, sep, text = override.partition("=")
    if not sep:
        sys.exit(f"error: --set {override!r}: write it as field=value, e.g. vocab_size=4000")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *parents, name = path.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    if parents == ["model_hparams"]:
        with node.unlocked():
            node[name] = value
    elif name not in node:
        sys.exit(f"error: --set {override!r}: the config has no field {path!r}")
    else:
        node[name] = value


# bfloat16 dense peak FLOP/s per device, by device kind (vendor figures, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops(device) -> float | None:
    kind = device.device_kind
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)


def synthetic_batches(shape: str, vocab: int, count: int, seed: int) -> list[dict]:
    """`count` batches of random tokens `[B, L]` (`shape` "BxL"): `src`, `tgt_in` (BOS first) and
    `tgt_out` (EOS last), no padding, ids in [4, vocab)."""
    import numpy as np

    try:
        batch, length = (int(n) for n in shape.lower().split("x"))
    except ValueError:
        sys.exit(f"error: --synthetic {shape!r}: give the batch shape as BxL, e.g. 128x32")
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        src = rng.integers(4, vocab, (batch, length)).astype(np.int32)
        tgt = rng.integers(4, vocab, (batch, length)).astype(np.int32)
        src[:, -1] = 2
        tgt_in = np.concatenate([np.ones((batch, 1), np.int32), tgt[:, :-1]], axis=1)
        tgt_out = tgt.copy()
        tgt_out[:, -1] = 2
        batches.append({"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out})
    return batches


def spawn(args, devices: int, mesh: str) -> dict:
    env = dict(os.environ)
    if args.host_devices:
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
        ).strip()
    command = [
        sys.executable,
        __file__,
        "--child",
        "--mesh",
        mesh,
        *("--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup)),
        *(("--batch_size", str(args.batch_size)) if args.batch_size else ()),
        *("--dtype", args.dtype),
        *(("--synthetic", args.synthetic) if args.synthetic else ()),
        *(f"--set={override}" for override in args.set),
        *(("--peak_tflops", str(args.peak_tflops)) if args.peak_tflops else ()),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode or not lines:
        sys.exit(f"error: the {devices}-device {mesh} run failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT) :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default", help="a module of configs/ (default)")
    parser.add_argument("--devices", default="1,2,4", help="device counts, comma-separated")
    parser.add_argument("--meshes", default="dp,fsdp", help="dp and/or fsdp, comma-separated")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument("--batch_size", type=int, default=0, help="global batch (0: the config's)")
    parser.add_argument(
        "--no_host_devices",
        dest="host_devices",
        action="store_false",
        help="use the real devices (GPU/TPU) instead of forcing N host (CPU) devices",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="computation dtype"
    )
    parser.add_argument("--synthetic", help="BxL: random token batches of this shape, no dataset")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="config override, repeatable: --set vocab_size=4000 --set model_hparams.ffn_dim=512",
    )
    parser.add_argument("--peak_tflops", type=float, help="the device's peak, for the MFU")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mesh", default="dp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(RESULT + json.dumps(child(args)), flush=True)
        return

    counts = [int(n) for n in args.devices.split(",")]
    meshes = [m for m in args.meshes.split(",") if m]
    if bad := [m for m in meshes if m not in ("dp", "fsdp")]:
        sys.exit(f"error: unknown mesh {bad[0]!r}: use dp and/or fsdp")
    results = []
    for devices in counts:
        for mesh in meshes if devices > 1 else meshes[:1]:  # one device: dp == fsdp
            results.append(
                {"name": mesh if devices > 1 else "single", **spawn(args, devices, mesh)}
            )
            print(f"{devices} device(s), {results[-1]['name']}: done", file=sys.stderr)
    base = next((r for r in results if r["devices"] == 1), results[0])
    header = (
        f"{'devices':>7}  {'mesh':<22}{'steps/s':>9}{'examples/s':>12}{'tokens/s':>10}"
        f"{'ms/step':>9}{'vs 1':>7}{'sharded params':>16}{'warm-up s':>11}{'TFLOP/s':>9}{'MFU':>7}"
    )
    print(
        f"config {args.config}: {base['params']:,} params, global batch {base['batch_shape']} "
        f"(batch, src_len, tgt_len); {base['backend']}, {os.cpu_count()} CPUs"
    )
    print(header)
    for r in results:
        mesh = f"{r['name']} {r['mesh']['data']}x{r['mesh']['fsdp']}"
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(
            f"{r['devices']:>7}  {mesh:<22}{r['steps_per_sec']:>9.2f}{r['examples_per_sec']:>12.0f}"
            f"{r['tokens_per_sec']:>10.0f}{r['ms_per_step']:>9.1f}"
            f"{r['steps_per_sec'] / base['steps_per_sec']:>7.2f}"
            f"{r['params_sharded'] / r['params']:>16.0%}{r['warmup_seconds']:>11.1f}"
            f"{r['tflops_per_sec']:>9.2f}{mfu:>7}"
        )
    if args.json:
        machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
