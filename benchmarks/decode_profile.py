r"""Where one decode step's time goes: a per-op profile of seqzoo's jitted decode of one cell.

  python benchmarks/decode_profile.py                             # greedy and beam 4 at batch 1
  python benchmarks/decode_profile.py --beam 4 --batch 1 --shape opus-mt-en-de --top 20
  python benchmarks/decode_profile.py --json profile.json
  python benchmarks/decode_profile.py --beam 4 --xla_option xla_cpu_experimental_ynn_fusion_type=

The decoder is `benchmarks/decode.py`'s (same model, weights, sources and `gen_len`, EOS masked so
every decode runs `gen_len` steps). After `--runs` timed decodes (their median is the reference
figure), one more runs under `jax.profiler.trace`; the trace is read back with
`jax.profiler.ProfileData` (no TensorBoard needed) and every executed HLO instruction (XLA:CPU runs
each op or fusion as one "thunk") is matched to the compiled program, whose metadata names the model
code that produced it (`.../decoder_layers_2/.../ffn/inner/dot_general`). Reported per decode step
(the loop body's ops summed over the trace and divided by `gen_len`), in milliseconds:

- by part: each op's model path with layer numbers folded (`decoder_layers_*/.../ffn`), so the
  rows are what one kind of sublayer costs in all layers together;
- the `--top` single ops of the loop (ms per step), then the largest outside it (ms per decode),
  with their output shapes.

XLA keeps the metadata of most ops; those it rewrote without it (on CPU, e.g. the `dot`s of
single-row matmuls) are grouped by op kind, `(no metadata) dot`: their shapes in the top list tell
which matmul each is (`f32[1,8000]` is the output projection).

An op that runs `gen_len` times or more is the loop's; ops outside the loop (encoder, cache set-up) are reported per decode. The profiler adds a little
time to each op, and independent ops may run at the same time on the two threads, so the ops' sum is
close to, not exactly, the step time measured without the profiler (both are printed).
"""

import argparse
import collections
import dataclasses
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python benchmarks/decode_profile.py)
    sys.path.insert(0, str(REPO))
from benchmarks import decode_workload, jax_systems  # noqa: E402

# Thunks that contain other thunks (their time is their body's) or mark an op's end.
CONTAINERS = ("while", "conditional", "call")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+) ")
OP_NAME = re.compile(r'op_name="([^"]*)"')


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (output shape, the op_name of its metadata), from compiled HLO text."""
    found = {}
    for line in hlo_text.splitlines():
        match = INSTRUCTION.match(line)
        if match:
            op_name = OP_NAME.search(line)
            found[match[1]] = (match[2], op_name[1] if op_name else "")
    return found


def part(op_name: str) -> str:
    """The model path of an op, with the decode function's jit, the loop, `.residual` wrappers and
    layer numbers left out, the primitive kept only where no module is named:
    `jit(run)/while/body/Transformer.decode_step/decoder_layers_2/decoder_layers_2.residual/ffn/
    inner/dot_general` -> `decode_step/decoder_layers_*/ffn/inner`; `jit(run)/while/body/top_k` ->
    `top_k`; `jit(run)/while/body/jit(log_softmax)/exp` -> `log_softmax`."""
    *path, primitive = op_name.split("/")[1:] or [""]
    path = [p for p in path if p not in ("while", "body", "cond") and not p.endswith(".residual")]
    path = [re.sub(r"^jit\((.*)\)$", r"\1", re.sub(r"^[A-Z]\w*\.", "", p)) for p in path]
    return re.sub(r"_\d+(?=/|$)", "_*", "/".join(path)) or primitive


def thunk_times(trace_dir: str) -> dict[str, list[float]]:
    """Executed op name -> its durations in microseconds, from the trace in `trace_dir`."""
    import jax

    (path,) = Path(trace_dir).rglob("*.xplane.pb")
    times = collections.defaultdict(list)
    for plane in jax.profiler.ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            for event in line.events:
                times[event.name].append(event.duration_ns / 1e3)
    return times


def profile_cell(
    config, model, params, beam: int, batch: int, runs: int, top: int, options: dict
) -> dict:
    """Times `runs` decodes of one cell, profiles one more and splits its ops by model part;
    `options`: XLA compile options of the decoding program (`--xla_option`)."""
    import jax

    src = decode_workload.sources(dataclasses.replace(config, batch_sizes=(batch,)))
    run = jax_systems.seqzoo_decoder(
        model, beam, config.gen_len, decode_workload.special_ids(config)
    )
    compiled = run.lower(params, src).compile(compiler_options=options)
    ops = instructions(compiled.as_text())
    for _ in range(2):
        jax.block_until_ready(compiled(params, src))
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, src))
        seconds.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, src))
            profiled = time.perf_counter() - start
        times = thunk_times(trace_dir)

    steps = config.gen_len
    by_part = collections.defaultdict(lambda: [0.0, 0.0])  # [in the loop, outside], us per decode
    single = []
    for name, durations in times.items():
        if name not in ops or name.split(".")[0] in CONTAINERS:
            continue
        shape, op_name = ops[name]
        in_loop = len(durations) >= steps  # the loop body's ops run once per step
        key = part(op_name) if op_name else "(no metadata) " + name.split(".")[0]
        by_part[key][0 if in_loop else 1] += sum(durations)
        single.append((sum(durations) / (steps if in_loop else 1), name, shape, op_name, in_loop))
    step_ms = {k: round(v[0] / steps / 1e3, 4) for k, v in by_part.items() if v[0]}
    outside_ms = {k: round(v[1] / 1e3, 4) for k, v in by_part.items() if v[1]}
    single.sort(reverse=True)
    loop_ops = [op for op in single if op[-1]]
    chosen = loop_ops[:top] + [op for op in single if not op[-1]][: max(3, top // 3)]
    return {
        "cell": decode_workload.cell_name(beam, batch),
        "ms_per_decode_median": 1e3 * statistics.median(seconds),
        "ms_per_step_median": 1e3 * statistics.median(seconds) / steps,
        "ms_per_decode_profiled": 1e3 * profiled,
        "ops_ms_per_step": round(sum(step_ms.values()), 4),
        "ops_ms_outside_loop": round(sum(outside_ms.values()), 4),
        "step_ms_by_part": dict(sorted(step_ms.items(), key=lambda kv: -kv[1])),
        "outside_loop_ms_by_part": dict(sorted(outside_ms.items(), key=lambda kv: -kv[1])),
        "top_ops": [
            {
                "op": n,
                "shape": s,
                "ms": round(us / 1e3, 4),
                "per": "step" if loop else "decode",
                "source": o,
            }
            for us, n, s, o, loop in chosen
        ],
        "loop_ops_per_step": len(loop_ops),
    }


def print_cell(result: dict) -> None:
    print(
        f"\n## {result['cell']}: {result['ms_per_step_median']:.3f} ms/step measured "
        f"(median decode {result['ms_per_decode_median']:.1f} ms), ops in the loop "
        f"{result['ops_ms_per_step']:.3f} ms/step ({result['loop_ops_per_step']} ops per step), "
        f"outside it {result['ops_ms_outside_loop']:.2f} ms per decode\n"
    )
    print("| part (all layers) | ms/step | share |\n|---|---|---|")
    total = result["ops_ms_per_step"] or 1.0
    for name, ms in result["step_ms_by_part"].items():
        if ms >= 0.005:
            print(f"| {name} | {ms:.3f} | {100 * ms / total:.0f}% |")
    print("\n| op | shape | ms | per | source |\n|---|---|---|---|---|")
    for op in result["top_ops"]:
        source = op["source"].split("/", 1)[-1].removeprefix("while/body/")
        print(f"| {op['op']} | {op['shape']} | {op['ms']:.3f} | {op['per']} | {source} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="seqzoo", choices=sorted(decode_workload.SHAPES))
    parser.add_argument("--beam", type=int, action="append", help="beam sizes (default 1 and 4)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7, help="timed decodes before the profiled one")
    parser.add_argument("--top", type=int, default=12, help="single ops listed")
    parser.add_argument("--quick", action="store_true", help="decode.py's tiny sizes (a smoke run)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--xla_option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an XLA compile option for the decoding program (e.g. "
        "xla_cpu_experimental_ynn_fusion_type=), repeatable",
    )
    args = parser.parse_args(argv)
    try:
        options = decode_workload.xla_options(args.xla_option)
        config = decode_workload.shaped_config(args.shape, args.quick)
    except ValueError as e:
        parser.error(str(e))
    import jax

    model, params = jax_systems.jax_model(config, "transformer")
    params = jax_systems.decoding_params(config, model, params)
    results = [
        profile_cell(config, model, params, beam, args.batch, args.runs, args.top, options)
        for beam in (args.beam or [1, 4])
    ]
    print(
        f"seqzoo decode profile, shape {args.shape}: {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}, gen_len {config.gen_len}, src_len {config.src_len}"
    )
    for result in results:
        print_cell(result)
    if args.json:
        report = {
            "shape": args.shape,
            "config": dataclasses.asdict(config),
            "xla_options": options,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
