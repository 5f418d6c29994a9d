r"""Jit decoding benchmark: seqzoo's greedy and beam search against a plain Python-loop beam search,
HuggingFace transformers `generate` and CTranslate2 `translate_batch`, on one model and one machine.

  python benchmarks/decode.py                      # the full benchmark (a few minutes on 2 cores)
  python benchmarks/decode.py --json decode.json   # also write every figure as JSON
  python benchmarks/decode.py --quick              # tiny sizes, seconds: a smoke test, not a result
  python benchmarks/decode.py --shape opus-mt-en-de --systems seqzoo,transformers,ctranslate2
  python benchmarks/decode.py --quantize int8 --systems seqzoo,transformers,ctranslate2
  python benchmarks/decode.py --device gpu --dtype bfloat16 --batch_sizes 1,32,256 \
      --systems seqzoo,transformers                # on a GPU (torch on CUDA)

The baselines come from `benchmarks/requirements.txt`; install it beside `requirements.txt` (in its own
virtualenv) and run this script with that interpreter. A baseline whose packages are missing is
skipped with a note, never estimated.

What is compared (`CONFIG`, printed with the results): an encoder-decoder Transformer (post-LN, ReLU,
sinusoidal positions, shared vocabulary, tied output projection) with random weights from a fixed seed,
float32; sources of `src_len` tokens without padding; every system generates exactly `gen_len` tokens
(EOS is masked out at every step, as transformers' `min_new_tokens` and CTranslate2's
`min_decoding_length` do, and pad/BOS as in seqzoo), so all do the same work. The baselines run the
very same weights: the Marian model for transformers is loaded with seqzoo's parameters (and its
positional table; the BOS embedding row is zero because CTranslate2's Marian starts decoding from a
zero embedding), and CTranslate2 converts that Marian model with its own converter. Each output is
compared token by token with seqzoo's, which shows that the systems computed the same thing.
The weights cross between frameworks through `interop/marian.py`, the mapping `convert.py` imports and
exports opus-mt models with (seqzoo's interleaved positions exported by permuting the model dimension).

`--shape opus-mt-en-de`: Helsinki-NLP/opus-mt-en-de's architecture instead (6+6 layers, d_model 512, 8
heads, FFN 2048, vocabulary 58,101, swish, Marian's positions, final_logits_bias, pad 58100 / EOS 0,
decoding from pad): random weights drawn as a Marian state dict and read through the importer.

Cells: greedy and beam 4, at batch 1 and 32. For each: steady-state generated tokens/s and ms per
batch (median, min and max of `runs` timed runs after `warmup` untimed ones), compile time, the
number of compilations during the timed runs (must be 0), the process's peak resident memory. Every
system runs in its own subprocess, one after the other (thread pools of two runtimes on the same
cores slow each other down), with 2 threads: XLA uses the cores it has, `torch.set_num_threads`,
CTranslate2 `intra_threads` (and `inter_threads=1`).

Systems:
- seqzoo: `decoding.greedy` / `decoding.beam_search` in one jitted `lax.while_loop` around the
  model's `decode_step`, as `decode_programs.decode_fn` (and so train.py and eval.py) runs them.
- python_loop: the course's beam search written plainly, one sentence at a time: a Python loop over
  steps and over the hypotheses of the beam, each a call of the same jitted `decode_step` on one row,
  numpy for the log-softmax and the top-k, `sorted` for the beam (greedy is its beam of 1).
- transformers: `MarianMTModel.generate` (PyTorch, CPU, `torch.inference_mode`).
- ctranslate2: `Translator.translate_batch` on the converted Marian model.
The attention RNN (Bahdanau, GRU) of about the same parameter count runs as seqzoo and python_loop.

Layout: this file is the harness (one subprocess per system, rounds, the table); the JAX systems
(seqzoo, python_loop) are `benchmarks/jax_systems.py`, the transformers and CTranslate2 runners
`benchmarks/baselines.py`; the sizes, sources and cell timing all systems share are
`benchmarks/decode_workload.py`.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python benchmarks/decode.py)
    sys.path.insert(0, str(REPO))
from benchmarks.baselines import run_ctranslate2, run_transformers  # noqa: E402
from benchmarks.decode_workload import (  # noqa: E402
    SHAPES,
    Config,
    cell_name,
    log,
    peak_rss_mb,
    shaped_config,
)
from benchmarks.jax_systems import run_python_loop, run_seqzoo  # noqa: E402

# system -> (model family, what the subprocess needs to import, how it is described in the table)
SYSTEMS = {
    "seqzoo": ("transformer", (), "seqzoo (jit while_loop)"),
    "python_loop": ("transformer", (), "Python-loop beam search"),
    "transformers": ("transformer", ("torch", "transformers"), "HF transformers generate"),
    "ctranslate2": ("transformer", ("ctranslate2", "torch", "transformers"), "CTranslate2"),
    "seqzoo_rnn": ("attention_rnn", (), "seqzoo attention RNN"),
    "python_loop_rnn": ("attention_rnn", (), "Python-loop attention RNN"),
}
# Ratios in the table: ours / each baseline, per model family.
OURS = {"transformer": "seqzoo", "attention_rnn": "seqzoo_rnn"}


RUNNERS = {
    "seqzoo": run_seqzoo,
    "python_loop": run_python_loop,
    "transformers": run_transformers,
    "ctranslate2": run_ctranslate2,
    "seqzoo_rnn": run_seqzoo,
    "python_loop_rnn": run_python_loop,
}


def child_main(system: str, workdir: Path) -> None:
    """Runs one system in this process and writes `workdir/<system>.json`."""
    config = Config(
        **{
            k: tuple(v) if isinstance(v, list) else v
            for k, v in json.loads((workdir / "config.json").read_text()).items()
        }
    )
    family = SYSTEMS[system][0]
    if config.device == "gpu" and not system.startswith(("transformers", "ctranslate2")):
        import jax

        if jax.default_backend() != "gpu":
            raise RuntimeError(f"--device gpu, but JAX runs on {jax.default_backend()}")
        jax.config.update("jax_default_matmul_precision", "highest")  # float32, not TF32
    result = RUNNERS[system](config, family, workdir)
    result["peak_rss_mb"] = peak_rss_mb()
    (workdir / f"{system}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ parent


def missing_packages(system: str) -> list[str]:
    """The packages `system` needs that this interpreter cannot import (checked without importing)."""
    import importlib.util

    return [name for name in SYSTEMS[system][1] if importlib.util.find_spec(name) is None]


def run_child(system: str, workdir: Path, threads: int, device: str = "cpu") -> dict:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    # Pin the BLAS/OpenMP pools of the baselines to the same thread count as XLA's 2 cores.
    env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"  # on a GPU machine too: the CPU benchmark stays on the CPU
    else:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # the torch child shares the GPU after it
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        system,
        "--workdir",
        str(workdir),
    ]
    completed = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{system} failed (exit {completed.returncode}); see its log above")
    return json.loads((workdir / f"{system}.json").read_text())


def best_round(results: list[dict]) -> dict:
    """Per cell, the round with the lowest median time (another process on the cores can only slow
    a run down); every round's medians are kept under `rounds_ms_median`."""
    best = dict(results[0], cells=[])
    for cells in zip(*(r["cells"] for r in results), strict=True):
        chosen = dict(min(cells, key=lambda cell: cell["ms_median"]))
        chosen["rounds_ms_median"] = [cell["ms_median"] for cell in cells]
        best["cells"].append(chosen)
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    best["load_average_before"] = [r["load_average_before"] for r in results]
    return best


def round_ratio(ours: dict, theirs: dict) -> float:
    """The median over rounds of one cell's speed ratio, ours / theirs, each round against the
    other system's same round (the systems take turns within a round, so both met about the same
    machine): on a VM whose speed drifts between rounds, steadier than best against best."""
    times = zip(ours["rounds_ms_median"], theirs["rounds_ms_median"], strict=True)
    return statistics.median(their_ms / our_ms for our_ms, their_ms in times)


def agreement(ours: dict, theirs: dict) -> float:
    """Fraction of generated tokens equal to seqzoo's, position by position."""
    a, b = np.asarray(ours["tokens"]), np.asarray(theirs["tokens"])
    return float(np.mean(a == b))


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_before": list(os.getloadavg()),
    }


def table(report: dict) -> str:
    """Markdown table: tokens/s (ms per batch, median [min-max]) per system and cell, and ratios."""
    config = report["config"]
    cells = [
        cell_name(beam, batch) for beam in config["beam_sizes"] for batch in config["batch_sizes"]
    ]
    lines = [
        "| system | " + " | ".join(cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    results = report["results"]
    for system, result in results.items():
        row = [SYSTEMS[system][2]]
        for cell in result["cells"]:
            row.append(
                f"{cell['tokens_per_s']:,.0f} tok/s ({cell['ms_median']:.1f} ms "
                f"[{cell['ms_min']:.1f}-{cell['ms_max']:.1f}])"
            )
        lines.append("| " + " | ".join(row) + " |")
    for system, result in results.items():
        ours = OURS[SYSTEMS[system][0]]
        if system == ours or ours not in results:
            continue
        pairs = list(zip(results[ours]["cells"], result["cells"], strict=True))
        row = [f"ratio {SYSTEMS[ours][2]} / {SYSTEMS[system][2]}"]
        row += [f"{mine['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" for mine, theirs in pairs]
        lines.append("| " + " | ".join(row) + " |")
        if len(pairs[0][0].get("rounds_ms_median", [])) > 1:
            row = [f"ratio {SYSTEMS[ours][2]} / {SYSTEMS[system][2]}, median of the rounds'"]
            row += [f"{round_ratio(mine, theirs):.2f}x" for mine, theirs in pairs]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        "| system | cell | compile s | recompiles in timed runs | peak RSS MiB | same tokens as seqzoo |"
    )
    lines.append("|---|---|---|---|---|---|")
    for system, result in results.items():
        ours = results.get(OURS[SYSTEMS[system][0]])
        for i, cell in enumerate(result["cells"]):
            compile_s = cell.get("compile_s")
            same = agreement(ours["cells"][i], cell) if ours and ours is not result else None
            lines.append(
                f"| {SYSTEMS[system][2]} | {cell['cell']} | "
                f"{'-' if compile_s is None else f'{compile_s:.2f}'} | {cell.get('recompiles', '-')} | "
                f"{cell['peak_rss_mb']:.0f} | {'-' if same is None else f'{100 * same:.1f}%'} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the full report (figures, tokens) here")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke test, not a result"
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {', '.join(SYSTEMS)}",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every system this many times, one after the other, and keep each cell's best "
        "round (on a shared machine; every round's medians go to the JSON); the table adds the "
        "median of the per-round ratios",
    )
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where all run")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="computation dtype"
    )
    parser.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: every system decodes with int8 weights (the Transformer systems only)",
    )
    parser.add_argument("--batch_sizes", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument(
        "--shape", choices=list(SHAPES), default="seqzoo", help="the Transformer's architecture"
    )
    parser.add_argument("--child", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.workdir)
        return 0
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds} must be at least 1")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}: use some of {', '.join(SYSTEMS)}")
    if args.quantize != "none" and (args.dtype != "float32" or args.device != "cpu"):
        parser.error("--quantize int8 runs on the CPU in float32 otherwise: drop --dtype/--device")
    if "ctranslate2" in systems and "transformers" not in systems:
        parser.error("ctranslate2 converts the transformers model: add transformers to --systems")
    if "ctranslate2" in systems and args.dtype == "bfloat16" and args.device == "cpu":
        parser.error("ctranslate2 computes in bfloat16 on GPUs only: use --device gpu or float32")
    if "seqzoo" not in systems and {"transformers", "ctranslate2"} & set(systems):
        parser.error("the baselines load seqzoo's weights: add seqzoo to --systems")
    try:
        config = shaped_config(
            args.shape, args.quick, device=args.device, dtype=args.dtype, quantize=args.quantize
        )
    except ValueError as e:
        parser.error(str(e))
    if args.quantize != "none" or args.shape != "seqzoo":  # no int8 RNN, no RNN of that size
        systems = [s for s in systems if SYSTEMS[s][0] == "transformer"]
    if args.batch_sizes:
        try:
            sizes = tuple(int(n) for n in args.batch_sizes.split(","))
        except ValueError:
            parser.error(f"--batch_sizes {args.batch_sizes!r}: give integers like 1,32,256")
        config = dataclasses.replace(config, batch_sizes=sizes)
    report = {
        "rounds": args.rounds,
        "config": dataclasses.asdict(config),
        "machine": machine(),
        "results": {},
        "skipped": {},
        "versions": {},
    }
    log(f"config: {json.dumps(report['config'])}")
    with tempfile.TemporaryDirectory(prefix="seqzoo-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "config.json").write_text(json.dumps(report["config"]))
        available = []
        for system in systems:
            missing = missing_packages(system)
            if system == "ctranslate2" and "transformers" in report["skipped"]:
                missing = missing or ["transformers"]
            if missing:
                note = (
                    f"skipped: {', '.join(missing)} not installed "
                    "(pip install -r benchmarks/requirements.txt)"
                )
                report["skipped"][system] = note
                log(f"{system}: {note}")
            else:
                available.append(system)
        rounds = {system: [] for system in available}
        for round_index in range(args.rounds):
            for system in available:
                log(f"--- {system} (round {round_index + 1} of {args.rounds})")
                load = os.getloadavg()[0]
                result = run_child(system, workdir, config.threads, config.device)
                result["load_average_before"] = load
                report["versions"] |= result.pop("versions")
                rounds[system].append(result)
        for system, results in rounds.items():
            report["results"][system] = best_round(results)
    report["machine"]["load_average_after"] = list(os.getloadavg())
    text = table(report)
    print(f"Config: {json.dumps(report['config'])}")
    print(
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; load average "
        f"before {report['machine']['load_average_before'][0]:.2f}, after "
        f"{report['machine']['load_average_after'][0]:.2f}; best of {args.rounds} round(s) per cell"
        + ("" if args.rounds == 1 else " (and the median of the per-round ratios)")
    )
    print(f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}")
    print()
    print(text)
    for system, note in report["skipped"].items():
        print(f"\n{system}: {note}")
    bucketing = report["results"].get("seqzoo", {}).get("cells", [{}])[-1].get("bucketing")
    if bucketing:
        print(
            f"\nBucketing: {bucketing['batches']} batches of source lengths "
            f"{bucketing['source_lengths'][0]}-{bucketing['source_lengths'][1]} padded to "
            f"{bucketing['bucket']}: {bucketing['recompiles']} recompilations"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
