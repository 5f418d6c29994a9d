"""plots.py: the word grouping the image-attention figures use, and that figures get written."""

import numpy as np

import plots
from data import tokenizers


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


def test_figures_are_written(tmp_path):
    records = [
        {"step": 10, "split": "train", "loss": 2.0},
        {"step": 20, "split": "validation", "loss": 1.5, "bleu": 12.0},
    ]
    curves = plots.learning_curves(records, "bleu", tmp_path / "curves.png")
    weights = np.full((3, 4), 0.25)
    text = plots.text_attention(
        ["a", "b", "c", "d"], ["x", "y"], [("layer 0", weights)], tmp_path / "t.png"
    )
    image = plots.image_attention(
        np.ones((8, 8, 3)),
        "x y",
        [("x", [0]), ("y", [1])],
        [("layer 0", weights)],
        (2, 2),
        tmp_path / "i.png",
    )
    for path in (curves, text, image):
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 1000
