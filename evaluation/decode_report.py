"""Decode a split and report its metrics and speed."""

import json
import time
from pathlib import Path

import jax
import numpy as np

import sharding
from decoding import DecodeSettings
from evaluation.loading import Run
from experiment import decode_programs, metrics


def one_line(text: str) -> str:
    """`text` as one line of a line-per-sentence file (a newline or carriage return inside becomes a
    space), so line i of the file is always sentence i."""
    return text.replace("\r", " ").replace("\n", " ")


def nbest_record(run: Run, result, row: int, count: int) -> dict:
    """The `count` best hypotheses of sentence `row` of a beam search result (numpy), best first:
    `{"hypotheses": [{"text", "score", "log_prob", "length"}, ...]}` (empty slots left out)."""
    hypotheses = []
    for k in range(count):
        if not result.valid[row, k]:
            break
        hypotheses.append(
            {
                "text": one_line(run.tgt_tokenizer.decode(result.sequences[row, k].tolist())),
                "score": float(result.scores[row, k]),
                "log_prob": float(result.log_probs[row, k]),
                "length": int(result.lengths[row, k]),
            }
        )
    return {"hypotheses": hypotheses}


def sample_records(run: Run, draws: list, row: int) -> dict:
    """Every draw of sentence `row` (numpy `DecodeResult`s, one per draw), in draw order:
    `{"samples": [{"text", "log_prob", "length"}, ...]}`."""
    return {
        "samples": [
            {
                "text": one_line(run.tgt_tokenizer.decode(draw.sequences[row].tolist())),
                "log_prob": float(draw.log_probs[row]),
                "length": int(draw.lengths[row]),
            }
            for draw in draws
        ]
    }


def token_record(run: Run, result, row: int, src_row: np.ndarray) -> dict:
    """Sentence `row`'s output token by token (its best hypothesis for beam search): `tokens`
    (pieces, EOS included), `token_log_probs`, `log_prob`, and with alignments `source_tokens`
    (the source's pieces, EOS included) and `alignment` (for each output token the index into
    `source_tokens` it attends to most)."""
    beam = np.ndim(result.sequences) == 3
    pick = (row, 0) if beam else (row,)
    length = int(result.lengths[pick])
    ids = result.sequences[pick][:length].tolist()
    record = {
        "tokens": run.tgt_tokenizer.pieces(ids),
        "token_log_probs": [round(float(x), 6) for x in result.token_log_probs[pick][:length]],
        "log_prob": float(result.log_probs[pick]),
    }
    if result.alignments is not None and src_row.ndim == 1:  # text sources
        source = src_row[src_row != run.special_ids.pad].tolist()
        record["source_tokens"] = run.src_tokenizer.pieces(source)
        record["alignment"] = result.alignments[pick][:length].tolist()
    return record


def decode_batches(
    run: Run, batches, settings: DecodeSettings, sink, nbest: int = 0, tokens: bool = False
):
    """Decodes `batches` in order; returns (best sequences [n, max_decode_len], results, timing).

    Each sentence is passed to `sink(text, record)` as soon as its batch is done, so a failure later
    loses nothing already decoded. `record` is None, or a dict with: `hypotheses`, its `nbest` best
    (beam settings, `nbest_record`); `samples`, every draw when `settings.num_samples > 1`
    (`sample_records`); `tokens` etc. when `tokens` (`token_record`). The text is the best
    hypothesis (beam), the greedy output, or the first draw (sampling).

    A batch may carry `prefix` (int `[batch, P]`, forced target prefixes) and `example_ids` (int
    `[batch]`, the sentences' indices for sampling keys; default their position among all
    sentences of `batches`). Each batch is decoded once (per draw): a shape seen for the first time
    is compiled ahead (`lower().compile()`, timed as `warmup_seconds`), so `decode_seconds` excludes
    compilation. Compiled programs are the jitted `decode_fn`'s own, reused by every later call.
    """
    fn, alpha = decode_programs.decode_fn(run.model, settings, run.mesh), settings.alpha
    compiled = _compiled.setdefault(fn, set())
    sequences, results = [], []
    decode_seconds = compile_seconds = 0.0
    seen = 0
    for batch in batches:
        src = sharding.shard_batch({"src": batch["src"]}, run.mesh)["src"]
        rows = len(batch["src"])
        example_ids = batch.get("example_ids", seen + np.arange(rows))
        prefix = batch.get("prefix")
        draws = []
        for draw in range(settings.num_samples if settings.decode == "sample" else 1):
            kwargs = {"prefix": prefix, "sampling": settings.sampling(draw, example_ids)}
            key = (src.shape, src.dtype, None if prefix is None else prefix.shape)
            if key not in compiled:
                start = time.perf_counter()
                fn.lower(run.decoding_params, src, alpha, **kwargs).compile()
                compile_seconds += time.perf_counter() - start
                compiled.add(key)
            start = time.perf_counter()
            result = jax.block_until_ready(fn(run.decoding_params, src, alpha, **kwargs))
            decode_seconds += time.perf_counter() - start
            mask = batch["mask"]
            draws.append(jax.tree.map(lambda x, mask=mask: np.asarray(x)[mask], result))
        result, real_src = draws[0], np.asarray(batch["src"])[batch["mask"]]
        best = decode_programs.best_sequences(result)
        for i, row in enumerate(best):
            record = {}
            if nbest:
                record.update(nbest_record(run, result, i, nbest))
            if len(draws) > 1:
                record.update(sample_records(run, draws, i))
            if tokens:
                record.update(token_record(run, result, i, real_src[i]))
            sink(run.tgt_tokenizer.decode(row.tolist()), record or None)
        sequences.append(best)
        results.append(result)
        seen += int(batch["mask"].sum())
    timing = {"decode_seconds": decode_seconds, "warmup_seconds": compile_seconds}
    return np.concatenate(sequences), results, timing


_compiled: dict = {}  # decode_fn -> the (shape, dtype) of the sources it has compiled for


def nbest_path(output: Path) -> Path:
    """Where the n-best JSONL of hypotheses file `output` goes: `<output stem>.nbest.jsonl`."""
    return output.with_name(output.stem + ".nbest.jsonl")


def samples_path(output: Path) -> Path:
    """Where the draws JSONL of hypotheses file `output` goes: `<output stem>.samples.jsonl`."""
    return output.with_name(output.stem + ".samples.jsonl")


class LineWriter:
    """Writes each sentence as it comes, with its index: its text as one line of `output` (or, with
    `jsonl`, one JSON object `{"index", "text", "tokens", ...}`); with `nbest` its n-best record as
    one line of `nbest_path(output)`; with `samples` its draws as one line of `samples_path(output)`."""

    def __init__(self, output, nbest: int = 0, samples: bool = False, jsonl: bool = False):
        output = Path(output)
        self.text = open(output, "w", encoding="utf-8", newline="\n")
        self.side = {}
        if nbest:
            self.side["hypotheses"] = open(nbest_path(output), "w", encoding="utf-8")
        if samples:
            self.side["samples"] = open(samples_path(output), "w", encoding="utf-8")
        self.jsonl = jsonl
        self.count = 0

    def __call__(self, text: str, record: dict | None = None) -> None:
        record = record or {}
        if self.jsonl:
            line = json_line(self.count, text, record)
        else:
            line = one_line(text)
        self.text.write(line + "\n")
        self.text.flush()
        for key, stream in self.side.items():
            stream.write(json.dumps({"index": self.count, key: record.get(key, [])}) + "\n")
            stream.flush()
        self.count += 1

    def close(self) -> None:
        self.text.close()
        for stream in self.side.values():
            stream.close()


class StdoutWriter:
    """Each sentence as one line of stdout: its text, or with `jsonl` its JSON object."""

    def __init__(self, jsonl: bool = False):
        self.jsonl, self.count = jsonl, 0

    def __call__(self, text: str, record: dict | None = None) -> None:
        line = json_line(self.count, text, record or {}) if self.jsonl else one_line(text)
        print(line, flush=True)
        self.count += 1


SIDE_KEYS = ("hypotheses", "samples")


def json_line(index: int, text: str, record: dict) -> str:
    """One sentence of `--output_format jsonl`: its index, text and token record (no side keys)."""
    fields = {k: v for k, v in record.items() if k not in SIDE_KEYS}
    return json.dumps({"index": index, "text": text, **fields}, ensure_ascii=False)


def evaluate_split(
    run: Run, eval_data, settings: DecodeSettings, output: Path, nbest: int = 0, jsonl: bool = False
):
    """Decodes a split, writing hypotheses to `output` (one line per sentence, as they are decoded;
    with `jsonl` one JSON object with its tokens), with `nbest` each sentence's n-best to
    `nbest_path(output)` and with several samples its draws to `samples_path(output)` (JSONL, in
    split order).

    Returns (report dict, best sequences `[n, max_decode_len]`, the decoding results per batch).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    hypotheses: list[str] = []
    writer = LineWriter(output, nbest, settings.num_samples > 1, jsonl)
    try:

        def sink(text, record):
            hypotheses.append(text)
            writer(text, record)

        sequences, results, timing = decode_batches(
            run, eval_data.batches, settings, sink, nbest, tokens=jsonl
        )
    finally:
        writer.close()
    references = eval_data.references[: len(hypotheses)]
    exact_match = run.config.eval_metric == "exact_match"
    report = {
        **settings.report(),
        "num_examples": len(hypotheses),
        **metrics.text_metrics(hypotheses, references, exact_match=exact_match),
        "sentences_per_sec": len(hypotheses) / max(timing["decode_seconds"], 1e-9),
        **timing,
    }
    if eval_data.batches and eval_data.batches[0]["src"].ndim == 2:  # text sources
        lengths = np.concatenate(
            [
                (b["src"] != run.special_ids.pad).sum(axis=1)[b["mask"]] - 1
                for b in eval_data.batches
            ]
        )[: len(hypotheses)]
        report["by_source_length"] = metrics.by_source_length(
            hypotheses, references, lengths, exact_match=exact_match
        )
    return report, sequences, results
