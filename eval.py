r"""Evaluate a trained run: decode a split, score it, analyse beam-search errors, plot attention.

  python eval.py --workdir runs/default                       # beam 4 on the test split
  python eval.py --workdir runs/default --decode greedy --split validation
  python eval.py --workdir runs/default --sweep               # greedy vs beam 1/2/4/8, +- length norm
  python eval.py --workdir runs/default --error_analysis      # search error or model error?
  python eval.py --workdir runs/default --plot_attention 4    # attention heatmaps (PNG)
  echo "3 May 1979" | python eval.py --workdir runs/default --input -
  python eval.py --workdir runs/default --decode sample --num_samples 5 --top_p 0.9 --output s.txt
  python eval.py --workdir runs/default --input lines.tsv --input_format tsv   # source<TAB>prefix
  python eval.py --workdir runs/default --output_format jsonl    # token log-probs and alignments
  python eval.py --workdir runs/m30k_tf --quantize int8          # int8 weights (transformer runs)

Loads the best checkpoint (else the latest), writes hypotheses line by line as they are decoded, and a
JSON report (default `<workdir>/eval_<split>.json`). Each job is a module of `evaluation/`.
"""

import dataclasses
import json
import sys
from pathlib import Path

from absl import app, flags, logging

import sharding
from data import input_pipeline
from evaluation import attention, decode_report, error_analysis, sweep, translate
from evaluation.loading import Run, Search, notice
from experiment import RunError, metrics, programs
from experiment import config as run_config
from models import registry


@dataclasses.dataclass
class Options:
    """What to evaluate and how; the command-line flags of the same names."""

    split: str = "test"
    decode: str = "beam"
    beam_size: int = 4
    alpha: float = 0.6
    length_penalty: str = "gnmt"
    max_decode_len: int | None = None  # None: the run's config
    max_decode_len_a: float | None = None  # None: the run's config
    max_decode_len_b: int | None = None  # None: the run's config
    no_repeat_ngram_size: int | None = None  # None: off
    nbest: int = 0  # > 0: also write each sentence's n best hypotheses (JSONL beside --output)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1  # > 1: every draw to <output stem>.samples.jsonl
    seed: int = 0
    input_format: str = "text"  # tsv: source<TAB>prefix lines
    output_format: str = "text"  # jsonl: one object per sentence with token log-probs, alignments
    alignment_layer: int = -1
    batch_size: int | None = None  # None: the run's eval_batch_size
    num_examples: int = 0  # 0: all
    report: str | None = None  # None: <workdir>/eval_<split>.json
    output: str | None = None  # None: <workdir>/hypotheses_<split>.txt (stdout with --input)
    sweep: bool = False
    error_analysis: bool = False
    plot_attention: int = 0
    input: str | None = None
    average_checkpoints: int = 0  # > 0: the mean of the last N periodic checkpoints
    quantize: str = "none"  # "int8": int8 weights (models/int8.py; transformer runs)


def define_flags() -> None:
    flags.DEFINE_string("workdir", "runs/default", "Run directory written by train.py.")
    flags.DEFINE_enum("split", "test", ["validation", "test"], "Split to evaluate.")
    flags.DEFINE_enum("decode", "beam", ["greedy", "beam", "sample"], "Search, or sampling.")
    flags.DEFINE_integer("beam_size", 4, "Beam width B.")
    flags.DEFINE_float("alpha", 0.6, "Length-normalization exponent.")
    flags.DEFINE_enum(
        "length_penalty", "gnmt", ["gnmt", "average", "none"], "Length normalization."
    )
    flags.DEFINE_integer("max_decode_len", None, "Generated tokens at most (default: the run's).")
    flags.DEFINE_float(
        "max_decode_len_a",
        None,
        "> 0: each sentence generates at most ceil(a * source tokens) + b tokens, and never more "
        "than --max_decode_len (default: the run's; 0 turns it off).",
    )
    flags.DEFINE_integer(
        "max_decode_len_b", None, "The b of --max_decode_len_a (default: the run's)."
    )
    flags.DEFINE_integer(
        "no_repeat_ngram_size",
        None,
        "n >= 1: no n-gram occurs twice in an output (greedy and beam; off when not given).",
    )
    flags.DEFINE_integer(
        "nbest",
        0,
        "K > 0 (K <= --beam_size): also write each sentence's K best hypotheses with their score, "
        "log-probability and length, one JSON object per sentence, to <output stem>.nbest.jsonl.",
    )
    flags.DEFINE_float("temperature", 1.0, "--decode sample: divides the log-probabilities (> 0).")
    flags.DEFINE_integer("top_k", 0, "--decode sample: draw from the k likeliest tokens (0: all).")
    flags.DEFINE_float(
        "top_p", 1.0, "--decode sample: draw from the nucleus of this probability, in (0, 1]."
    )
    flags.DEFINE_integer(
        "num_samples",
        1,
        "--decode sample: N draws per sentence; the first is the output, all N go to "
        "<output stem>.samples.jsonl.",
    )
    flags.DEFINE_integer(
        "seed", 0, "--decode sample: draw j of sentence i uses fold_in(fold_in(key(seed), j), i)."
    )
    flags.DEFINE_enum(
        "input_format",
        "text",
        ["text", "tsv"],
        "--input lines: text (one source per line) or tsv (source<TAB>target prefix: the output "
        "starts with the prefix).",
    )
    flags.DEFINE_enum(
        "output_format",
        "text",
        ["text", "jsonl"],
        "text: one hypothesis per line; jsonl: one JSON object per sentence with its tokens, their "
        "log-probabilities and, for attention models, each token's most attended source token.",
    )
    flags.DEFINE_integer(
        "alignment_layer",
        -1,
        "--output_format jsonl: the decoder cross-attention layer whose head-averaged weights give "
        "the alignments (Python indexing: -1 is the last layer).",
    )
    flags.DEFINE_integer(
        "batch_size",
        None,
        "Sentences per decode batch (default: the run's), rounded up to a multiple of the devices.",
    )
    flags.DEFINE_integer("num_examples", 0, "Evaluate only the first N examples (0 = all).")
    flags.DEFINE_string("report", None, "JSON report path (default <workdir>/eval_<split>.json).")
    flags.DEFINE_string(
        "output", None, "Hypotheses file (default <workdir>/hypotheses_<split>.txt)."
    )
    flags.DEFINE_bool("sweep", False, "Table of quality and speed for greedy and beam 1, 2, 4, 8.")
    flags.DEFINE_bool("error_analysis", False, "Beam-search error analysis against the references.")
    flags.DEFINE_integer("plot_attention", 0, "Write attention heatmaps for the first N examples.")
    flags.DEFINE_string("input", None, "Translate the lines of this file ('-' = stdin) instead.")
    flags.DEFINE_integer(
        "average_checkpoints",
        0,
        "Evaluate the mean of the last N periodic checkpoints (checkpoint averaging) instead of the "
        "best one.",
    )
    flags.DEFINE_enum(
        "quantize",
        "none",
        ["none", "int8"],
        "int8: decode with int8 weights and int8 products (per-channel weight scales, activations "
        "quantized per row; transformer runs).",
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    options = Options(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(Options)})
    try:
        evaluate(Path(FLAGS.workdir), options)
    except (RunError, ValueError) as e:  # DataError is a ValueError
        sys.exit(f"error: {e}")


def evaluate(workdir: Path, options: Options) -> dict | None:
    """Evaluates the run in `workdir` as `options` say; returns the report (None with --input)."""
    workdir = Path(workdir)
    if options.beam_size < 1:
        raise RunError(f"--beam_size={options.beam_size}: use a beam of 1 or more")
    if options.no_repeat_ngram_size is not None and options.no_repeat_ngram_size < 1:
        raise RunError(
            f"--no_repeat_ngram_size={options.no_repeat_ngram_size}: use n >= 1 (e.g. 3), or leave "
            "it out to allow repeats"
        )
    check_nbest(options)
    check_sampling(options)
    check_formats(options)
    run = Run(workdir, options.average_checkpoints, options.quantize)
    config = run.config
    alignment_layer = None
    if options.output_format == "jsonl":
        if programs.has_attention(run.model, run.params):
            alignment_layer = options.alignment_layer
        else:
            notice(f"{config.model} has no attention over the source: jsonl without alignments")
    # Batches split over the devices: round the size up to a multiple of their number.
    batch_size = sharding.round_up(options.batch_size or config.eval_batch_size, run.mesh)
    search = Search(
        decode=options.decode,
        beam_size=options.beam_size,
        alpha=options.alpha,
        length_penalty=options.length_penalty,
        max_decode_len=options.max_decode_len or config.max_decode_len,
        max_decode_len_a=_given(options.max_decode_len_a, config.max_decode_len_a),
        max_decode_len_b=_given(options.max_decode_len_b, config.max_decode_len_b),
        no_repeat_ngram_size=options.no_repeat_ngram_size or 0,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        num_samples=options.num_samples,
        seed=options.seed,
        alignment_layer=alignment_layer,
    )
    if options.input:
        translate_input(run, options, search, batch_size)
        return None

    eval_data = input_pipeline.get_eval_data(
        config, options.split, run.src_tokenizer, run.tgt_tokenizer, batch_size=batch_size
    )
    eval_data = input_pipeline.head(eval_data, options.num_examples)
    suffix = ".jsonl" if options.output_format == "jsonl" else ".txt"
    output = Path(options.output or workdir / f"hypotheses_{options.split}{suffix}")
    report, sequences, _ = decode_report.evaluate_split(
        run, eval_data, search, output, options.nbest, jsonl=options.output_format == "jsonl"
    )
    checkpoint = run.checkpoint if options.average_checkpoints else f"{run.checkpoint}/{run.step}"
    report = {
        "split": options.split,
        "checkpoint": checkpoint,
        "quantize": options.quantize,
        **report,
    }
    print(
        f"{options.split}: "
        + ", ".join(f"{k} {v:.4g}" for k, v in report.items() if isinstance(v, float))
    )
    print(f"hypotheses: {output}")
    if options.nbest:
        print(f"n-best:     {decode_report.nbest_path(output)}")
    if options.num_samples > 1:
        print(f"samples:    {decode_report.samples_path(output)}")
    if "by_source_length" in report:
        metric = "exact_match" if config.eval_metric == "exact_match" else "bleu"
        print(metrics.format_by_source_length(report["by_source_length"], metric))
    if options.sweep:
        report["sweep"] = sweep.run_sweep(run, eval_data, search, workdir)
    if options.error_analysis:
        report["error_analysis"] = error_analysis.run_error_analysis(
            run, eval_data, sequences, search
        )
    if options.plot_attention:
        paths = attention.plot_attention(
            run, eval_data, sequences, options.plot_attention, workdir / "attention"
        )
        report["attention_plots"] = [str(p) for p in paths]
        if paths:
            print(f"attention plots: {paths[0].parent}")
    report_path = Path(options.report or workdir / f"eval_{options.split}.json")
    report_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"report: {report_path}")
    return report


def check_nbest(options: Options) -> None:
    """One-line errors for an --nbest that cannot be written."""
    if not options.nbest:
        return
    if options.nbest < 0:
        raise RunError(f"--nbest={options.nbest}: use K >= 1 (or 0 for no n-best file)")
    if options.decode != "beam" or options.nbest > options.beam_size:
        raise RunError(
            f"--nbest={options.nbest} needs --decode beam with --beam_size >= {options.nbest} (got "
            f"--decode {options.decode}, --beam_size {options.beam_size}): beam search returns "
            "beam_size hypotheses per sentence"
        )
    if options.input and not options.output:
        raise RunError(
            "--nbest with --input writes the n-best JSONL beside the translations: give --output FILE"
        )


def check_sampling(options: Options) -> None:
    """One-line errors for sampling settings that cannot work."""
    if options.temperature <= 0:
        raise RunError(
            f"--temperature={options.temperature}: use a value > 0 (lower is closer to greedy)"
        )
    if options.top_k < 0:
        raise RunError(f"--top_k={options.top_k}: use k >= 1, or 0 to keep every token")
    if not 0 < options.top_p <= 1:
        raise RunError(f"--top_p={options.top_p}: use a value in (0, 1] (1 keeps every token)")
    if options.num_samples < 1:
        raise RunError(f"--num_samples={options.num_samples}: use N >= 1")
    if options.num_samples > 1 and options.decode != "sample":
        raise RunError(
            f"--num_samples={options.num_samples} needs --decode sample (got --decode "
            f"{options.decode}); for beam search's several hypotheses use --nbest"
        )
    if options.num_samples > 1 and options.input and not options.output:
        raise RunError(
            "--num_samples with --input writes the draws beside the translations: give --output FILE"
        )


def check_formats(options: Options) -> None:
    """One-line errors for input and output formats that do not fit the job."""
    if options.input_format == "tsv" and not options.input:
        raise RunError(
            "--input_format tsv reads source<TAB>prefix lines from --input: give --input FILE (or -)"
        )
    if options.output_format == "jsonl" and (options.sweep or options.error_analysis):
        raise RunError(
            "--output_format jsonl writes the decoded split itself: run --sweep or "
            "--error_analysis without it"
        )


def _given(option, default):
    return default if option is None else option


def translate_input(run: Run, options: Options, search: Search, batch_size: int) -> None:
    """`--input`: the lines of a file (or stdin) translated to `--output` (or stdout), in order."""
    if registry.reads_images(run.model):
        raise RunError(
            f"--input translates text lines, but {run.config.model} reads images: "
            "evaluate a split instead (--split)"
        )
    if options.input == "-":
        stream, name = sys.stdin.buffer, "stdin"
    else:
        try:
            stream, name = open(options.input, "rb"), f"--input {options.input}"
        except OSError as e:
            raise RunError(f"cannot read --input {options.input}: {e.strerror}") from None
    jsonl = options.output_format == "jsonl"
    if options.output:
        Path(options.output).parent.mkdir(parents=True, exist_ok=True)
        out = decode_report.LineWriter(
            options.output, options.nbest, options.num_samples > 1, jsonl
        )
    else:
        out = decode_report.StdoutWriter(jsonl)
    try:
        lines = translate.utf8_lines(stream, name)
        translate.translate_lines(
            run,
            lines,
            search,
            batch_size,
            out,
            options.nbest,
            tsv=options.input_format == "tsv",
            tokens=jsonl,
            name=name,
        )
    finally:
        if options.output:
            out.close()
        if stream is not sys.stdin.buffer:
            stream.close()


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    define_flags()
    app.run(main, flags_parser=run_config.parse_flags)
