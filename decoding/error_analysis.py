"""Beam-search error analysis (the course's method): is a wrong output the search's fault or the model's?

For each sentence with reference y* and beam output ŷ, both scored by the same model under the same
length normalization (`decoding.score` for y*, the beam's own score for ŷ):
- ŷ == y* (the same tokens up to and including EOS): correct, not an error;
- score(y*) > score(ŷ): a search error. The model prefers the reference, but the search did not find
  it: a wider beam can help, unless y* is longer than the sentence's length limit (then raise it);
- score(y*) <= score(ŷ): a model error. The model ranks its wrong output at least as high as the
  reference, so no search can fix it: improve the model.
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from decoding import common, scoring


def error_analysis(
    references: Any,
    reference_scores: Any,
    hypotheses: Any,
    hypothesis_scores: Any,
    *,
    eos_id: int,
    pad_id: int = common.PAD_ID,
    max_lengths: Any = None,
    num_examples: int = 3,
) -> dict:
    """Splits the errors of a decoder into search errors and model errors.

    Args:
      references: int `[n, T]` reference targets y* (y_1 .. y_T with EOS, 0-padded, like `tgt_out`).
      reference_scores: float `[n]`, their normalized scores (`decoding.score(...).scores`).
      hypotheses: int `[n, max_len]`, the beam output ŷ (`beam_search(...).sequences[:, 0]`).
      hypothesis_scores: float `[n]`, its normalized score (`beam_search(...).scores[:, 0]`), under
        the same alpha and length penalty as `reference_scores`.
      eos_id, pad_id: the ids that end a sequence (see `decoding.scoring.sequence_lengths`).
      max_lengths: int `[n]`, the most tokens (EOS included) the decoder could generate for each
        sentence (its own limit, e.g. `ceil(a * source tokens) + b`); None: `max_len` for all.
      num_examples: how many examples of each kind to keep, those with the largest score gap first.

    Returns:
      A report dict: `num_sentences`, `num_correct`, `num_search_errors`, `num_model_errors`,
      `search_error_fraction` and `model_error_fraction` (fractions of the errors, 0 without errors),
      `num_reference_too_long` (search errors whose reference is longer than its sentence's length
      limit, which no beam can find), `records` (one per sentence: `index`, `kind` in correct/search/model,
      `reference_score`, `hypothesis_score`), `examples` (`{"search": [...], "model": [...]}`, records
      with `reference` and `hypothesis` token lists added), `verdict` ("search", "model", "tie" or
      "none") and `suggested_fix` (one sentence).

    Raises:
      ValueError: arrays whose shapes do not match.
    """
    references, hypotheses = np.asarray(references), np.asarray(hypotheses)
    reference_scores = np.asarray(reference_scores, np.float64)
    hypothesis_scores = np.asarray(hypothesis_scores, np.float64)
    n = len(references)
    if (
        references.ndim != 2
        or hypotheses.ndim != 2
        or len(hypotheses) != n
        or reference_scores.shape != (n,)
        or hypothesis_scores.shape != (n,)
    ):
        raise ValueError(
            "error_analysis needs references [n, T], reference_scores [n], hypotheses [n, max_len] "
            f"and hypothesis_scores [n], got {references.shape}, {reference_scores.shape}, "
            f"{hypotheses.shape} and {hypothesis_scores.shape}"
        )
    limits = np.full(n, hypotheses.shape[1]) if max_lengths is None else np.asarray(max_lengths)
    if limits.shape != (n,):
        raise ValueError(f"error_analysis needs max_lengths [n={n}], got {limits.shape}")
    reference_lengths = np.asarray(scoring.sequence_lengths(references, eos_id, pad_id))
    hypothesis_lengths = np.asarray(scoring.sequence_lengths(hypotheses, eos_id, pad_id))
    records, tokens = [], []
    for i in range(n):
        reference = references[i, : reference_lengths[i]].tolist()
        hypothesis = hypotheses[i, : hypothesis_lengths[i]].tolist()
        if reference == hypothesis:
            kind = "correct"
        elif reference_scores[i] > hypothesis_scores[i]:
            kind = "search"
        else:
            kind = "model"
        records.append(
            dict(
                index=i,
                kind=kind,
                reference_score=float(reference_scores[i]),
                hypothesis_score=float(hypothesis_scores[i]),
            )
        )
        tokens.append(dict(reference=reference, hypothesis=hypothesis))

    counts = {
        kind: sum(r["kind"] == kind for r in records) for kind in ("correct", "search", "model")
    }
    errors = counts["search"] + counts["model"]
    examples = {}
    for kind in ("search", "model"):
        chosen = sorted(
            (r for r in records if r["kind"] == kind),
            key=lambda r: -abs(r["reference_score"] - r["hypothesis_score"]),
        )[:num_examples]
        examples[kind] = [dict(r, **tokens[r["index"]]) for r in chosen]
    too_long = sum(
        r["kind"] == "search" and reference_lengths[r["index"]] > limits[r["index"]]
        for r in records
    )
    if errors == 0:
        verdict = "none"
    elif counts["search"] == counts["model"]:
        verdict = "tie"
    else:
        verdict = "search" if counts["search"] > counts["model"] else "model"
    return dict(
        num_sentences=n,
        num_correct=counts["correct"],
        num_search_errors=counts["search"],
        num_model_errors=counts["model"],
        search_error_fraction=counts["search"] / errors if errors else 0.0,
        model_error_fraction=counts["model"] / errors if errors else 0.0,
        num_reference_too_long=int(too_long),
        records=records,
        examples=examples,
        verdict=verdict,
        suggested_fix=_suggested_fix(verdict, int(too_long), counts["search"]),
    )


def _suggested_fix(verdict: str, too_long: int, search_errors: int) -> str:
    limit = "the length limit (max_decode_len, or max_decode_len_a/b per sentence)"
    if verdict == "search" and too_long == search_errors:
        return (
            f"Most errors are search errors, and in every one the reference is longer than its "
            f"sentence's length limit, which no beam can reach: raise {limit}."
        )
    longer = (
        f" (in {too_long} search errors the reference is longer than its sentence's length "
        f"limit: raise {limit} too)"
        if too_long
        else ""
    )
    return {
        "none": "No errors: every output equals its reference.",
        "search": "Most errors are search errors: the model prefers the reference but beam search "
        f"misses it, so widen the beam (beam_size){longer}.",
        "model": "Most errors are model errors: the model scores its wrong output at least as high "
        "as the reference, so a wider beam will not help; improve the model (more or better data, "
        f"regularization, capacity, longer training){longer}.",
        "tie": "Search and model errors are equally frequent: improve the model, and try a wider "
        f"beam{longer}.",
    }[verdict]


def format_error_analysis(
    report: dict, detokenize: Callable[[list[int]], str] | None = None
) -> str:
    """The report as text; `detokenize(ids) -> str` renders the examples (default: the ids)."""
    render = detokenize or (lambda ids: " ".join(map(str, ids)))
    errors = report["num_search_errors"] + report["num_model_errors"]
    lines = [
        f"Beam-search error analysis on {report['num_sentences']} sentences: "
        f"{report['num_correct']} correct, {errors} errors.",
        f"  search errors (score(y*) > score(ŷ)):  {report['num_search_errors']:>6} "
        f"({report['search_error_fraction']:.1%} of errors)",
        f"  model errors  (score(y*) <= score(ŷ)): {report['num_model_errors']:>6} "
        f"({report['model_error_fraction']:.1%} of errors)",
        f"Suggested fix: {report['suggested_fix']}",
    ]
    for kind in ("search", "model"):
        for example in report["examples"][kind]:
            lines += [
                f"{kind} error, sentence {example['index']}:",
                f"  y* ({example['reference_score']:.4f}): {render(example['reference'])}",
                f"  ŷ  ({example['hypothesis_score']:.4f}): {render(example['hypothesis'])}",
            ]
    return "\n".join(lines)
