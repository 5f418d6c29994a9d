r"""The GPU check: on a machine with an NVIDIA GPU, in about 8 minutes and at most 10.5 (each step has
a time limit: 180 + 2 x 130 + 2 x 75 s, and the in-process loop check), one JSON and one log of what
the accelerators issue asks to measure. On an H200 machine (16 cores) the steps took 151 s (tests,
12 pytest-xdist workers), ~95 s per decode dtype, ~57 s per train dtype and 30 s.

  python benchmarks/accelerator_check.py --out gpu_check          # on the GPU machine
  python benchmarks/accelerator_check.py --out /tmp/smoke --smoke # anywhere, tiny sizes, ~1 minute

Steps (each in its own subprocess with a time limit; a failing step is recorded and the next runs):
1. `environment`: versions, the backend and its devices.
2. `tests`: the model and decoding tests on the default backend, with float32 matmuls at "highest"
   precision (H100/H200 default to TF32), deterministic GPU ops and no GPU preallocation.
3. `decode`: `benchmarks/decode.py` on the device, float32 and bfloat16, greedy and beam 4 at
   batch 1, 32 and 256, seqzoo against HF transformers `generate` (and CTranslate2 where installed)
   on the same weights, tokens compared; beam 4 ratios at batch 32 and 256.
4. `train`: `benchmarks/train_throughput.py` on the Multi30k Transformer (`configs/multi30k_
   transformer.py`, random batches of 128 x 32 tokens), float32 and bfloat16: steps/s, tokens/s,
   XLA-counted FLOPs and MFU against the device's bfloat16 peak.
5. `decode_loop`: the compiled decoding programs hold no host callback, infeed/outfeed or send/recv,
   run under `jax.transfer_guard("disallow")` (no implicit transfer), and are not compiled again by
   new sources of the same shape. (XLA:GPU's while loop still reads its predicate on the host each
   iteration: that is XLA's, not ours, and not counted here.)

`--smoke` runs every step at toy sizes (bfloat16 only) on whatever backend is there (the CPU in CI: the test
`tests/test_accelerator_check.py` calls it, so the script cannot rot). Never `pip install -r
requirements.txt` on a GPU machine whose jax has the CUDA plugin: carry the missing wheels and install
them with `--no-deps` (docs/accelerators.md).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# This process runs JAX too (environment, decode_loop): it must not take 75% of the GPU from its
# children. Set before anything imports jax.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

GPU_TESTS = [
    "tests/test_greedy.py",
    "tests/test_beam_search.py",
    "tests/test_beam_constraints.py",
    "tests/test_sampling.py",
    "tests/test_scoring.py",
    "tests/test_transformer.py",
    "tests/test_attention_rnn.py",
    "tests/test_seq2seq_rnn.py",
    "tests/test_registry.py",
    "tests/test_programs.py",
    "tests/test_decode_programs.py",
]
SMOKE_TESTS = ["tests/test_greedy.py", "-k", "forced_prefix or alignments"]
# What a compiled program would need to leave the device during a decoding loop.
HOST_OPS = re.compile(r"outfeed|infeed|\bsend\b|\brecv\b|callback|host_compute", re.IGNORECASE)


def child_env(tests: bool = False) -> dict:
    """The children's environment: no GPU preallocation (several processes share the GPU); for the
    tests also float32 matmuls at "highest" precision (H100/H200 default to TF32) and deterministic
    GPU ops (bit-identical runs); the benchmarks run as users run (decode.py sets its own precision
    for float32 so that tokens compare). The repo goes before any PYTHONPATH already set (on a GPU
    machine, the folder the carried wheels were installed into)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if tests:
        env.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
        flags = env.get("XLA_FLAGS", "")
        if "xla_gpu_deterministic_ops" not in flags:
            env["XLA_FLAGS"] = (flags + " --xla_gpu_deterministic_ops=true").strip()
    return env


class Check:
    """Runs the steps, logging each command's output to `<out>/accelerator_check.log`."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.log = out, open(out / "accelerator_check.log", "w", encoding="utf-8")
        self.report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": {}}

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def command(
        self, args: list[str], timeout: float, tests: bool = False
    ) -> tuple[int, str, float]:
        """(exit code, stdout + stderr, seconds) of `args`; 124 when it ran past `timeout`."""
        self.say(f"$ {' '.join(args)}")
        start = time.perf_counter()
        try:
            done = subprocess.run(
                args,
                cwd=REPO,
                env=child_env(tests),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            code, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            code = 124
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        seconds = time.perf_counter() - start
        self.log.write(text + f"\n[exit {code} after {seconds:.1f} s]\n")
        self.log.flush()
        return code, text, seconds

    def step(self, name: str, fn) -> None:
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 (a failing step is a finding; the others still run)
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.perf_counter() - start, 1)
        self.report["steps"][name] = result
        self.say(f"{name}: {result.get('status')} ({result['seconds']} s)")
        self.write()

    def write(self) -> None:
        path = self.out / "accelerator_check.json"
        path.write_text(json.dumps(self.report, indent=1, default=str) + "\n")


def environment() -> dict:
    import importlib.util

    import jax

    versions = {"python": sys.version.split()[0], "jax": jax.__version__}
    for name in ("jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "transformers"):
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", "?")
    devices = jax.devices()
    return {
        "status": "ok",
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "versions": versions,
    }


def run_tests(check: Check, smoke: bool) -> dict:
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed (carry its wheel)"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if not smoke and importlib.util.find_spec("xdist") is not None:
        # Compilation is host work: 12 workers (whole files each) take ~150 s on an H200 machine.
        args += ["-n", "12", "--dist", "loadfile"]
    code, text, _ = check.command(args + (SMOKE_TESTS if smoke else GPU_TESTS), 180, tests=True)
    counts = {
        kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", text)
    }
    failed = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    status = "ok" if code == 0 else ("timeout" if code == 124 else "failed")
    return {"status": status, "exit_code": code, "counts": counts, "failed": failed[:50]}


def dtypes(smoke: bool) -> tuple[str, ...]:
    """Both dtypes; the smoke run only bfloat16 (the float32 paths run in the other tests)."""
    return ("bfloat16",) if smoke else ("float32", "bfloat16")


def run_decode(check: Check, smoke: bool, device: str) -> dict:
    import importlib.util

    systems = ["seqzoo"]
    if not smoke and importlib.util.find_spec("transformers") is not None:
        systems.append("transformers")
        if importlib.util.find_spec("ctranslate2") is not None:
            systems.append("ctranslate2")
    result = {"status": "ok", "systems": systems, "dtypes": {}}
    for dtype in dtypes(smoke):
        path = check.out / f"decode_{dtype}.json"
        args = [sys.executable, "benchmarks/decode.py", "--device", device, "--dtype", dtype]
        args += ["--systems", ",".join(systems), "--json", str(path)]
        args += ["--quick"] if smoke else ["--batch_sizes", "1,32,256"]
        code, text, _ = check.command(args, 150 if smoke else 130)
        if code != 0 or not path.is_file():
            result["status"] = "failed"
            result["dtypes"][dtype] = {"exit_code": code, "tail": text[-2000:]}
            continue
        report = json.loads(path.read_text())
        result["dtypes"][dtype] = summarize_decode(report)
    return result


def summarize_decode(report: dict) -> dict:
    """Per system and cell: tokens/s and ms; seqzoo's ratios and token agreement per baseline."""
    from benchmarks import decode

    out = {"cells": {}, "ratios": {}, "same_tokens": {}, "recompiles": {}}
    results = report["results"]
    for system, result in results.items():
        out["cells"][system] = {
            c["cell"]: {"tokens_per_s": round(c["tokens_per_s"], 1), "ms": round(c["ms_median"], 2)}
            for c in result["cells"]
        }
        if "recompiles" in result["cells"][0]:
            out["recompiles"][system] = sum(c["recompiles"] for c in result["cells"])
    ours = results.get("seqzoo")
    for system, result in results.items():
        if system == "seqzoo" or ours is None:
            continue
        pairs = list(zip(ours["cells"], result["cells"], strict=True))
        out["ratios"][system] = {
            a["cell"]: round(a["tokens_per_s"] / b["tokens_per_s"], 2) for a, b in pairs
        }
        out["same_tokens"][system] = {a["cell"]: decode.agreement(a, b) for a, b in pairs}
    out["versions"] = report.get("versions", {})
    return out


def run_train(check: Check, smoke: bool, device: str) -> dict:
    result = {"status": "ok", "dtypes": {}}
    for dtype in dtypes(smoke):
        path = check.out / f"train_{dtype}.json"
        args = [sys.executable, "benchmarks/train_throughput.py", "--devices", "1"]
        args += ["--dtype", dtype, "--json", str(path)]
        if smoke:
            args += [
                "--config",
                "tiny_dates",
                "--synthetic",
                "8x8",
                "--steps",
                "2",
                "--warmup",
                "1",
            ]
        else:
            args += ["--config", "multi30k_transformer", "--synthetic", "128x32", "--steps", "30"]
        if device == "gpu":
            args.append("--no_host_devices")
        code, text, _ = check.command(args, 120 if smoke else 75)
        if code != 0 or not path.is_file():
            result["status"] = "failed"
            result["dtypes"][dtype] = {"exit_code": code, "tail": text[-2000:]}
            continue
        (run,) = json.loads(path.read_text())["results"]
        keys = (
            "device_kind",
            "params",
            "batch_shape",
            "steps_per_sec",
            "tokens_per_sec",
            "ms_per_step",
            "flops_per_step",
            "tflops_per_sec",
            "mfu",
            "final_loss",
        )
        result["dtypes"][dtype] = {k: run[k] for k in keys}
    return result


def decode_loop(smoke: bool) -> dict:
    """Compiled decoding: no op that leaves the device, no implicit transfer, no recompilation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import decode_workload, jax_systems
    from decoding import DecodeSettings
    from experiment import decode_programs

    config = decode_workload.QUICK if smoke else decode_workload.CONFIG
    model, params = jax_systems.jax_model(config, "transformer")
    params = decode_programs.decoding_params(model, params)
    counter = jax_systems.CompileCounter()
    out = {"status": "ok"}
    rng = np.random.default_rng(0)
    for name, beam in (("greedy", 1), ("beam4", 4)):
        settings = DecodeSettings(
            decode="greedy" if beam == 1 else "beam", beam_size=beam, max_decode_len=config.gen_len
        )
        fn = decode_programs.decode_fn(model, settings)
        src = jax.device_put(rng.integers(4, config.vocab_size, (8, config.src_len), np.int32))
        alpha = jax.device_put(jnp.float32(0.6))
        text = fn.lower(params, src, alpha).compile().as_text()
        host_ops = sorted({m.group(0).lower() for m in HOST_OPS.finditer(text)})
        jax.block_until_ready(fn(params, src, alpha))
        compiles = counter.compiles
        with jax.transfer_guard("disallow"):
            for _ in range(3):
                other = jax.device_put(
                    rng.integers(4, config.vocab_size, (8, config.src_len), np.int32)
                )
                jax.block_until_ready(fn(params, other, alpha))
        recompiles = counter.compiles - compiles
        out[name] = {"host_ops": host_ops, "recompiles": recompiles, "transfer_guard": "passed"}
        if host_ops or recompiles:
            out["status"] = "failed"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and the log")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any backend")
    args = parser.parse_args(argv)
    check = Check(args.out)
    check.step("environment", environment)
    backend = check.report["steps"]["environment"].get("backend", "cpu")
    device = "gpu" if backend == "gpu" else "cpu"
    if device == "cpu" and not args.smoke:
        check.say("note: no GPU here; the figures below are the CPU's")
    check.report["smoke"] = args.smoke
    check.step("tests", lambda: run_tests(check, args.smoke))
    check.step("decode", lambda: run_decode(check, args.smoke, device))
    check.step("train", lambda: run_train(check, args.smoke, device))
    check.step("decode_loop", lambda: decode_loop(args.smoke))
    check.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    check.write()
    failed = [n for n, s in check.report["steps"].items() if s.get("status") == "failed"]
    check.say(
        f"report: {args.out / 'accelerator_check.json'}" + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
