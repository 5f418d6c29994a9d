"""Text metrics, quality by source length, and a run's `metrics.jsonl`."""

import json
from pathlib import Path

import numpy as np
import sacrebleu

METRICS_FILE = "metrics.jsonl"


def text_metrics(hypotheses: list[str], references: list[str], exact_match: bool) -> dict:
    """Corpus metrics on detokenized strings.

    bleu: sacreBLEU on cased, detokenized text (the standard, with its signature);
    bleu_lc_tok: lowercased BLEU on 13a-tokenized text, the convention of Multi30k papers;
    chrf: sacreBLEU chrF; exact_match: fraction of hypotheses equal to their reference (string equality).
    """
    bleu = sacrebleu.metrics.BLEU()
    bleu_lc = sacrebleu.metrics.BLEU(lowercase=True, tokenize="13a")
    chrf = sacrebleu.metrics.CHRF()
    out = {
        "bleu": bleu.corpus_score(hypotheses, [references]).score,
        "bleu_signature": str(bleu.get_signature()),
        "bleu_lc_tok": bleu_lc.corpus_score(hypotheses, [references]).score,
        "chrf": chrf.corpus_score(hypotheses, [references]).score,
    }
    if exact_match:
        out["exact_match"] = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
    return out


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
        metrics = text_metrics(
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


def summary(scores: dict, lead: str) -> str:
    """`scores`' numbers on one line, led by `lead`, the metric the run is judged by (its config's
    `eval_metric`, which selects the best checkpoint), the others after it in their order:
    "bleu_lc_tok 42.51; loss 1.931, bleu 9.069, chrf 61.23". Raises a one-line ValueError when
    `scores` has no number `lead`."""
    numbers = {k: v for k, v in scores.items() if isinstance(v, float)}
    if lead not in numbers:
        raise ValueError(
            f"eval_metric={lead!r} is not among the validation scores ({', '.join(numbers)}): "
            "set --config.eval_metric to one of them"
        )
    others = ", ".join(f"{k} {v:.4g}" for k, v in numbers.items() if k != lead)
    return f"{lead} {numbers[lead]:.4g}" + (f"; {others}" if others else "")


def append_metrics(workdir: Path, record: dict) -> None:
    with open(Path(workdir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def one_history(records: list[dict]) -> list[dict]:
    """metrics.jsonl rows as one uninterrupted run's. A resumed run appends a new process's rows,
    whose `elapsed_s` restarts: they replace the earlier processes' rows from their first step on
    (work redone after the checkpoint), and their `elapsed_s` continue from the last row kept.
    The first resumed train row's `tokens` cover only the updates after the checkpoint."""
    kept: list[dict] = []
    offset, previous = 0.0, None
    for record in records:
        elapsed = record.get("elapsed_s")
        if elapsed is not None and previous is not None and elapsed < previous:
            kept = [r for r in kept if r["step"] < record["step"]]
            offset = max((r["elapsed_s"] for r in kept if "elapsed_s" in r), default=0.0)
        if elapsed is not None:
            previous = elapsed
            record = {**record, "elapsed_s": offset + elapsed}
        kept.append(record)
    return kept
