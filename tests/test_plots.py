"""experiment/plots.py: the word grouping the image-attention figures use, and what each figure draws."""

import numpy as np
import pytest

from data import tokenizers
from experiment import plots


def test_word_spans_group_tokens_into_words():
    chars = tokenizers.CharTokenizer(sorted(set("two left of")))
    ids = chars.encode("two left") + [tokenizers.EOS_ID]
    assert plots.word_spans(ids, chars.pieces(ids)) == [
        ("two", [0, 1, 2]),
        ("left", [4, 5, 6, 7]),
    ]
    pieces = ["\u2581two", "\u2581le", "ft", "\u2581", "of", "<eos>"]
    assert plots.word_spans([4, 5, 6, 7, 8, 2], pieces) == [
        ("two", [0]),
        ("left", [1, 2]),
        ("of", [4]),
    ]


@pytest.fixture
def drawn(monkeypatch):
    """The figures `plots` saves, kept open for the test to read (`list` of Figures)."""
    figures = []

    def keep(fig, path):
        figures.append(fig)
        fig.savefig(path, dpi=50)
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    yield figures
    for fig in figures:
        plots._pyplot().close(fig)


def test_learning_curves_plot_each_split_against_steps(tmp_path, drawn):
    records = [
        {"step": 10, "split": "train", "loss": 2.0},
        {"step": 20, "split": "train", "loss": 1.8},
        {"step": 20, "split": "validation", "loss": 1.5, "bleu": 12.0},
        {"step": 40, "split": "validation", "loss": 1.2, "bleu": 17.5},
    ]
    path = plots.learning_curves(records, "bleu", tmp_path / "curves.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    [fig] = drawn
    loss, metric = fig.axes
    train, validation = (line.get_xydata().tolist() for line in loss.lines)
    assert train == [[10, 2.0], [20, 1.8]] and validation == [[20, 1.5], [40, 1.2]]
    assert [line.get_xydata().tolist() for line in metric.lines] == [[[20, 12.0], [40, 17.5]]]
    assert metric.get_ylabel() == "bleu"


def test_learning_curves_lead_with_the_runs_metric_and_plot_the_others_beside_it(tmp_path, drawn):
    # metrics.jsonl rows of a lowercased run judged by bleu_lc_tok (its cased bleu is low).
    records = [{"step": 10, "split": "train", "loss": 2.0, "tokens": 300, "elapsed_s": 3.0}]
    for step, bleu, bleu_lc_tok, chrf in ((10, 6.5, 30.0, 50.0), (20, 9.1, 42.5, 60.0)):
        scores = {
            "loss": 1.0,
            "bleu": bleu,
            "bleu_signature": "nrefs:1",
            "bleu_lc_tok": bleu_lc_tok,
        }
        scores.update(chrf=chrf, elapsed_s=float(step))
        records.append({"step": step, "split": "validation", **scores})
    plots.learning_curves(records, "bleu_lc_tok", tmp_path / "curves.png")
    [fig] = drawn
    _, metric, others = fig.axes
    assert (metric.get_title(), metric.get_ylabel()) == ("Validation bleu_lc_tok", "bleu_lc_tok")
    assert [line.get_xydata().tolist() for line in metric.lines] == [[[10, 30.0], [20, 42.5]]]
    assert [line.get_label() for line in others.lines] == ["bleu", "chrf"]
    assert [line.get_xydata().tolist() for line in others.lines] == [
        [[10, 6.5], [20, 9.1]],
        [[10, 50.0], [20, 60.0]],
    ]


def test_quality_curves_plot_validation_against_wall_time_and_tokens_seen(tmp_path, drawn):
    records = [
        {"step": 10, "split": "train", "loss": 2.0, "tokens": 300, "elapsed_s": 30.0},
        {"step": 20, "split": "train", "loss": 1.8, "tokens": 200, "elapsed_s": 50.0},
        {"step": 20, "split": "validation", "loss": 1.5, "bleu": 12.0, "elapsed_s": 60.0},
        {"step": 30, "split": "train", "loss": 1.6, "tokens": 500, "elapsed_s": 90.0},
        {"step": 30, "split": "validation", "loss": 1.4, "bleu": 15.0, "elapsed_s": 120.0},
    ]
    plots.quality_curves({"en-de": records}, "bleu", tmp_path / "q.png")
    [fig] = drawn
    by_time, by_tokens = fig.axes
    assert by_time.lines[0].get_xydata().tolist() == [[1.0, 12.0], [2.0, 15.0]]
    assert by_tokens.lines[0].get_xydata().tolist() == [[500e-6, 12.0], [1000e-6, 15.0]]


def test_text_attention_shows_each_panel_over_its_pieces(tmp_path, drawn):
    rng = np.random.default_rng(0)
    weights = [rng.uniform(size=(3, 5)) for _ in range(2)]  # padded past 2 x 4
    panels = [("layer 0", weights[0]), ("layer 1", weights[1])]
    plots.text_attention(["a", "b", "c", "d"], ["x", "y"], panels, tmp_path / "t.png")
    [fig] = drawn
    for ax, (name, w) in zip(fig.axes, panels, strict=True):
        np.testing.assert_array_equal(ax.images[0].get_array(), w[:2, :4])
        assert ax.get_title() == name
        assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c", "d"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "y"]


def test_image_attention_overlays_each_words_mean_attention_on_the_grid(tmp_path, drawn):
    weights = np.arange(12, dtype=float).reshape(3, 4) / 12  # 3 tokens over a 2x2 grid
    words = [("x", [0]), ("yz", [1, 2])]
    plots.image_attention(
        np.ones((8, 8, 3)), "x yz", words, [("layer 0", weights)], (2, 2), tmp_path / "i.png"
    )
    [fig] = drawn
    image_ax, x_ax, yz_ax = fig.axes
    assert [ax.get_title() for ax in (image_ax, x_ax, yz_ax)] == ["layer 0", "x", "yz"]
    np.testing.assert_allclose(x_ax.images[1].get_array(), weights[0].reshape(2, 2))
    np.testing.assert_allclose(yz_ax.images[1].get_array(), weights[1:].mean(0).reshape(2, 2))
