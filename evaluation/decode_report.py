"""Decode a split and report its metrics and speed."""

import json
import time
from pathlib import Path

import jax
import numpy as np

import sharding
from contracts import PAD_ID
from evaluation.loading import Run, Search
from experiment import metrics, programs


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


def decode_batches(run: Run, batches, search: Search, sink, nbest: int = 0):
    """Decodes `batches` in order; returns (best sequences [n, max_decode_len], results, timing).

    Each sentence is passed to `sink(text, nbest_record or None)` as soon as its batch is done, so a
    failure later loses nothing already decoded; with `nbest` > 0 (beam search) the record holds its
    `nbest` best hypotheses (`nbest_record`). Each batch is decoded once: a shape seen for the first time is compiled
    ahead (`lower().compile()`, timed as `warmup_seconds`), so `decode_seconds` excludes compilation.
    Compiled programs are the jitted `decode_fn`'s own, reused by every later call.
    """
    fn, alpha = search.decode_fn(run), search.alpha
    compiled = _compiled.setdefault(fn, set())
    sequences, results = [], []
    decode_seconds = compile_seconds = 0.0
    for batch in batches:
        src = sharding.shard_batch({"src": batch["src"]}, run.mesh)["src"]
        key = (src.shape, src.dtype)
        if key not in compiled:
            start = time.perf_counter()
            fn.lower(run.params, src, alpha).compile()
            compile_seconds += time.perf_counter() - start
            compiled.add(key)
        start = time.perf_counter()
        result = jax.block_until_ready(fn(run.params, src, alpha))
        decode_seconds += time.perf_counter() - start
        mask = batch["mask"]
        result = jax.tree.map(lambda x, mask=mask: np.asarray(x)[mask], result)
        best = programs.best_sequences(result)
        for i, row in enumerate(best):
            record = nbest_record(run, result, i, nbest) if nbest else None
            sink(run.tgt_tokenizer.decode(row.tolist()), record)
        sequences.append(best)
        results.append(result)
    timing = {"decode_seconds": decode_seconds, "warmup_seconds": compile_seconds}
    return np.concatenate(sequences), results, timing


_compiled: dict = {}  # decode_fn -> the (shape, dtype) of the sources it has compiled for


def nbest_path(output: Path) -> Path:
    """Where the n-best JSONL of hypotheses file `output` goes: `<output stem>.nbest.jsonl`."""
    return output.with_name(output.stem + ".nbest.jsonl")


class LineWriter:
    """Writes each sentence as it comes: its best hypothesis as one line of `output`, and with
    `nbest` its n-best record (plus its index) as one line of `nbest_path(output)`."""

    def __init__(self, output, nbest: int = 0):
        self.text = open(output, "w", encoding="utf-8", newline="\n")
        self.jsonl = open(nbest_path(Path(output)), "w", encoding="utf-8") if nbest else None
        self.count = 0

    def __call__(self, text: str, record: dict | None = None) -> None:
        self.text.write(one_line(text) + "\n")
        self.text.flush()
        if self.jsonl is not None:
            self.jsonl.write(
                json.dumps({"index": self.count, **(record or {"hypotheses": []})}) + "\n"
            )
            self.jsonl.flush()
        self.count += 1

    def close(self) -> None:
        self.text.close()
        if self.jsonl is not None:
            self.jsonl.close()


def evaluate_split(run: Run, eval_data, search: Search, output: Path, nbest: int = 0):
    """Decodes a split, writing hypotheses to `output` (one line per sentence, as they are decoded)
    and, with `nbest`, each sentence's n-best to `nbest_path(output)` (JSONL, split order).

    Returns (report dict, best sequences `[n, max_decode_len]`, the decoding results per batch).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    hypotheses: list[str] = []
    writer = LineWriter(output, nbest)
    try:

        def sink(text, record):
            hypotheses.append(text)
            writer(text, record)

        sequences, results, timing = decode_batches(run, eval_data.batches, search, sink, nbest)
    finally:
        writer.close()
    references = eval_data.references[: len(hypotheses)]
    exact_match = run.config.eval_metric == "exact_match"
    report = {
        **search.report(),
        "num_examples": len(hypotheses),
        **metrics.text_metrics(hypotheses, references, exact_match=exact_match),
        "sentences_per_sec": len(hypotheses) / max(timing["decode_seconds"], 1e-9),
        **timing,
    }
    if eval_data.batches and eval_data.batches[0]["src"].ndim == 2:  # text sources
        lengths = np.concatenate(
            [(b["src"] != PAD_ID).sum(axis=1)[b["mask"]] - 1 for b in eval_data.batches]
        )[: len(hypotheses)]
        report["by_source_length"] = metrics.by_source_length(
            hypotheses, references, lengths, exact_match=exact_match
        )
    return report, sequences, results
