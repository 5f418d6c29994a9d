"""Beam-search error analysis on a decoded split: score y* and ŷ alike, blame the search or the model."""

import numpy as np

import decoding
import sharding
from decoding import DecodeSettings
from evaluation.loading import Run
from experiment import decode_programs


def run_error_analysis(
    run: Run, eval_data, sequences: np.ndarray, settings: DecodeSettings
) -> dict:
    """The course's analysis: the reference y* and the output ŷ scored by the model under the same
    length normalization (`settings.length_penalty`, `settings.alpha`), then compared.

    Both are scored teacher-forced (`decode_programs.score_fn`), whatever decoder produced ŷ: for
    beam search that is its own score; for greedy, whose search maximizes the raw log-probability,
    it puts ŷ on the same scale as y*. A reference longer than its sentence's own length limit
    (`settings.length_limits`: `max_decode_len`, or `ceil(a * source tokens) + b`) is counted as one
    no search could find.

    Args:
      sequences: int `[n, max_decode_len]`, the decoder's best hypothesis per example (split order).
    """
    score = decode_programs.score_fn(run.model, settings.length_penalty, run.mesh)
    pad, eos = run.special_ids.pad, run.special_ids.eos
    reference_scores, hypothesis_scores, references, limits = [], [], [], []
    start = 0
    for batch in eval_data.batches:
        mask = batch["mask"]
        rows = int(mask.sum())
        hyps = np.full((len(mask), sequences.shape[1]), pad, np.int32)
        hyps[mask] = sequences[start : start + rows]
        start += rows
        arrays = sharding.shard_batch(
            {"src": batch["src"], "tgt_out": batch["tgt_out"], "hyp": hyps}, run.mesh
        )
        for targets, out in (
            (arrays["tgt_out"], reference_scores),
            (arrays["hyp"], hypothesis_scores),
        ):
            scored = score(run.decoding_params, arrays["src"], targets, settings.alpha)
            out.append(np.asarray(scored.scores)[mask])
        references.extend(batch["tgt_out"][mask].tolist())
        limits.append(settings.length_limits(batch["src"], pad)[mask])
    width = max(len(r) for r in references)
    references = np.array([r + [pad] * (width - len(r)) for r in references], np.int32)
    report = decoding.error_analysis(
        references,
        np.concatenate(reference_scores),
        sequences,
        np.concatenate(hypothesis_scores),
        eos_id=eos,
        pad_id=pad,
        max_lengths=np.concatenate(limits),
    )
    print(decoding.format_error_analysis(report, detokenize=run.tgt_tokenizer.decode))
    report.pop("records", None)
    return report
