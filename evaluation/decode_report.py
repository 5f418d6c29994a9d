"""Decode a split and report its metrics and speed."""

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


def decode_batches(run: Run, batches, search: Search, sink):
    """Decodes `batches` in order; returns (best sequences [n, max_decode_len], results, timing).

    Each hypothesis is passed to `sink(text)` as soon as its batch is done, so a failure later loses
    nothing already decoded. Each batch is decoded once: a shape seen for the first time is compiled
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
        best = programs.best_sequences(result)[mask]
        for row in best:
            sink(run.tgt_tokenizer.decode(row.tolist()))
        sequences.append(best)
        results.append(jax.tree.map(lambda x, mask=mask: np.asarray(x)[mask], result))
    timing = {"decode_seconds": decode_seconds, "warmup_seconds": compile_seconds}
    return np.concatenate(sequences), results, timing


_compiled: dict = {}  # decode_fn -> the (shape, dtype) of the sources it has compiled for


def evaluate_split(run: Run, eval_data, search: Search, output: Path):
    """Decodes a split, writing hypotheses to `output` (one line per sentence, as they are decoded).

    Returns (report dict, best sequences `[n, max_decode_len]`, the decoding results per batch).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    hypotheses: list[str] = []
    with open(output, "w", encoding="utf-8", newline="\n") as f:

        def sink(text):
            hypotheses.append(text)
            f.write(one_line(text) + "\n")
            f.flush()

        sequences, results, timing = decode_batches(run, eval_data.batches, search, sink)
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
