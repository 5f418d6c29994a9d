"""Quality and speed of greedy and beam 1, 2, 4, 8, with and without length normalization."""

import dataclasses
from pathlib import Path

from decoding import DecodeSettings
from evaluation.decode_report import evaluate_split
from evaluation.loading import Run


def run_sweep(run: Run, eval_data, settings: DecodeSettings, workdir: Path) -> list[dict]:
    """Greedy and beam 1, 2, 4, 8, each with (GNMT, alpha) and without length normalization; prints
    a table and returns one report per setting (hypotheses in `<workdir>/sweep/`)."""
    grid = [("greedy", 1, "none")]
    for beam_size in (1, 2, 4, 8):
        grid += [("beam", beam_size, "gnmt"), ("beam", beam_size, "none")]
    rows = []
    for decode, beam_size, length_penalty in grid:
        setting = dataclasses.replace(
            settings,
            decode=decode,
            beam_size=beam_size,
            alpha=settings.alpha if length_penalty != "none" else 0.0,
            length_penalty=length_penalty,
            num_samples=1,
        )
        output = workdir / "sweep" / f"{decode}{beam_size}_{length_penalty}.txt"
        report, _, _ = evaluate_split(run, eval_data, setting, output)
        rows.append(report)
    print(sweep_table(rows, run.config.eval_metric))
    return rows


def sweep_table(rows: list[dict], metric: str) -> str:
    """The sweep's reports as a table led by `metric`, the run's `eval_metric` (then cased BLEU,
    unless that is the metric, and speed)."""
    columns = [metric] + (["bleu"] if metric != "bleu" else [])
    head = f"{'decode':<8}{'beam':>5}  {'length norm':<12}"
    lines = [head + "".join(f"{c:>13}" for c in columns) + f"{'sent/s':>10}"]
    for r in rows:
        lines.append(
            f"{r['decode']:<8}{r['beam_size']:>5}  {r['length_penalty']:<12}"
            + "".join(f"{r[c]:>13.4f}" for c in columns)
            + f"{r['sentences_per_sec']:>10.1f}"
        )
    return "\n".join(lines)
