import numpy as np
import pytest

from data import DataError, datasets, tokenizers
from data.tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID

UNSEEN = "Ein Mann 中文 ☃ – naïve"


@pytest.fixture(scope="module")
def dates_texts(tfds_data_dir) -> list[str]:
    """dates/tiny training sources and targets."""
    sources, targets = datasets.load("dates/tiny", "train", data_dir=tfds_data_dir).columns()
    return sources + targets


@pytest.fixture(scope="module")
def sp_bpe(dates_texts) -> tokenizers.SentencePieceTokenizer:
    return tokenizers.SentencePieceTokenizer.train(dates_texts, vocab_size=400, model_type="bpe")


def test_special_ids_are_fixed():
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)


# Characters.


def test_char_vocabulary_and_round_trip():
    tok = tokenizers.CharTokenizer.train(["abc", "cab d"])
    assert tok.chars == (" ", "a", "b", "c", "d") and tok.vocab_size == 9
    ids = tok.encode("a dcab")
    assert ids == [5, 4, 8, 7, 5, 6] and min(ids) >= tokenizers.NUM_SPECIAL
    assert tok.decode(ids) == "a dcab"


def test_char_decode_stops_at_eos_and_drops_pad_bos():
    tok = tokenizers.CharTokenizer.train(["ab"])
    ids = [BOS_ID, *tok.encode("ab"), PAD_ID, *tok.encode("b"), EOS_ID, *tok.encode("a")]
    assert tok.decode(ids) == "abb"
    assert tok.decode(np.array(ids, np.int32)) == "abb"


def test_char_unknown_is_unk():
    tok = tokenizers.CharTokenizer.train(["ab"])
    assert tok.encode("axb") == [4, UNK_ID, 5]
    assert tok.decode([4, UNK_ID, 5, 99]) == "a\u2047b\u2047"


def test_char_save_load(tmp_path, dates_texts):
    tok = tokenizers.CharTokenizer.train(dates_texts)
    tok.save(tmp_path)
    loaded = tokenizers.load(tmp_path)
    assert isinstance(loaded, tokenizers.CharTokenizer)
    assert loaded.chars == tok.chars and loaded.encode("3 mai 1979") == tok.encode("3 mai 1979")


# SentencePiece.


def test_sp_has_the_fixed_special_ids_and_vocab_size(sp_bpe):
    assert sp_bpe.vocab_size == 400
    sp = sp_bpe._sp
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]


def test_sp_round_trips_any_text(sp_bpe, dates_texts):
    for text in [*dates_texts[:300], UNSEEN, "  two  spaces ", ""]:
        ids = sp_bpe.encode(text)
        assert UNK_ID not in ids and sp_bpe.decode(ids) == text


def test_sp_learns_pieces(sp_bpe, dates_texts):
    chars = sum(map(len, dates_texts))
    tokens = sum(len(sp_bpe.encode(t)) for t in dates_texts)
    assert tokens < 0.6 * chars


def test_sp_decode_stops_at_eos(sp_bpe):
    ids = sp_bpe.encode("3 May 1979")
    padded = np.array([BOS_ID, *ids, EOS_ID, *sp_bpe.encode("junk"), PAD_ID], np.int32)
    assert sp_bpe.decode(padded) == "3 May 1979"


def test_sp_save_load(tmp_path, sp_bpe):
    sp_bpe.save(tmp_path)
    loaded = tokenizers.load(tmp_path)
    assert loaded.vocab_size == 400 and loaded.encode(UNSEEN) == sp_bpe.encode(UNSEEN)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sp_training_is_deterministic(dates_texts, model_type):
    texts = dates_texts[:600]
    first = tokenizers.SentencePieceTokenizer.train(texts, vocab_size=350, model_type=model_type)
    again = tokenizers.SentencePieceTokenizer.train(texts, vocab_size=350, model_type=model_type)
    assert first.model_proto == again.model_proto and first.vocab_size == 350


def test_sp_nbest_segmentations(sp_bpe, dates_texts):
    unigram = tokenizers.SentencePieceTokenizer.train(dates_texts, vocab_size=400)
    for text in dates_texts[:20]:
        nbest = unigram.nbest(text, 6)
        ids = [i for i, _ in nbest]
        scores = [score for _, score in nbest]
        assert 2 <= len(nbest) <= 6 and ids[0] == unigram.encode(text)
        assert len({tuple(i) for i in ids}) == len(ids)  # distinct
        assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
        assert all(unigram.decode(i) == text for i in ids)
    with pytest.raises(DataError, match="BPE SentencePiece model has no n-best.*unigram"):
        sp_bpe.nbest(dates_texts[0], 4)


# Cache.


def test_build_caches_by_text_and_options(tmp_path, dates_texts, monkeypatch):
    first = tokenizers.build("sentencepiece", dates_texts, cache_dir=tmp_path, vocab_size=400)
    monkeypatch.setattr(
        tokenizers.SentencePieceTokenizer, "train", lambda *a, **k: pytest.fail("retrained")
    )
    again = tokenizers.build("sentencepiece", dates_texts, cache_dir=tmp_path, vocab_size=400)
    assert again.model_proto == first.model_proto
    monkeypatch.undo()
    tokenizers.build("sentencepiece", dates_texts, cache_dir=tmp_path, vocab_size=420)
    tokenizers.build("sentencepiece", dates_texts[1:], cache_dir=tmp_path, vocab_size=400)
    tokenizers.build("char", dates_texts, cache_dir=tmp_path)
    entries = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert entries == ["char", "sentencepiece", "sentencepiece", "sentencepiece"]


# Bad input.


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_arguments(tmp_path, dates_texts):
    assert "unknown tokenizer 'word'" in error(
        tokenizers.build, "word", dates_texts, cache_dir=tmp_path
    )
    assert "unknown sp_model_type 'wordpiece'" in error(
        tokenizers.build,
        "sentencepiece",
        ["a"],
        cache_dir=tmp_path,
        vocab_size=400,
        model_type="wordpiece",
    )
    too_big = error(
        tokenizers.build, "sentencepiece", dates_texts[:50], cache_dir=tmp_path, vocab_size=50_000
    )
    assert "50000 pieces" in too_big and "Please set it to a value <=" in too_big
    assert "is smaller than required" in error(
        tokenizers.SentencePieceTokenizer.train, dates_texts, vocab_size=100
    )
    assert f"no readable tokenizer in {tmp_path / 'nothing'}" in error(
        tokenizers.load, tmp_path / "nothing"
    )


# Real data.


@pytest.mark.parametrize("model_type, language", [("bpe", "en"), ("unigram", "de")])
def test_sp_round_trips_multi30k_validation(multi30k_data_dir, tokenizer_dir, model_type, language):
    """Trained on one language's training split; exact on the validation set of both."""
    train = datasets.load("multi30k/en-de", "train", data_dir=multi30k_data_dir).columns()
    tok = tokenizers.build(
        "sentencepiece",
        train[("en", "de").index(language)],
        cache_dir=tokenizer_dir,
        vocab_size=2000,
        model_type=model_type,
    )
    val_en, val_de = datasets.load(
        "multi30k/en-de", "validation", data_dir=multi30k_data_dir
    ).columns()
    for text in val_en + val_de:
        assert tok.decode(tok.encode(text)) == text
    val = val_en if language == "en" else val_de
    tokens = sum(len(tok.encode(t)) for t in val)
    assert tokens < 0.4 * sum(map(len, val))  # pieces, not bytes or characters
