r"""Two ways of decoding one cell, called in turn in one process: what one change buys.

  python benchmarks/decode_pair.py --beam 1 --a raw --b pages        # the weights on 2 MB pages
  python benchmarks/decode_pair.py --beam 4 --a pages --b decoding   # + packed kernels
  python benchmarks/decode_pair.py --beam 4 \
      --b_option xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT   # an XLA option

On a shared VM whose speed drifts by more than a change is worth, runs of two trees in separate
processes cannot resolve a few percent; two programs compiled in one process and called
alternately (`--pairs` times, the first of each pair alternating too) share the drift. The decoder
is `benchmarks/decode.py`'s (same model, weights, sources, `gen_len`, EOS masked). Each side picks
its params, `--a` / `--b`:

- `raw`: the model's params as initialized (XLA's products on the kernels as they lie; the tied
  output projection reads the table as it lies);
- `pages`: those, every array on 2 MB pages (`host_memory.on_huge_pages`);
- `decoding`: `decode_programs.decoding_params` (every dense kernel and the tied table packed in
  column panels, `models.packed`, one copy of each weight, on 2 MB pages), what eval.py and
  `decode.py` decode with;

and its XLA compile options (`--a_option` / `--b_option NAME=VALUE`, repeatable). Prints each side's
median ms per decode, the median of the per-pair ratios A time / B time (above 1: B is faster) with
their quartiles, and the fraction of tokens both return alike.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python benchmarks/decode_pair.py)
    sys.path.insert(0, str(REPO))
from benchmarks import decode_workload, jax_systems  # noqa: E402

PARAMS = ("raw", "pages", "decoding")


def side_params(kind: str, model, params):
    from experiment import decode_programs, host_memory

    if kind == "decoding":
        return decode_programs.decoding_params(model, params)
    return host_memory.on_huge_pages(params) if kind == "pages" else params


def compare(config, beam: int, batch: int, pairs: int, sides: dict) -> dict:
    """`sides`: name -> (params kind, XLA options). Medians, per-pair ratio and tokens alike."""
    import jax
    import numpy as np

    model, params = jax_systems.jax_model(config, "transformer")
    src = jax.device_put(decode_workload.sources(config)[:batch])
    run = jax_systems.seqzoo_decoder(
        model, beam, config.gen_len, decode_workload.special_ids(config)
    )
    programs = {}
    for name, (kind, options) in sides.items():
        side = side_params(kind, model, params)
        programs[name] = (run.lower(side, src).compile(compiler_options=options), side)
    tokens = {name: np.asarray(fn(side, src)) for name, (fn, side) in programs.items()}
    seconds = {name: [] for name in programs}
    for i in range(pairs):
        for name in ("a", "b") if i % 2 == 0 else ("b", "a"):
            fn, side = programs[name]
            start = time.perf_counter()
            jax.block_until_ready(fn(side, src))
            seconds[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(seconds["a"], seconds["b"])]
    return {
        "cell": decode_workload.cell_name(beam, batch),
        "ms": {name: 1e3 * statistics.median(s) for name, s in seconds.items()},
        "a_over_b": statistics.median(ratios),
        "a_over_b_quartiles": statistics.quantiles(ratios, n=4)[::2] if pairs > 1 else ratios * 2,
        "same_tokens": float(np.mean(tokens["a"] == tokens["b"])),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="seqzoo", choices=sorted(decode_workload.SHAPES))
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=30)
    for side, default in (("a", "decoding"), ("b", "decoding")):
        parser.add_argument(f"--{side}", default=default, choices=PARAMS, help="params")
        parser.add_argument(f"--{side}_option", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--quick", action="store_true", help="decode.py's tiny sizes (a smoke run)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    try:
        sides = {
            s: (getattr(args, s), decode_workload.xla_options(getattr(args, f"{s}_option")))
            for s in ("a", "b")
        }
        config = decode_workload.shaped_config(args.shape, args.quick)
    except ValueError as e:
        parser.error(str(e))
    if sides["a"] == sides["b"]:
        parser.error("--a and --b decode the same way: change the params or an option of one")
    result = compare(config, args.beam, args.batch, args.pairs, sides)
    result.update(shape=args.shape, sides={s: [k, o] for s, (k, o) in sides.items()})
    ms, (low, high) = result["ms"], result["a_over_b_quartiles"]
    label = {s: " ".join([k, *(f"{n}={v}" for n, v in o.items())]) for s, (k, o) in sides.items()}
    print(
        f"{args.shape} {result['cell']}: A ({label['a']}) {ms['a']:.2f} ms, B ({label['b']}) "
        f"{ms['b']:.2f} ms; A/B {result['a_over_b']:.3f} (median of {args.pairs} pairs; "
        f"quartiles {low:.3f}-{high:.3f}), "
        f"same tokens {result['same_tokens']:.1%}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
