"""Attention heatmaps of a run teacher-forced on its own outputs (text or image sources)."""

from pathlib import Path

import jax
import numpy as np

from decoding import scoring
from evaluation.loading import Run, notice
from experiment import plots


def plot_attention(run: Run, eval_data, sequences, count: int, directory: Path) -> list[Path]:
    """Attention of the model teacher-forced on its own outputs for the first `count` examples, one
    PNG per example: heatmaps over source tokens, or over the image's feature grid per word."""
    directory.mkdir(parents=True, exist_ok=True)
    batch = eval_data.batches[0]
    count = min(count, int(batch["mask"].sum()), len(sequences))
    hyps = np.asarray(sequences[:count])
    ids = run.special_ids
    lengths = np.asarray(scoring.sequence_lengths(hyps, ids.eos, ids.pad))
    tgt_in = np.zeros_like(hyps)
    tgt_in[:, 0] = ids.bos
    tgt_in[:, 1:] = hyps[:, :-1]
    tgt_in = np.where(np.arange(hyps.shape[1]) < lengths[:, None], tgt_in, ids.pad)
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
            words = plots.word_spans(ids, run.tgt_tokenizer.pieces(ids), run.special_ids)
            panels = [(name, weights[i]) for name, weights in rows]
            caption = run.tgt_tokenizer.decode(ids)
            path = directory / f"attention_{i}.png"
            paths.append(plots.image_attention(image, caption, words, panels, grid, path))
        return paths
    for i in range(count):
        src_len = int((src[i] != ids.pad).sum())
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
