import logging

import numpy as np
import pytest

from data import DataError, batching, datasets, input_pipeline, tokenizers


def real_rows(batch):
    """Indices of the rows that hold an example (not filler)."""
    return np.flatnonzero(batch["tgt_out"].any(axis=1))


def decoded_pairs(data, batch) -> list[tuple[str, str]]:
    return [
        (data.src_tokenizer.decode(batch["src"][r]), data.tgt_tokenizer.decode(batch["tgt_out"][r]))
        for r in real_rows(batch)
    ]


def test_dates_datasets(dates_data, tfds_data_dir):
    assert isinstance(dates_data.src_tokenizer, tokenizers.CharTokenizer)
    assert dates_data.tgt_tokenizer.vocab_size == 4 + 11  # digits and "-"
    assert dates_data.stats == {
        "train_examples": 2000,
        "train_kept": 2000,
        "train_dropped": 0,
        "validation_examples": 200,
        "validation_truncated": 0,
        "test_examples": 200,
        "test_truncated": 0,
    }
    assert set(dates_data.eval) == {"validation", "test"}


def test_train_batches_hold_real_pairs(dates_data, tfds_data_dir):
    train_pairs = dict(zip(*datasets.load("dates/tiny", "train", data_dir=tfds_data_dir).columns()))
    iterator = dates_data.train.iterator()
    seen = set()
    for _ in range(dates_data.train.batches_per_epoch):
        batch = next(iterator)
        assert set(batch) == {"src", "tgt_in", "tgt_out"}
        assert all(v.dtype == np.int32 for v in batch.values())
        assert batching.BatchShape(*batch["src"].shape, batch["tgt_in"].shape[1]) in set(
            dates_data.train.batch_shapes()
        )
        for source, target in decoded_pairs(dates_data, batch):
            assert train_pairs[source] == target
            seen.add(source)
    assert seen == set(train_pairs)  # one epoch covers the training set


def test_eval_batches_are_the_split_in_order(dates_data, tfds_data_dir):
    for split, ev in dates_data.eval.items():
        sources, references = datasets.load("dates/tiny", split, data_dir=tfds_data_dir).columns()
        assert ev.sources == sources and ev.references == references
        pairs = [pair for batch in ev.batches for pair in decoded_pairs(dates_data, batch)]
        assert pairs == list(zip(sources, references, strict=True))
        assert sum(int(b["mask"].sum()) for b in ev.batches) == len(sources)
        assert {b["src"].shape[0] for b in ev.batches} == {32}


def test_batching_by_tokens_on_devices(dates_config):
    config = dates_config(tokens_per_batch=640, eval_batch_size=30)
    data = input_pipeline.get_datasets(config, batch_multiple=8)
    shapes = data.train.batch_shapes()
    assert all(s.batch_size % 8 == 0 and s.batch_size * max(s[1:]) <= 640 for s in shapes)
    assert {b["src"].shape[0] for b in data.eval["validation"].batches} == {32}  # rounded up


def test_long_examples_dropped_and_logged(dates_config, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    data = input_pipeline.get_datasets(dates_config(max_len=16))
    dropped = data.stats["train_dropped"]
    assert 0 < dropped < 2000 and data.stats["train_kept"] == 2000 - dropped
    assert f"kept {2000 - dropped} of 2000 examples, dropped {dropped} longer than max_len=16" in (
        caplog.text
    )
    assert data.stats["validation_truncated"] > 0  # evaluation keeps them, truncated
    assert all(max(s[1:]) <= 16 for s in data.train.batch_shapes())


def test_shared_vocabulary(dates_config):
    data = input_pipeline.get_datasets(dates_config(shared_vocab=True))
    assert data.src_tokenizer is data.tgt_tokenizer
    assert data.src_tokenizer.encode("2031") == data.tgt_tokenizer.encode("2031")


def test_same_config_same_batches(dates_config, dates_data):
    again = input_pipeline.get_datasets(dates_config())
    first, second = dates_data.train.iterator(), again.train.iterator()
    for _ in range(3):
        a, b = next(first), next(second)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_bad_config(dates_config):
    with pytest.raises(DataError, match="unknown tokenizer 'words'"):
        input_pipeline.get_datasets(dates_config(tokenizer="words"))
    with pytest.raises(DataError, match="unknown config or version in 'dates/tinyy'"):
        input_pipeline.get_datasets(dates_config(dataset="dates/tinyy"))
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        input_pipeline.get_datasets(dates_config(max_len=1))


def test_multi30k_sentencepiece(multi30k_data, multi30k_data_dir):
    data = multi30k_data
    assert isinstance(data.src_tokenizer, tokenizers.SentencePieceTokenizer)
    assert data.src_tokenizer.vocab_size == data.tgt_tokenizer.vocab_size == 1000
    assert data.stats["train_examples"] == 29_000 and data.stats["train_dropped"] < 300
    assert len(data.train.batch_shapes()) <= batching.DEFAULT_NUM_BUCKETS
    ev = data.eval["test"]
    assert len(ev.sources) == 1000
    pairs = [pair for batch in ev.batches for pair in decoded_pairs(data, batch)]
    whole = [i for i, (s, _) in enumerate(pairs) if len(data.src_tokenizer.encode(s)) < 64]
    assert len(whole) > 990
    assert all(pairs[i] == (ev.sources[i], ev.references[i]) for i in whole)


def test_lowercase_changes_what_the_model_reads_not_the_references(dates_config, tfds_data_dir):
    data = input_pipeline.get_datasets(dates_config(lowercase=True))
    alphabet = data.src_tokenizer.pieces(range(4, data.src_tokenizer.vocab_size))
    assert any(c.isalpha() for c in alphabet) and not any(c.isupper() for c in alphabet)
    validation = data.eval["validation"]
    sources, references = datasets.load(
        "dates/tiny", "validation", data_dir=tfds_data_dir
    ).columns()
    assert validation.sources == sources and validation.references == references  # as they are
    assert any(s != s.lower() for s in sources)
    read = [data.src_tokenizer.decode(row) for row in validation.batches[0]["src"]]
    assert read[:5] == [s.lower() for s in sources[:5]]


def test_subword_sampling_reads_the_same_text_in_other_pieces(dates_config):
    fields = dict(tokenizer="sentencepiece", sp_model_type="unigram", vocab_size=400)
    plain = input_pipeline.get_datasets(dates_config(**fields))
    sampled = input_pipeline.get_datasets(
        dates_config(**fields, sp_sampling_nbest=4, sp_sampling_alpha=0.0)
    )
    for step in (0, 1, plain.train.batches_per_epoch):
        a, b = plain.train.global_batch(step), sampled.train.global_batch(step)
        assert decoded_pairs(plain, a) == decoded_pairs(sampled, b)
        assert not np.array_equal(a["src"], b["src"]) and not np.array_equal(
            a["tgt_in"], b["tgt_in"]
        )
    for a, b in zip(plain.eval["validation"].batches, sampled.eval["validation"].batches):
        assert all(np.array_equal(a[k], b[k]) for k in a)  # evaluation reads the best
    with pytest.raises(DataError, match="SentencePiece tokenizers.*sp_sampling_nbest=0"):
        input_pipeline.get_datasets(dates_config(sp_sampling_nbest=4))
    with pytest.raises(DataError, match="BPE SentencePiece model has no n-best"):
        input_pipeline.get_datasets(
            dates_config(**fields | {"sp_model_type": "bpe"}, sp_sampling_nbest=4)
        )
    with pytest.raises(ValueError, match="sp_sampling_nbest must be 0 \\(off\\) or >= 2, got 1"):
        input_pipeline.get_datasets(dates_config(**fields, sp_sampling_nbest=1))
