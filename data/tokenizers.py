"""Tokenizers: seqzoo's SentencePiece (unigram or BPE) and characters, and an imported Marian model's.

Every tokenizer has `vocab_size`, `special_ids` (`contracts.SpecialIds`), `encode(text) -> list[int]`
(no BOS/EOS added), `decode(ids) -> str` (stops at the first EOS, drops PAD and BOS), `pieces(ids)`,
`save(directory)`; `load(directory)` reads any kind back; a unigram SentencePiece model also gives
its n-best segmentations (`nbest`, for subword sampling). seqzoo's own kinds have ids 0-3 = PAD, BOS,
EOS, UNK (`contracts.SEQZOO_IDS`); a `MarianTokenizer` keeps the ids of the model it came with.

SentencePiece is trained with byte fallback, identity normalization and whitespace kept as is, so
`decode(encode(text)) == text` for any text: BLEU is computed on the real strings, and characters
unseen in training become bytes rather than UNK. `build` trains a tokenizer once per (training text,
options) and caches it in a directory named by their hash.
"""

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from contracts import (  # noqa: F401 (re-exported)
    BOS_ID,
    EOS_ID,
    NUM_SPECIAL,
    PAD_ID,
    SEQZOO_IDS,
    UNK_ID,
    SpecialIds,
)
from data import DataError

UNK_TEXT = "\u2047"  # "⁇", what SentencePiece decodes UNK to
SPECIAL_NAMES = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>", UNK_ID: "<unk>"}
KINDS = ("char", "sentencepiece")  # what `build` trains; "marian" tokenizers are imported
SP_MODEL_TYPES = ("unigram", "bpe")
SP_SEED = 0
SP_MAX_SENTENCES = 2_000_000  # SentencePiece samples this many sentences from larger corpora
SP_NUM_THREADS = 8  # fixed, not the core count: the trained model depends on it
_META = "tokenizer.json"
_SP_MODEL = "spm.model"
_CACHE_FORMAT = 1  # bump when training changes, so old caches are not reused


class Tokenizer(Protocol):
    vocab_size: int
    special_ids: SpecialIds

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def pieces(self, ids: Iterable[int]) -> list[str]: ...

    def save(self, directory: str | os.PathLike) -> None: ...


def content_ids(ids: Iterable[int], special_ids: SpecialIds = SEQZOO_IDS) -> list[int]:
    """`ids` up to the first EOS, without PAD and BOS (accepts lists and numpy arrays)."""
    out = []
    for i in map(int, ids):
        if i == special_ids.eos:
            break
        if i not in (special_ids.pad, special_ids.bos):
            out.append(i)
    return out


class CharTokenizer:
    """One id per character; characters outside the vocabulary map to UNK."""

    kind = "char"
    special_ids = SEQZOO_IDS

    def __init__(self, chars: Sequence[str]):
        """`chars`: the vocabulary after the four special ids (id 4 is `chars[0]`)."""
        self.chars = tuple(chars)
        self._ids = {c: i for i, c in enumerate(self.chars, start=NUM_SPECIAL)}
        self.vocab_size = NUM_SPECIAL + len(self.chars)

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        """The vocabulary of every character in `texts`, sorted."""
        chars = set()
        for text in texts:
            chars.update(text)
        return cls(sorted(chars))

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, UNK_ID) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.chars)
        return "".join(
            self.chars[i - NUM_SPECIAL] if NUM_SPECIAL <= i < NUM_SPECIAL + n else UNK_TEXT
            for i in content_ids(ids)
        )

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """The token of each id, specials by name (`<eos>`): axis labels for attention plots."""
        n = len(self.chars)
        return [
            self.chars[i - NUM_SPECIAL] if NUM_SPECIAL <= i < NUM_SPECIAL + n else SPECIAL_NAMES[i]
            for i in map(int, ids)
        ]

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "chars": list(self.chars)}
        (path / _META).write_text(json.dumps(meta, ensure_ascii=False))


class SentencePieceTokenizer:
    """A SentencePiece model (unigram or BPE) trained with the fixed special ids."""

    kind = "sentencepiece"
    special_ids = SEQZOO_IDS

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        specials = [self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()]
        if specials != [PAD_ID, BOS_ID, EOS_ID, UNK_ID]:
            raise DataError(
                f"SentencePiece model has special ids pad/bos/eos/unk={specials}, not 0/1/2/3: "
                "train it with SentencePieceTokenizer.train"
            )

    @classmethod
    def train(
        cls, texts: Iterable[str], *, vocab_size: int, model_type: str = "unigram"
    ) -> "SentencePieceTokenizer":
        """Trains on `texts` (deterministic: SentencePiece's sampling is seeded)."""
        if model_type not in SP_MODEL_TYPES:
            raise DataError(
                f"unknown sp_model_type {model_type!r}: use one of {', '.join(SP_MODEL_TYPES)}"
            )
        spm.set_random_generator_seed(SP_SEED)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                pad_id=PAD_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                byte_fallback=True,
                character_coverage=1.0,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                input_sentence_size=SP_MAX_SENTENCES,
                shuffle_input_sentence=True,
                num_threads=SP_NUM_THREADS,
                minloglevel=2,
            )
        except RuntimeError as e:
            reason = str(e).split("] ")[-1].splitlines()[0]
            raise DataError(
                f"cannot train a SentencePiece vocabulary of {vocab_size} pieces on this text: "
                f"{reason} (change vocab_size)"
            ) from None
        return cls(model.getvalue())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def nbest(self, text: str, n: int) -> list[tuple[list[int], float]]:
        """Up to `n` segmentations of `text`, best first (the first is `encode`'s), each with its
        log-probability under the unigram model. Raises DataError for a BPE model (it has none)."""
        try:
            result = self._sp.nbest_encode(text, nbest_size=n, return_type="proto")
        except RuntimeError:
            raise DataError(
                "a BPE SentencePiece model has no n-best segmentations: use sp_model_type='unigram' "
                "for subword sampling (or set sp_sampling_nbest=0)"
            ) from None
        return [([piece.id for piece in s.pieces], s.score) for s in result.nbests]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [i if 0 <= i < self.vocab_size else UNK_ID for i in content_ids(ids)]
        return self._sp.decode(ids)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """The piece of each id (`▁word`, `<eos>`): axis labels for attention plots."""
        return [self._sp.id_to_piece(i) for i in map(int, ids)]

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / _SP_MODEL).write_bytes(self.model_proto)
        (path / _META).write_text(json.dumps({"kind": self.kind, "model": _SP_MODEL}))


MARIAN_SPECIAL_PIECES = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}


class MarianTokenizer:
    """One side of a Marian (opus-mt) model: its SentencePiece model splits text into pieces and the
    model's vocabulary (`vocab.json`, piece -> id) numbers them, as transformers' `MarianTokenizer`
    does: the ids are the model's own, not SentencePiece's (`special_ids`: pad, EOS and UNK are the
    vocabulary's `<pad>`, `</s>`, `<unk>`; BOS is the model's decoder start). A leading language
    code (`>>fr<<`, multilingual models) is one vocabulary token.
    """

    kind = "marian"

    def __init__(self, model_proto: bytes, vocab: dict[str, int], bos_id: int, name: str = "vocab"):
        missing = [p for p in MARIAN_SPECIAL_PIECES.values() if p not in vocab]
        if missing:
            raise DataError(
                f"{name} has no {', '.join(missing)} entry: a Marian vocabulary names its special "
                "pieces <pad>, </s> and <unk>"
            )
        self.model_proto = model_proto
        self.vocab = dict(vocab)
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._pieces = {i: piece for piece, i in self.vocab.items()}
        self.vocab_size = max(self.vocab.values()) + 1
        ids = {field: self.vocab[piece] for field, piece in MARIAN_SPECIAL_PIECES.items()}
        self.special_ids = SpecialIds(ids["pad"], int(bos_id), ids["eos"], ids["unk"])

    def encode(self, text: str) -> list[int]:
        ids = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            ids.append(self.vocab.get(text[: end + 2], self.special_ids.unk))
            text = text[end + 2 :]
        unk = self.special_ids.unk
        return ids + [self.vocab.get(p, unk) for p in self._sp.encode(text, out_type=str)]

    def decode(self, ids: Iterable[int]) -> str:
        # <unk> is dropped, as transformers' batch_decode(skip_special_tokens=True) drops it
        # (`pieces` keeps it: eval.py's jsonl tokens show it).
        unk = self.special_ids.unk
        pieces = self.pieces([i for i in content_ids(ids, self.special_ids) if i != unk])
        # A shared vocabulary holds the other side's pieces too, which this side's SentencePiece
        # model leaves as they are: their word marks become spaces, as transformers does it.
        return self._sp.decode_pieces(pieces).replace("\u2581", " ").strip()

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self._pieces.get(i, MARIAN_SPECIAL_PIECES["unk"]) for i in map(int, ids)]

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / _SP_MODEL).write_bytes(self.model_proto)
        (path / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False))
        meta = {"kind": self.kind, "model": _SP_MODEL, "vocab": "vocab.json"}
        (path / _META).write_text(json.dumps(meta | {"bos_id": self.special_ids.bos}))


def load(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in `directory` by `save`."""
    path = Path(directory)
    try:
        meta = json.loads((path / _META).read_text(encoding="utf-8"))
        if meta["kind"] == CharTokenizer.kind:
            chars = meta["chars"]
            if chars != sorted(set(chars)) or not all(len(c) == 1 for c in chars):
                raise ValueError("its chars are not the sorted distinct characters `train` writes")
            return CharTokenizer(chars)
        model = (path / meta["model"]).read_bytes()
        if meta["kind"] == MarianTokenizer.kind:
            vocab = json.loads((path / meta["vocab"]).read_text(encoding="utf-8"))
            return MarianTokenizer(model, vocab, meta["bos_id"])
        if meta["kind"] != SentencePieceTokenizer.kind:
            raise ValueError(f"its kind {meta['kind']!r} is none of {KINDS} or 'marian'")
        return SentencePieceTokenizer(model)
    # TypeError: a file of another structure; RuntimeError: a SentencePiece model that does not parse
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise DataError(
            f"no readable tokenizer in {path} ({type(e).__name__}: {e}): point to a directory "
            "written by Tokenizer.save, or delete it to retrain"
        ) from None


def _train(kind: str, texts: Sequence[str], vocab_size: int | None, model_type: str) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.train(texts)
    if not vocab_size or vocab_size <= NUM_SPECIAL:
        raise DataError(f"vocab_size {vocab_size} is too small for sentencepiece: use e.g. 8000")
    return SentencePieceTokenizer.train(texts, vocab_size=vocab_size, model_type=model_type)


def build(
    kind: str,
    texts: Sequence[str],
    *,
    cache_dir: str | os.PathLike,
    vocab_size: int | None = None,
    model_type: str = "unigram",
) -> Tokenizer:
    """A tokenizer of `kind` ("char" or "sentencepiece") trained on `texts`, cached in `cache_dir`.

    The cache entry is `cache_dir/<kind>-<hash of (options, texts)>`: the same texts and options
    load the saved tokenizer instead of training again (concurrent builders are safe: each writes a
    temporary directory and renames it). `vocab_size` and `model_type` apply to SentencePiece.
    """
    if kind not in KINDS:
        raise DataError(f"unknown tokenizer {kind!r}: use one of {', '.join(KINDS)}")
    options = {"kind": kind, "format": _CACHE_FORMAT}
    if kind == "sentencepiece":
        options.update(vocab_size=vocab_size, model_type=model_type)
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    directory = Path(cache_dir) / f"{kind}-{digest.hexdigest()[:16]}"
    if (directory / _META).exists():
        return load(directory)
    tokenizer = _train(kind, texts, vocab_size, model_type)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
        tokenizer.save(tmp)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process saved it first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise DataError(
            f"cannot write tokenizer to {directory} ({e.strerror or e}): set a writable "
            "tokenizer_dir"
        ) from None
    return tokenizer
