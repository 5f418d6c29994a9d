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
import typing
from pathlib import Path

from absl import app, flags, logging

import sharding
from data import input_pipeline
from decoding import DecodeSettings
from decoding.settings import setting
from evaluation import attention, decode_report, error_analysis, sweep, translate, translator
from evaluation.loading import Run, notice
from experiment import RunError, decode_programs, metrics
from experiment import config as run_config
from interop import marian_generation

# The defaults the decoding flags' help states where they are not the `DecodeSettings` field's:
# a run's `config.decoding` fields named by its `config.eval_decoding` are its own (a trained run's
# length limits; an imported model's generation settings, `interop.marian_generation`).
DEFAULTS_IN_HELP = {
    **{
        name: f"{DecodeSettings.__dataclass_fields__[name].default}, or an imported model's own"
        for name in marian_generation.FIELDS
    },
    **dict.fromkeys(("max_decode_len", "max_decode_len_a", "max_decode_len_b"), "the run's"),
    "alignment_layer": "-1 with --output_format jsonl",
}


@dataclasses.dataclass
class Options:
    """What to evaluate: each field but `decoding` is the command-line flag of its name and help."""

    split: str = setting("test", "Split to evaluate.", ("validation", "test"))
    nbest: int = setting(
        0,
        "K > 0 (K <= --beam_size): also write each sentence's K best hypotheses with their score, "
        "log-probability and length, one JSON object per sentence, to <output stem>.nbest.jsonl.",
    )
    input_format: str = setting(
        "text",
        "--input lines: text (one source per line) or tsv (source<TAB>target prefix: the output "
        "starts with the prefix).",
        ("text", "tsv"),
    )
    output_format: str = setting(
        "text",
        "text: one hypothesis per line; jsonl: one JSON object per sentence with its tokens, their "
        "log-probabilities and, for attention models, each token's most attended source token.",
        ("text", "jsonl"),
    )
    batch_size: int | None = setting(
        None,
        "Sentences per decode batch (default: the run's), rounded up to a multiple of the devices.",
    )
    num_examples: int = setting(0, "Evaluate only the first N examples (0 = all).")
    report: str | None = setting(None, "JSON report path (default <workdir>/eval_<split>.json).")
    output: str | None = setting(
        None,
        "Hypotheses file (default <workdir>/hypotheses_<split>.txt, .jsonl with --output_format "
        "jsonl; stdout with --input). The n-best and the draws go beside it.",
    )
    sweep: bool = setting(False, "Table of quality and speed for greedy and beam 1, 2, 4, 8.")
    error_analysis: bool = setting(False, "Beam-search error analysis against the references.")
    plot_attention: int = setting(0, "Write attention heatmaps for the first N examples.")
    input: str | None = setting(None, "Translate the lines of this file ('-' = stdin) instead.")
    average_checkpoints: int = setting(
        0,
        "Evaluate the mean of the last N periodic checkpoints (checkpoint averaging) instead of the "
        "best one.",
    )
    quantize: str = setting(
        "none",
        "int8: decode with int8 weights and int8 products (per-channel weight scales, activations "
        "quantized per row; transformer runs).",
        ("none", "int8"),
    )
    # The `DecodeSettings` fields set by flags (`--beam_size 8` -> {"beam_size": 8}).
    decoding: dict = dataclasses.field(default_factory=dict)


def define_flags() -> None:
    """`--workdir`, a flag per field of `Options` (with its default) and of `DecodeSettings` (with
    default None, not given: `decode_settings` fills in the run's or the field's default)."""
    flags.DEFINE_string("workdir", "runs/default", "Run directory written by train.py.")
    for field in dataclasses.fields(Options):
        if field.metadata:
            define_flag(Options, field, field.default, field.metadata["help"])
    for field in dataclasses.fields(DecodeSettings):
        default = DEFAULTS_IN_HELP.get(
            field.name, "unset" if field.default is None else field.default
        )
        define_flag(DecodeSettings, field, None, f"{field.metadata['help']} (default: {default})")


def define_flag(cls, field: dataclasses.Field, default, help: str) -> None:
    """The absl flag of dataclass `cls`'s `field`: an enum of its choices, or of its type."""
    kind = typing.get_type_hints(cls)[field.name]
    kind = next((k for k in typing.get_args(kind) if k is not type(None)), kind)  # X | None -> X
    if field.metadata["choices"]:
        flags.DEFINE_enum(field.name, default, list(field.metadata["choices"]), help)
        return
    define = {
        bool: flags.DEFINE_bool,
        int: flags.DEFINE_integer,
        float: flags.DEFINE_float,
        str: flags.DEFINE_string,
    }
    define[kind](field.name, default, help)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    given = {f.name: FLAGS[f.name].value for f in dataclasses.fields(DecodeSettings)}
    options = Options(
        **{f.name: FLAGS[f.name].value for f in dataclasses.fields(Options) if f.metadata},
        decoding={name: value for name, value in given.items() if value is not None},
    )
    try:
        evaluate(Path(FLAGS.workdir), options)
    except (RunError, ValueError) as e:  # DataError is a ValueError
        sys.exit(f"error: {e}")


def decode_settings(config, options: Options) -> DecodeSettings:
    """What eval.py decodes with: `options.decoding` over the run's own settings and
    `DecodeSettings`' defaults (`translator.settings_for`, as `Translator` decodes); a one-line
    `RunError` naming the flag of a bad value."""
    return translator.settings_for(config, options.decoding, "--")


def evaluate(workdir: Path, options: Options) -> dict | None:
    """Evaluates the run in `workdir` as `options` say; returns the report (None with --input)."""
    workdir = Path(workdir)
    settings = decode_settings(run_config.load_config(workdir), options)
    check_nbest(options, settings)
    check_sampling(options, settings)
    check_formats(options)
    run = Run(workdir, options.average_checkpoints, options.quantize)
    config = run.config
    alignment_layer = None
    if options.output_format == "jsonl":
        if decode_programs.has_attention(run.model, run.params):
            alignment_layer = -1 if settings.alignment_layer is None else settings.alignment_layer
        else:
            notice(f"{config.model} has no attention over the source: jsonl without alignments")
    settings = dataclasses.replace(settings, alignment_layer=alignment_layer)
    # Batches split over the devices: round the size up to a multiple of their number.
    batch_size = sharding.round_up(options.batch_size or config.eval_batch_size, run.mesh)
    if options.input:
        translate_input(run, options, settings)
        return None
    if not config.dataset:
        raise RunError(
            f"{workdir} names no dataset to evaluate (a model imported without --dataset): "
            f"translate lines with `python eval.py --workdir {workdir} --input FILE` (- for stdin), "
            "or import it again with `convert.py import MODEL_DIR NEW_RUN --dataset multi30k/en-de "
            "--manual_dir DIR` to score a split"
        )

    eval_data = input_pipeline.get_eval_data(
        config, options.split, run.src_tokenizer, run.tgt_tokenizer, batch_size=batch_size
    )
    eval_data = input_pipeline.head(eval_data, options.num_examples)
    suffix = ".jsonl" if options.output_format == "jsonl" else ".txt"
    output = Path(options.output or workdir / f"hypotheses_{options.split}{suffix}")
    report, sequences, _ = decode_report.evaluate_split(
        run, eval_data, settings, output, options.nbest, jsonl=options.output_format == "jsonl"
    )
    checkpoint = run.checkpoint if options.average_checkpoints else f"{run.checkpoint}/{run.step}"
    report = {
        "split": options.split,
        "checkpoint": checkpoint,
        "quantize": options.quantize,
        **report,
    }
    print(f"{options.split}: {metrics.summary(report, config.eval_metric)}")
    print(f"hypotheses: {output}")
    if options.nbest:
        print(f"n-best:     {decode_report.nbest_path(output)}")
    if settings.num_samples > 1:
        print(f"samples:    {decode_report.samples_path(output)}")
    if "by_source_length" in report:
        print(metrics.format_by_source_length(report["by_source_length"], config.eval_metric))
    if options.sweep:
        report["sweep"] = sweep.run_sweep(run, eval_data, settings, workdir)
    if options.error_analysis:
        report["error_analysis"] = error_analysis.run_error_analysis(
            run, eval_data, sequences, settings
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


def check_nbest(options: Options, settings: DecodeSettings) -> None:
    """One-line errors for an --nbest that cannot be written."""
    translator.check_nbest(options.nbest, settings, "--")
    if options.nbest and options.input and not options.output:
        raise RunError(
            "--nbest with --input writes the n-best JSONL beside the translations: give --output FILE"
        )


def check_sampling(options: Options, settings: DecodeSettings) -> None:
    """One-line errors for several draws that cannot be made or written."""
    if settings.num_samples > 1 and settings.decode != "sample":
        raise RunError(
            f"--num_samples={settings.num_samples} needs --decode sample (got --decode "
            f"{settings.decode}); for beam search's several hypotheses use --nbest"
        )
    if settings.num_samples > 1 and options.input and not options.output:
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


def translate_input(run: Run, options: Options, settings: DecodeSettings) -> None:
    """`--input`: the lines of a file (or stdin) translated to `--output` (or stdout), in order, by
    a `translator.Translator` of the run (the Python API's path)."""
    translating = translator.Translator(run, options.batch_size)
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
            options.output, options.nbest, settings.num_samples > 1, jsonl
        )
    else:
        out = decode_report.StdoutWriter(jsonl)
    try:
        lines = translate.utf8_lines(stream, name)
        translating.stream(
            lines,
            out,
            settings,
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
