"""Figures as PNG files (matplotlib, Agg backend): learning curves (train.py) and attention maps
(`eval.py --plot_attention`). Pure drawing: the callers compute what is drawn. matplotlib is
imported on the first figure, not at start-up (~0.3 s that most train.py/eval.py runs never use)."""

from pathlib import Path

import numpy as np

from data import tokenizers
from experiment import metrics


def _pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(records: list[dict], metric: str, path: Path) -> Path:
    """Train/validation loss, the validation `metric` (the one the run is judged by) and, beside
    them, the run's other validation metrics, against steps.

    Args:
      records: metrics.jsonl rows, `{"step", "split": "train" | "validation", "loss", metric...}`;
        a validation row's other float fields (not loss or elapsed_s) are the other metrics.
    """
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "validation"]
    others = list(dict.fromkeys(k for r in valid for k, v in r.items() if isinstance(v, float)))
    others = [k for k in others if k not in ("loss", "elapsed_s", metric)]
    panels = 3 if others else 2
    fig, (ax_loss, ax_metric, *ax_others) = _pyplot().subplots(1, panels, figsize=(5 * panels, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if valid:
        ax_loss.plot(
            [r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="validation"
        )
        points = [(r["step"], r[metric]) for r in valid if metric in r]
        if points:
            ax_metric.plot(*zip(*points), "o-", color="tab:green")
    ax_loss.set(xlabel="step", ylabel="loss (per token)", title="Loss", yscale="log")
    ax_loss.legend()
    ax_metric.set(xlabel="step", ylabel=metric, title=f"Validation {metric}")
    for ax in ax_others:
        for name in others:
            points = [(r["step"], r[name]) for r in valid if name in r]
            ax.plot(*zip(*points), "o-", label=name)
        ax.set(xlabel="step", title="Other validation metrics")
        ax.legend()
    return save_figure(fig, path)


def quality_curves(runs: dict[str, list[dict]], metric: str, path: Path) -> Path:
    """The validation `metric` of each run against wall time and against target tokens seen.

    Args:
      runs: label -> metrics.jsonl rows; validation rows need `elapsed_s`, train rows `tokens` (the
        window's real target tokens: the tokens seen at a validation are those of the train rows
        up to its step); a resumed run's rows count as one run's (`metrics.one_history`).
    """
    fig, (ax_time, ax_tokens) = _pyplot().subplots(1, 2, figsize=(10, 4))
    for label, records in runs.items():
        records = metrics.one_history(records)
        train = [(r["step"], r["tokens"]) for r in records if r.get("split") == "train"]
        valid = [r for r in records if r.get("split") == "validation" and metric in r]
        minutes = [r["elapsed_s"] / 60 for r in valid]
        seen = [sum(t for s, t in train if s <= r["step"]) / 1e6 for r in valid]
        scores = [r[metric] for r in valid]
        ax_time.plot(minutes, scores, "o-", label=label)
        ax_tokens.plot(seen, scores, "o-", label=label)
    ax_time.set(xlabel="wall time (min)", ylabel=metric, title=f"Validation {metric}")
    ax_tokens.set(
        xlabel="target tokens seen (millions)", ylabel=metric, title=f"Validation {metric}"
    )
    ax_time.legend()
    return save_figure(fig, path)


def text_attention(
    src_pieces: list[str], tgt_pieces: list[str], panels: list[tuple[str, np.ndarray]], path: Path
) -> Path:
    """One heatmap per panel of attention over source tokens for each generated token.

    Args:
      panels: (title, float `[>= len(tgt_pieces), >= len(src_pieces)]` weights); four per row (a
        Transformer gives one row per layer, one panel per head).
    """
    src_len, tgt_len = len(src_pieces), len(tgt_pieces)
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = _pyplot().subplots(
        rows,
        cols,
        figsize=(max(4, 0.35 * src_len) * cols, max(3, 0.35 * tgt_len) * rows),
        squeeze=False,
    )
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (name, weights) in zip(axes.flat, panels):
        ax.imshow(weights[:tgt_len, :src_len], cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(src_len), src_pieces, rotation=90, fontsize=7)
        ax.set_yticks(range(tgt_len), tgt_pieces, fontsize=7)
        ax.set_title(name, fontsize=8)
    return save_figure(fig, path)


def image_attention(
    image: np.ndarray,
    caption: str,
    words: list[tuple[str, list[int]]],
    rows: list[tuple[str, np.ndarray]],
    grid: tuple[int, int],
    path: Path,
) -> Path:
    """The image, then per generated word the attention over the model's feature grid (mean over the
    word's tokens) overlaid on the image; one row per entry of `rows`.

    Args:
      image: float `[height, width, channels]`; words: from `word_spans`;
      rows: (title, float `[tgt_len, grid[0] * grid[1]]` attention of this image's tokens).
    """
    height, width = image.shape[:2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # the coarse grid stretched over the pixels
    cols = 1 + len(words)
    fig, axes = _pyplot().subplots(
        len(rows), cols, figsize=(1.5 * cols, 1.7 * len(rows) + 0.4), squeeze=False
    )
    picture = image.mean(axis=-1)
    for row, (name, weights) in enumerate(rows):
        axes[row, 0].imshow(picture, cmap="gray")
        axes[row, 0].set_title(name, fontsize=7)
        for ax, (word, steps) in zip(axes[row, 1:], words, strict=True):
            ax.imshow(picture, cmap="gray")
            attention = weights[steps].mean(axis=0).reshape(grid)
            ax.imshow(attention, cmap="inferno", alpha=0.6, extent=extent, vmin=0)
            ax.set_title(word, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(caption, fontsize=9)
    return save_figure(fig, path)


def word_spans(
    ids: list[int], pieces: list[str], special_ids: tokenizers.SpecialIds = tokenizers.SEQZOO_IDS
) -> list[tuple[str, list[int]]]:
    """Generated tokens grouped into whitespace-separated words: (word, token positions).

    Special tokens (`special_ids`' pad, BOS, EOS) are left out; a whitespace piece (a character tokenizer's " ")
    ends a word, a piece starting with whitespace or SentencePiece's "▁" starts one.
    """
    words: list[tuple[str, list[int]]] = []
    new_word = True
    for position, (token, piece) in enumerate(zip(ids, pieces, strict=True)):
        text = piece.replace("\u2581", " ")
        if token in special_ids[:3] or not text.strip():
            new_word = True
            continue
        if new_word or text[0].isspace():
            words.append((text.strip(), [position]))
        else:
            words[-1] = (words[-1][0] + text, [*words[-1][1], position])
        new_word = text[-1].isspace()
    return words


def save_figure(fig, path: Path) -> Path:
    """Writes `fig` (tight layout, 100 dpi) to `path`, closes it, returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path
