"""data/digit_captions.py and its path through datasets / pipeline: real sklearn digits composed on a
canvas, the caption grammar, splits disjoint by source image, image batches."""

import itertools

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import DataError, batching, datasets, digit_captions, input_pipeline

SPLITS = digit_captions.SPLITS
NAME = "digit_captions/tiny"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds_digits")
    datasets.prepare(datasets.builder(NAME, data_dir=directory))
    return directory


@pytest.fixture(scope="module")
def examples(data_dir) -> dict[str, list[dict]]:
    """Every digit_captions/tiny example with all its features, per split."""
    out = {}
    for split in SPLITS:
        source = tfds.data_source(NAME, split=split, data_dir=data_dir)
        out[split] = list(source.__getitems__(range(len(source))))
    return out


@pytest.fixture(scope="module")
def sklearn_digits():
    return digit_captions.load_digits()


def config(data_dir, tokenizer_dir, **fields) -> ml_collections.ConfigDict:
    base = dict(
        dataset=NAME,
        data_dir=str(data_dir),
        manual_dir=None,
        tokenizer="char",
        vocab_size=1000,
        sp_model_type="bpe",
        shared_vocab=True,
        tokenizer_dir=str(tokenizer_dir),
        max_len=48,
        batch_size=32,
        tokens_per_batch=0,
        seed=0,
        eval_batch_size=24,
        num_buckets=4,
        lowercase=False,
    )
    return ml_collections.ConfigDict({**base, **fields})


def test_split_sizes_and_features(examples):
    assert {s: len(examples[s]) for s in SPLITS} == {"train": 1000, "validation": 100, "test": 100}
    ex = examples["test"][0]
    assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.uint8
    assert ex["digits"].shape == ex["source_ids"].shape == (4,) and ex["offsets"].shape == (4, 2)


def test_splits_never_share_a_source_image(examples, sklearn_digits):
    _, labels = sklearn_digits
    pools = digit_captions.split_pools(labels)
    # The pools partition the 1,797 images, every class in every pool, about 70/15/15.
    assert sorted(np.concatenate(list(pools.values())).tolist()) == list(range(len(labels)))
    assert {s: len(p) for s, p in pools.items()} == {"train": 1259, "validation": 269, "test": 269}
    for pool in pools.values():
        assert set(labels[pool].tolist()) == set(range(10))
    used = {}
    for split in SPLITS:
        ids = np.concatenate([ex["source_ids"] for ex in examples[split]])
        used[split] = set(ids[ids >= 0].tolist())
        assert used[split] <= set(pools[split].tolist())
    for a, b in itertools.combinations(SPLITS, 2):
        assert not used[a] & used[b], (a, b)
    assert len(used["test"]) > 150  # the test split really draws on its pool


def test_images_are_the_source_digits_at_their_offsets(examples, sklearn_digits):
    images, labels = sklearn_digits
    counts = set()
    for split in SPLITS:
        for ex in examples[split][:200]:
            filled = ex["source_ids"] >= 0
            counts.add(int(filled.sum()))
            np.testing.assert_array_equal(ex["digits"][filled], labels[ex["source_ids"][filled]])
            assert np.all(ex["digits"][~filled] == -1) and np.all(ex["offsets"][~filled] == -1)
            canvas = np.zeros((32, 32), np.uint8)
            for cell in np.flatnonzero(filled):
                top, left = ex["offsets"][cell]
                # Inside its own cell of the 2x2 grid of 16x16 cells.
                assert (top // 16, left // 16) == (cell // 2, cell % 2)
                assert top % 16 <= 8 and left % 16 <= 8
                canvas[top : top + 8, left : left + 8] = images[ex["source_ids"][cell]]
            np.testing.assert_array_equal(ex["image"][..., 0], canvas)
    assert counts == {1, 2, 3, 4}


def test_captions_and_descriptions_follow_the_layout(examples):
    for split in SPLITS:
        for ex in examples[split]:
            digits = ex["digits"].tolist()
            caption = ex["caption"].decode()
            assert caption == digit_captions.caption(digits)
            assert digit_captions.parse_caption(caption) == digits
            marks = ["." if d < 0 else str(d) for d in digits]
            assert ex["description"].decode() == f"{marks[0]} {marks[1]} / {marks[2]} {marks[3]}"


@pytest.mark.parametrize(
    "digits, expected",
    [
        ([7, 2, -1, -1], "seven left of two at the top"),
        ([3, -1, 5, 1], "three on the left above five left of one"),
        ([-1, -1, -1, 4], "four on the right at the bottom"),
        ([3, 8, 6, 0], "three left of eight above six left of zero"),
        ([-1, 9, 1, -1], "nine on the right above one on the left"),
    ],
)
def test_caption_grammar_examples(digits, expected):
    assert digit_captions.caption(digits) == expected


def test_captions_determine_the_layout():
    """Every occupancy pattern and digit choice gives its own caption, and parsing inverts it."""
    seen = {}
    for pattern in range(1, 16):
        cells = [c for c in range(4) if pattern >> c & 1]
        for values in itertools.product((0, 1, 7), repeat=len(cells)):
            digits = [-1] * 4
            for cell, value in zip(cells, values, strict=True):
                digits[cell] = value
            text = digit_captions.caption(digits)
            assert text not in seen, (text, digits, seen.get(text))
            seen[text] = digits
            assert digit_captions.parse_caption(text) == digits
    assert len(seen) == sum(3 ** bin(p).count("1") for p in range(1, 16))


@pytest.mark.parametrize(
    "text", ["seven", "seven left of at the top", "ten on the left at the top", "two above one"]
)
def test_parse_rejects_non_captions_in_one_line(text):
    with pytest.raises(ValueError, match="is not a caption of the digit_captions grammar") as e:
        digit_captions.parse_caption(text)
    assert "\n" not in str(e.value)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="needs at least one digit"):
        digit_captions.caption([-1, -1, -1, -1])
    with pytest.raises(ValueError, match="must be 4 values in -1..9"):
        digit_captions.caption([10, -1, -1, -1])


def test_generation_is_deterministic_in_the_seed():
    sizes = {"train": 5, "test": 3}
    first, again = digit_captions.generate(sizes), digit_captions.generate(sizes)
    other = digit_captions.generate(sizes, seed=digit_captions.SEED + 1)
    for split in ("train", "test"):
        assert [ex["caption"] for ex in first[split]] == [ex["caption"] for ex in again[split]]
        for a, b in zip(first[split], again[split], strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
    assert [ex["caption"] for ex in first["train"]] != [ex["caption"] for ex in other["train"]]
    # A split does not depend on the other splits' sizes.
    alone = digit_captions.generate({"test": 3})["test"]
    assert [ex["caption"] for ex in alone] == [ex["caption"] for ex in first["test"]]


def test_load_gives_image_caption_pairs(data_dir):
    pairs = datasets.load(NAME, "validation", data_dir=data_dir)
    assert isinstance(pairs, datasets.ImageCaptionPairs) and len(pairs) == 100
    image, caption = pairs[3]
    assert image.shape == (32, 32, 1) and image.dtype == np.uint8 and isinstance(caption, str)
    images, captions, descriptions = pairs.columns()
    assert images.shape == (100, 32, 32, 1) and captions[3] == caption
    np.testing.assert_array_equal(images[3], image)
    assert digit_captions.parse_caption(caption) == [
        -1 if mark == "." else int(mark) for mark in descriptions[3].replace("/ ", "").split()
    ]
    with pytest.raises(DataError, match="unknown config or version in 'digit_captions/huge'"):
        datasets.load("digit_captions/huge", "train", data_dir=data_dir)


def test_image_batches_hold_the_images_and_their_captions(data_dir, tmp_path):
    data = input_pipeline.get_datasets(config(data_dir, tmp_path))
    assert data.src_tokenizer is data.tgt_tokenizer
    assert data.stats["train_kept"] == 1000 and data.stats["validation_examples"] == 100
    images, captions, _ = datasets.load(NAME, "train", data_dir=data_dir).columns()
    by_caption = {}
    for image, caption in zip(images, captions, strict=True):
        by_caption.setdefault(caption, []).append(image.astype(np.float32) / 255)
    batch = next(data.train.iterator())
    assert set(batch) == {"src", "tgt_in", "tgt_out"}
    assert batch["src"].dtype == np.float32 and batch["src"].shape[1:] == (32, 32, 1)
    assert batching.BatchShape(batch["src"].shape[0], 0, batch["tgt_in"].shape[1]) in set(
        data.train.batch_shapes()
    )
    for src, tgt_out in zip(batch["src"], batch["tgt_out"], strict=True):
        caption = data.tgt_tokenizer.decode(tgt_out)
        assert any(np.array_equal(src, image) for image in by_caption[caption])


def test_eval_data_describes_each_image(data_dir, tmp_path):
    data = input_pipeline.get_datasets(config(data_dir, tmp_path))
    _, captions, descriptions = datasets.load(NAME, "test", data_dir=data_dir).columns()
    ev = data.eval["test"]
    assert ev.sources == descriptions and ev.references == captions
    assert {s.src_len for s in ev.batch_shapes} == {0}  # images: no source length, any bucket
    rows = [(b["src"][r], b["tgt_out"][r]) for b in ev.batches for r in np.flatnonzero(b["mask"])]
    assert [data.tgt_tokenizer.decode(t) for _, t in rows] == captions
    last = ev.batches[-1]  # 100 = 4 x 24 + 4: the last batch has 20 filler rows, blank images
    assert int(last["mask"].sum()) == 4 and not last["src"][~last["mask"]].any()
