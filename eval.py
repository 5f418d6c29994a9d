r"""Evaluate a trained run: decode a split, score it, analyse beam-search errors, plot attention.

  python eval.py --workdir runs/default                       # beam 4 on the test split
  python eval.py --workdir runs/default --decode greedy --split validation
  python eval.py --workdir runs/default --sweep               # greedy vs beam 1/2/4/8, +- length norm
  python eval.py --workdir runs/default --error_analysis      # search error or model error?
  python eval.py --workdir runs/default --plot_attention 4    # attention heatmaps (PNG)
  echo "3 May 1979" | python eval.py --workdir runs/default --input -

Loads the best checkpoint (else the latest), writes hypotheses line by line as they are decoded, and a
JSON report (default `<workdir>/eval_<split>.json`).
"""

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

import decoding
import experiment
import plots
import sharding
from data import input_pipeline, tokenizers
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
    batch_size: int | None = None  # None: the run's eval_batch_size
    num_examples: int = 0  # 0: all
    report: str | None = None  # None: <workdir>/eval_<split>.json
    output: str | None = None  # None: <workdir>/hypotheses_<split>.txt (stdout with --input)
    sweep: bool = False
    error_analysis: bool = False
    plot_attention: int = 0
    input: str | None = None
    average_checkpoints: int = 0  # > 0: the mean of the last N periodic checkpoints


def define_flags() -> None:
    flags.DEFINE_string("workdir", "runs/default", "Run directory written by train.py.")
    flags.DEFINE_enum("split", "test", ["validation", "test"], "Split to evaluate.")
    flags.DEFINE_enum("decode", "beam", ["greedy", "beam"], "Search.")
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


class Run:
    """A trained run loaded for evaluation: config, tokenizers, model and params.

    Evaluation runs on this host's devices, whatever mesh trained the run: batches are split over
    all of them (`mesh`, one `data` axis) and the params, read from the checkpoint straight into
    that layout, are replicated on each.
    """

    def __init__(self, workdir: Path, average_checkpoints: int = 0):
        self.workdir = Path(workdir)
        self.mesh = sharding.make_mesh()
        self.config = experiment.load_config(self.workdir)
        self.src_tokenizer = tokenizers.load(self.workdir / experiment.SRC_TOKENIZER)
        self.tgt_tokenizer = tokenizers.load(self.workdir / experiment.TGT_TOKENIZER)
        self.model = experiment.create_model(
            self.config, self.src_tokenizer.vocab_size, self.tgt_tokenizer.vocab_size
        )
        shapes = jax.eval_shape(lambda: experiment.init_params(self.model, self.config))
        replicated = jax.tree.map(lambda _: sharding.replicated(self.mesh), shapes)
        template = sharding.abstract(shapes, replicated)
        self.params, self.step, self.checkpoint = experiment.restore_params(
            self.workdir, template, average_checkpoints
        )


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class Search:
    """How to decode: greedy or beam (`beam_size`), length normalization (`length_penalty`, `alpha`)
    and length limits (`max_len`, and per sentence `ceil(max_len_a x source tokens) + max_len_b`
    when `max_len_a > 0`; see `experiment.decode_fn`)."""

    decode: str
    beam_size: int
    alpha: float
    length_penalty: str
    max_len: int
    max_len_a: float = 0.0
    max_len_b: int = 0

    def decode_fn(self, run: Run):
        return experiment.decode_fn(
            run.model,
            self.decode,
            self.beam_size,
            self.max_len,
            self.length_penalty,
            run.mesh,
            self.max_len_a,
            self.max_len_b,
        )

    def report(self) -> dict:
        """The settings as the JSON report names them."""
        return {
            "decode": self.decode,
            "beam_size": self.beam_size if self.decode == "beam" else 1,
            "alpha": self.alpha,
            "length_penalty": self.length_penalty,
            "max_decode_len": self.max_len,
            "max_decode_len_a": self.max_len_a,
            "max_decode_len_b": self.max_len_b,
        }


def decode_batches(run: Run, batches, search: Search, sink):
    """Decodes `batches` in order; returns (best sequences [n, max_len], results, timing).

    Each hypothesis is passed to `sink(line)` as soon as its batch is done, so a failure later loses
    nothing already decoded. Timing excludes compilation: a batch whose shape is new is run twice and
    the second run is timed.
    """
    fn, alpha = search.decode_fn(run), search.alpha
    seen_shapes, sequences, results = set(), [], []
    decode_seconds = compile_seconds = 0.0
    for batch in batches:
        src = sharding.shard_batch({"src": batch["src"]}, run.mesh)["src"]
        if src.shape not in seen_shapes:
            start = time.perf_counter()
            jax.block_until_ready(fn(run.params, src, alpha))
            compile_seconds += time.perf_counter() - start
            seen_shapes.add(src.shape)
        start = time.perf_counter()
        result = jax.block_until_ready(fn(run.params, src, alpha))
        decode_seconds += time.perf_counter() - start
        mask = batch["mask"]
        best = experiment.best_sequences(result)[mask]
        for row in best:
            sink(run.tgt_tokenizer.decode(row.tolist()))
        sequences.append(best)
        results.append(jax.tree.map(lambda x, mask=mask: np.asarray(x)[mask], result))
    timing = {"decode_seconds": decode_seconds, "warmup_seconds": compile_seconds}
    return np.concatenate(sequences), results, timing


def evaluate_split(run: Run, eval_data, search: Search, output: Path):
    """Decodes a split, writing hypotheses to `output`; returns the report dict (and sequences)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as f:

        def sink(line):
            f.write(line + "\n")
            f.flush()

        sequences, results, timing = decode_batches(run, eval_data.batches, search, sink)
    hypotheses = output.read_text().splitlines()
    references = eval_data.references[: len(hypotheses)]
    report = {
        **search.report(),
        "num_examples": len(hypotheses),
        **experiment.text_metrics(
            hypotheses, references, exact_match=run.config.eval_metric == "exact_match"
        ),
        "sentences_per_sec": len(hypotheses) / max(timing["decode_seconds"], 1e-9),
        **timing,
    }
    if eval_data.batches and eval_data.batches[0]["src"].ndim == 2:  # text sources
        lengths = np.concatenate(
            [(b["src"] != tokenizers.PAD_ID).sum(axis=1)[b["mask"]] - 1 for b in eval_data.batches]
        )[: len(hypotheses)]
        report["by_source_length"] = by_source_length(
            hypotheses, references, lengths, exact_match=run.config.eval_metric == "exact_match"
        )
    best_scores = np.concatenate([best_score(r) for r in results])
    return report, sequences, best_scores


def by_source_length(hypotheses, references, lengths, *, exact_match: bool, bins: int = 5):
    """Quality by source length: the examples split into up to `bins` groups of about equal size
    by source length in tokens (EOS excluded); for each, its length range, size and metrics.

    Args:
      lengths: int `[n]`, source tokens of each example (characters for a character tokenizer).
    """
    lengths = np.asarray(lengths)
    # Upper edges at the quantiles; examples of one length always share a group.
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, bins + 1)[1:], method="lower"))
    group_of = np.searchsorted(edges, lengths)  # lengths[i] <= edges[group_of[i]]
    out = []
    for group in range(len(edges)):
        indices = np.flatnonzero(group_of == group)
        if not len(indices):
            continue
        metrics = experiment.text_metrics(
            [hypotheses[i] for i in indices], [references[i] for i in indices], exact_match
        )
        metrics.pop("bleu_signature")
        span = lengths[indices]
        out.append(
            {
                "min_len": int(span.min()),
                "max_len": int(span.max()),
                "count": len(indices),
                **metrics,
            }
        )
    return out


def format_by_source_length(rows, metric: str) -> str:
    lines = [f"{'source length':>14}{'count':>8}{metric:>13}"]
    for r in rows:
        lines.append(f"{r['min_len']:>7}-{r['max_len']:<6}{r['count']:>8}{r[metric]:>13.4f}")
    return "\n".join(lines)


def best_score(result) -> np.ndarray:
    """Normalized score of the best hypothesis `[n]` (greedy results: its log-probability)."""
    scores = getattr(result, "scores", None)
    return np.asarray(scores)[:, 0] if scores is not None else np.asarray(result.log_probs)


@functools.cache
def _score_fn(model, length_penalty: str, mesh):
    """Jitted teacher-forced scoring; the batch split over `mesh`, the params replicated."""

    def run_score(params, src, targets, alpha):
        params, src, targets = experiment.replicate_params_shard_batch(mesh, params, src, targets)
        step_fn, state = experiment.step_function(model, params, src, targets.shape[1])
        return decoding.score(
            step_fn,
            state,
            targets,
            bos_id=tokenizers.BOS_ID,
            eos_id=tokenizers.EOS_ID,
            alpha=alpha,
            length_penalty=length_penalty,
        )

    return jax.jit(run_score, out_shardings=sharding.replicated(mesh))


def run_error_analysis(run: Run, eval_data, sequences, scores, *, alpha, length_penalty):
    """The course's analysis: score y* under the beam's own normalization and compare with ŷ's score.

    Args:
      sequences: int `[n, max_len]`, the beam's best hypothesis per example.
      scores: float `[n]`, its normalized score from the beam search.
    """
    score = _score_fn(run.model, length_penalty, run.mesh)
    reference_scores, references = [], []
    for batch in eval_data.batches:
        mask = batch["mask"]
        arrays = sharding.shard_batch({k: batch[k] for k in ("src", "tgt_out")}, run.mesh)
        result = score(run.params, arrays["src"], arrays["tgt_out"], alpha)
        reference_scores.append(np.asarray(result.scores)[mask])
        references.extend(batch["tgt_out"][mask].tolist())
    width = max(len(r) for r in references)
    references = np.array([r + [0] * (width - len(r)) for r in references], np.int32)
    report = decoding.error_analysis(
        references,
        np.concatenate(reference_scores),
        sequences,
        scores,
        eos_id=tokenizers.EOS_ID,
    )
    print(decoding.format_error_analysis(report, detokenize=run.tgt_tokenizer.decode))
    report.pop("records", None)
    return report


def run_sweep(run: Run, eval_data, search: Search, workdir: Path):
    """Greedy and beam 1, 2, 4, 8, each with (GNMT, alpha) and without length normalization."""
    settings = [("greedy", 1, "none")]
    for beam_size in (1, 2, 4, 8):
        settings += [("beam", beam_size, "gnmt"), ("beam", beam_size, "none")]
    rows = []
    for decode, beam_size, length_penalty in settings:
        setting = dataclasses.replace(
            search,
            decode=decode,
            beam_size=beam_size,
            alpha=search.alpha if length_penalty != "none" else 0.0,
            length_penalty=length_penalty,
        )
        output = workdir / "sweep" / f"{decode}{beam_size}_{length_penalty}.txt"
        report, _, _ = evaluate_split(run, eval_data, setting, output)
        rows.append(report)
    metric = "exact_match" if run.config.eval_metric == "exact_match" else "bleu"
    print(f"{'decode':<8}{'beam':>5}  {'length norm':<12}{metric:>12}{'BLEU':>8}{'sent/s':>10}")
    for r in rows:
        print(
            f"{r['decode']:<8}{r['beam_size']:>5}  {r['length_penalty']:<12}"
            f"{r[metric]:>12.4f}{r['bleu']:>8.2f}{r['sentences_per_sec']:>10.1f}"
        )
    return rows


def translate_lines(run: Run, lines, search: Search, batch_size: int, sink):
    """Translates user text, one sentence per line; empty lines are skipped and over-long ones
    truncated, each with a notice on stderr. Output lines stay aligned with input lines (an empty
    input line gives an empty output line)."""
    limit = run.config.max_len
    pending: list[tuple[int, list[int]]] = []
    outputs: dict[int, str] = {}
    next_to_write = 0

    def flush(force=False):
        nonlocal next_to_write, pending
        while pending and (force or len(pending) >= batch_size):
            chunk, pending = pending[:batch_size], pending[batch_size:]
            batches = input_pipeline.source_batches(
                run.config, [ids for _, ids in chunk], batch_size
            )
            hyps: list[str] = []
            decode_batches(run, batches, search, hyps.append)
            for (index, _), hyp in zip(chunk, hyps, strict=True):
                outputs[index] = hyp
        while next_to_write in outputs:
            sink(outputs.pop(next_to_write))
            next_to_write += 1

    for number, line in enumerate(lines):
        text = line.rstrip("\n").strip()
        if not text:
            notice(f"line {number + 1} is empty: skipped")
            outputs[number] = ""
            flush()
            continue
        ids = run.src_tokenizer.encode(text)
        if len(ids) > limit:
            notice(f"line {number + 1} has {len(ids)} tokens: truncated to {limit}")
            ids = ids[:limit]
        pending.append((number, ids))
        flush()
    flush(force=True)


def plot_attention(run: Run, eval_data, sequences, count: int, directory: Path) -> list[Path]:
    """Attention of the model teacher-forced on its own outputs for the first `count` examples, one
    PNG per example: heatmaps over source tokens, or over the image's feature grid per word."""
    directory.mkdir(parents=True, exist_ok=True)
    batch = eval_data.batches[0]
    count = min(count, int(batch["mask"].sum()), len(sequences))
    hyps = np.asarray(sequences[:count])
    lengths = np.asarray(decoding.scoring.sequence_lengths(hyps, tokenizers.EOS_ID))
    tgt_in = np.zeros_like(hyps)
    tgt_in[:, 0] = tokenizers.BOS_ID
    tgt_in[:, 1:] = hyps[:, :-1]
    tgt_in = np.where(np.arange(hyps.shape[1]) < lengths[:, None], tgt_in, 0)
    src = batch["src"][:count]
    _, state = run.model.apply(
        {"params": run.params}, src, tgt_in, train=False, mutable=["intermediates"]
    )
    maps = attention_maps(state.get("intermediates", {}))
    if not maps:
        notice(f"--plot_attention: {run.config.model} has no attention to plot")
        return []
    paths = []
    if src.ndim == 4:  # images: one row per decoder layer, heads averaged
        grid = run.model.grid_shape(*src.shape[1:3])
        layers: dict[str, list[np.ndarray]] = {}
        for name, weights in maps:
            layers.setdefault(name.split(" head ")[0], []).append(weights)
        rows = [(name, np.mean(stack, axis=0)) for name, stack in layers.items()]
        for i, image in enumerate(np.asarray(src)):
            ids = hyps[i, : lengths[i]].tolist()
            words = plots.word_spans(ids, run.tgt_tokenizer.pieces(ids))
            panels = [(name, weights[i]) for name, weights in rows]
            caption = run.tgt_tokenizer.decode(ids)
            path = directory / f"attention_{i}.png"
            paths.append(plots.image_attention(image, caption, words, panels, grid, path))
        return paths
    for i in range(count):
        src_len = int((src[i] != 0).sum())
        src_pieces = run.src_tokenizer.pieces(src[i, :src_len].tolist())
        tgt_pieces = run.tgt_tokenizer.pieces(hyps[i, : lengths[i]].tolist())
        panels = [(name, weights[i]) for name, weights in maps]
        path = directory / f"attention_{i}.png"
        paths.append(plots.text_attention(src_pieces, tgt_pieces, panels, path))
    return paths


def attention_maps(intermediates) -> list[tuple[str, np.ndarray]]:
    """Every sown attention array as (name, `[batch, tgt_len, src_len]`), heads split out."""
    maps = []
    flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
    for path, value in flat:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        name = name.removesuffix("/0")  # sow keeps a tuple of values
        if "attention" not in name or "self" in name:
            continue
        value = np.asarray(value)
        if value.ndim == 3:
            maps.append((name, value))
        elif value.ndim == 4:
            maps.extend((f"{name} head {h}", value[:, h]) for h in range(value.shape[1]))
    return maps


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    options = Options(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(Options)})
    try:
        evaluate(Path(FLAGS.workdir), options)
    except (experiment.RunError, ValueError) as e:  # DataError is a ValueError
        sys.exit(f"error: {e}")


def evaluate(workdir: Path, options: Options) -> dict | None:
    """Evaluates the run in `workdir` as `options` say; returns the report (None with --input)."""
    workdir = Path(workdir)
    if options.beam_size < 1:
        raise experiment.RunError(f"--beam_size={options.beam_size}: use a beam of 1 or more")
    run = Run(workdir, options.average_checkpoints)
    config = run.config
    max_len = options.max_decode_len or config.max_decode_len
    # Batches split over the devices: round the size up to a multiple of their number.
    batch_size = sharding.round_up(options.batch_size or config.eval_batch_size, run.mesh)
    search = Search(
        decode=options.decode,
        beam_size=options.beam_size,
        alpha=options.alpha,
        length_penalty=options.length_penalty,
        max_len=max_len,
        max_len_a=config.get("max_decode_len_a", 0.0)
        if options.max_decode_len_a is None
        else options.max_decode_len_a,
        max_len_b=config.get("max_decode_len_b", 0)
        if options.max_decode_len_b is None
        else options.max_decode_len_b,
    )
    if options.input:
        if registry.reads_images(run.model):
            raise experiment.RunError(
                f"--input translates text lines, but {config.model} reads images: "
                "evaluate a split instead (--split)"
            )
        stream = sys.stdin if options.input == "-" else open_input(options.input)
        out = open(options.output, "w") if options.output else sys.stdout
        try:

            def sink(line):
                out.write(line + "\n")
                out.flush()

            translate_lines(run, stream, search, batch_size, sink)
        finally:
            if out is not sys.stdout:
                out.close()
        return None

    eval_data = input_pipeline.get_eval_data(
        config, options.split, run.src_tokenizer, run.tgt_tokenizer, batch_size=batch_size
    )
    eval_data = input_pipeline.head(eval_data, options.num_examples)
    output = Path(options.output or workdir / f"hypotheses_{options.split}.txt")
    report, sequences, scores = evaluate_split(run, eval_data, search, output)
    checkpoint = run.checkpoint if options.average_checkpoints else f"{run.checkpoint}/{run.step}"
    report = {"split": options.split, "checkpoint": checkpoint, **report}
    print(
        f"{options.split}: "
        + ", ".join(f"{k} {v:.4g}" for k, v in report.items() if isinstance(v, float))
    )
    print(f"hypotheses: {output}")
    if "by_source_length" in report:
        metric = "exact_match" if config.eval_metric == "exact_match" else "bleu"
        print(format_by_source_length(report["by_source_length"], metric))
    if options.sweep:
        report["sweep"] = run_sweep(run, eval_data, search, workdir)
    if options.error_analysis:
        if options.decode != "beam":
            notice("error analysis compares with the beam output: run with --decode beam")
        report["error_analysis"] = run_error_analysis(
            run,
            eval_data,
            sequences,
            scores,
            alpha=options.alpha,
            length_penalty=options.length_penalty,
        )
    if options.plot_attention:
        paths = plot_attention(
            run, eval_data, sequences, options.plot_attention, workdir / "attention"
        )
        report["attention_plots"] = [str(p) for p in paths]
        if paths:
            print(f"attention plots: {paths[0].parent}")
    report_path = Path(options.report or workdir / f"eval_{options.split}.json")
    report_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"report: {report_path}")
    return report


def open_input(path: str):
    try:
        return open(path, encoding="utf-8")
    except OSError as e:
        raise experiment.RunError(f"cannot read --input {path}: {e.strerror}") from None


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    define_flags()
    app.run(main, flags_parser=experiment.parse_flags)
