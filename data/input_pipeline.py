"""`get_datasets(config)`: tokenizers, the training iterator and evaluation batches for a run.

    data = get_datasets(config)
    it = data.train.iterator()              # grain DatasetIterator; checkpoint it with orbax
    batch = next(it)                        # {"src", "tgt_in", "tgt_out"}: int32 numpy arrays
    shapes = data.train.batch_shapes()      # every global batch shape, to warm up jit
    for batch in data.eval["validation"].batches: ...   # plus "mask"; .sources / .references
    text = data.tgt_tokenizer.decode(ids)

Config fields: `dataset`, `data_dir`, `manual_dir`, `tokenizer` ("char" | "sentencepiece"),
`vocab_size`, `sp_model_type` ("unigram" | "bpe"), `shared_vocab`, `tokenizer_dir`, `max_len`,
`batch_size`, `tokens_per_batch`, `num_buckets`, `seed`; optional `eval_batch_size` (default:
batch_size), `sp_sampling_nbest` and `sp_sampling_alpha` (subword sampling of the training text:
`nbest_segmentations`; default 0, off). `max_len` bounds every array length: a training example
is dropped when its source + EOS or BOS + target is longer; evaluation examples are truncated
instead (the reference strings stay whole).

Image captioning datasets (`digit_captions`): batches hold float32 images `src [batch, height, width,
channels]` and the tokenized caption as target (data/batching.py); one tokenizer, trained on the
training captions, is both `src_tokenizer` and `tgt_tokenizer`; an eval split's `sources` are the
text descriptions of its images (for reports) and its `references` the captions.
"""

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging

from data import DataError, batching, datasets, examples, segmentations, tokenizers

EVAL_SPLITS = ("validation", "test")
DEFAULT_TOKENIZER_DIR = Path.home() / ".cache" / "seqzoo" / "tokenizers"


@dataclasses.dataclass(frozen=True)
class Datasets:
    """Everything a run reads: see the module docstring."""

    train: batching.TrainPipeline  # .iterator(shard_index, shard_count), .batch_shapes()
    eval: dict[str, batching.EvalData]  # the dataset's splits among EVAL_SPLITS
    src_tokenizer: tokenizers.Tokenizer
    tgt_tokenizer: tokenizers.Tokenizer
    stats: dict[str, int]


def build_tokenizers(
    config, sources: Sequence[str], targets: Sequence[str]
) -> tuple[tokenizers.Tokenizer, tokenizers.Tokenizer]:
    """(source, target) tokenizers trained on the training texts, one shared or one per side; with
    `config.init_from`, that run's tokenizers (fine-tuning keeps the vocabulary)."""
    if config.get("init_from"):
        directory = Path(config.init_from) / "tokenizer"
        return tokenizers.load(directory / "src"), tokenizers.load(directory / "tgt")
    options = dict(
        cache_dir=config.tokenizer_dir or DEFAULT_TOKENIZER_DIR,
        vocab_size=config.vocab_size,
        model_type=config.sp_model_type,
    )
    if config.shared_vocab:
        shared = tokenizers.build(config.tokenizer, [*sources, *targets], **options)
        return shared, shared
    src = tokenizers.build(config.tokenizer, sources, **options)
    return src, tokenizers.build(config.tokenizer, targets, **options)


def cased(config, texts: Sequence[str]) -> list[str]:
    """`texts` as the model reads them: lowercased with `config.lowercase`, else as they are. Only
    what is tokenized changes: the references BLEU is computed against keep their case."""
    return [t.lower() for t in texts] if config.lowercase else list(texts)


def tokenize(
    src_tokenizer: tokenizers.Tokenizer,
    tgt_tokenizer: tokenizers.Tokenizer,
    sources: Sequence[str],
    targets: Sequence[str],
) -> examples.Tokenized:
    return examples.Tokenized.from_lists(
        [src_tokenizer.encode(s) for s in sources],
        [tgt_tokenizer.encode(t) for t in targets],
        special_ids(src_tokenizer, tgt_tokenizer),
    )


def nbest_segmentations(
    config, src_tokenizer, tgt_tokenizer, sources: Sequence[str], targets: Sequence[str]
) -> segmentations.Segmentations:
    """Subword sampling (Kudo 2018): the `config.sp_sampling_nbest` best segmentations of every
    training pair, which training batches draw from with `config.sp_sampling_alpha` (0: uniformly,
    larger: nearer the best one); evaluation reads the best. Needs unigram SentencePiece tokenizers.
    """
    n = config.sp_sampling_nbest
    if n < 2:
        raise ValueError(f"sp_sampling_nbest must be 0 (off) or >= 2, got {n}")
    if not all(
        isinstance(t, tokenizers.SentencePieceTokenizer) for t in (src_tokenizer, tgt_tokenizer)
    ):
        raise DataError(
            "subword sampling needs seqzoo's SentencePiece tokenizers (tokenizer='sentencepiece'): "
            "set sp_sampling_nbest=0"
        )
    return segmentations.Segmentations.from_nbest(
        [src_tokenizer.nbest(s, n) for s in sources],
        [tgt_tokenizer.nbest(t, n) for t in targets],
        special_ids(src_tokenizer, tgt_tokenizer),
        alpha=config.get("sp_sampling_alpha", 0.2),
    )


def special_ids(src_tokenizer, tgt_tokenizer) -> tokenizers.SpecialIds:
    """The special ids batches are built with: the target's, which the source must share (pad and
    EOS end and fill both sides of a batch)."""
    src, tgt = src_tokenizer.special_ids, tgt_tokenizer.special_ids
    if (src.pad, src.eos) != (tgt.pad, tgt.eos):
        raise DataError(
            f"source and target tokenizers disagree on pad/EOS ids ({src.pad}/{src.eos} vs "
            f"{tgt.pad}/{tgt.eos}): use tokenizers with the same special ids"
        )
    return tgt


def _split_data(
    config,
    pairs: datasets.TextPairs | datasets.ImageCaptionPairs,
    src_tokenizer: tokenizers.Tokenizer,
    tgt_tokenizer: tokenizers.Tokenizer,
) -> tuple[examples.Tokenized | examples.ImageCaptions, list[str], list[str]]:
    """A loaded split as (pipeline data, source texts, target texts); the texts as in the dataset,
    the tokens of `cased` text.

    Image pairs: the source texts are the images' descriptions; only captions are tokenized.
    """
    if isinstance(pairs, datasets.ImageCaptionPairs):
        images, captions, descriptions = pairs.columns()
        ids = [tgt_tokenizer.encode(c) for c in cased(config, captions)]
        return examples.ImageCaptions.from_lists(images, ids), descriptions, captions
    sources, targets = pairs.columns()
    data = tokenize(src_tokenizer, tgt_tokenizer, cased(config, sources), cased(config, targets))
    return data, sources, targets


def get_datasets(config, *, batch_multiple: int = 1) -> Datasets:
    """Loads (preparing if needed) `config.dataset`, builds tokenizers and batches.

    Args:
      config: an ml_collections ConfigDict with the fields in the module docstring.
      batch_multiple: every global batch size is a multiple of this (pass `jax.device_count()`).
        With `tokens_per_batch`, batch sizes are rounded down to it; `batch_size` and
        `eval_batch_size` must be multiples of it (eval_batch_size is rounded up).

    Raises:
      DataError: bad dataset name, paths or files (one-line message).
      ValueError: inconsistent batch settings (one-line message).
    """
    if config.max_len < 2:
        raise ValueError(f"max_len must be >= 2 (a token and EOS), got {config.max_len}")
    where = dict(data_dir=config.data_dir, manual_dir=config.manual_dir)
    train_pairs = datasets.load(config.dataset, "train", **where)
    train_segmentations = None
    if isinstance(train_pairs, datasets.ImageCaptionPairs):
        if config.get("sp_sampling_nbest", 0):
            raise DataError(
                f"subword sampling is for text pairs, not {config.dataset}: set sp_sampling_nbest=0"
            )
        images, captions, sources = train_pairs.columns()
        captions = cased(config, captions)
        src_tokenizer = tgt_tokenizer = tokenizers.build(
            config.tokenizer,
            captions,
            cache_dir=config.tokenizer_dir or DEFAULT_TOKENIZER_DIR,
            vocab_size=config.vocab_size,
            model_type=config.sp_model_type,
        )
        ids = [tgt_tokenizer.encode(c) for c in captions]
        train_data = examples.ImageCaptions.from_lists(images, ids)
    else:
        sources, targets = (cased(config, texts) for texts in train_pairs.columns())
        src_tokenizer, tgt_tokenizer = build_tokenizers(config, sources, targets)
        train_data = tokenize(src_tokenizer, tgt_tokenizer, sources, targets)
        if config.get("sp_sampling_nbest", 0):
            train_segmentations = nbest_segmentations(
                config, src_tokenizer, tgt_tokenizer, sources, targets
            )
    train = batching.TrainPipeline(
        train_data,
        max_len=config.max_len,
        batch_size=config.batch_size,
        tokens_per_batch=config.tokens_per_batch,
        batch_multiple=batch_multiple,
        num_buckets=config.num_buckets,
        seed=config.seed,
        segmentations=train_segmentations,
    )
    stats = {
        "train_examples": len(sources),
        "train_kept": train.num_examples,
        "train_dropped": train.num_dropped,
    }
    logging.info(
        "%s train: kept %d of %d examples, dropped %d longer than max_len=%d tokens",
        config.dataset,
        train.num_examples,
        len(sources),
        train.num_dropped,
        config.max_len,
    )
    eval_batch_size = config.get("eval_batch_size") or config.batch_size
    eval_batch_size = -(-eval_batch_size // batch_multiple) * batch_multiple
    evals = {}
    available = datasets.split_names(config.dataset, data_dir=config.data_dir)
    for split in (s for s in EVAL_SPLITS if s in available):
        data, sources, references = _split_data(
            config, datasets.load(config.dataset, split, **where), src_tokenizer, tgt_tokenizer
        )
        evals[split] = batching.make_eval_data(
            data,
            sources,
            references,
            buckets=train.buckets,
            batch_size=eval_batch_size,
            max_len=config.max_len,
        )
        stats[f"{split}_examples"] = len(sources)
        stats[f"{split}_truncated"] = evals[split].num_truncated
    logging.info(
        "%s batches: train shapes %s, %d batches per epoch; eval batch size %d; stats %s",
        config.dataset,
        [tuple(s) for s in train.batch_shapes()],
        train.batches_per_epoch,
        eval_batch_size,
        stats,
    )
    return Datasets(train, evals, src_tokenizer, tgt_tokenizer, stats)


def _eval_data(
    config, data: examples.Tokenized | examples.ImageCaptions, sources, references, batch_size
) -> batching.EvalData:
    """Ordered eval batches with buckets from this data's own lengths (at most num_buckets + 1)."""
    src_lengths, tgt_lengths = examples.padded_lengths(data)
    buckets = batching.bucket_lengths(
        src_lengths,
        tgt_lengths,
        num_buckets=config.num_buckets,
        max_len=config.max_len,
    )
    return batching.make_eval_data(
        data, sources, references, buckets=buckets, batch_size=batch_size, max_len=config.max_len
    )


def get_eval_data(
    config, split: str, src_tokenizer, tgt_tokenizer, *, batch_size: int | None = None
) -> batching.EvalData:
    """One split of `config.dataset`, tokenized with a trained run's tokenizers (for eval.py)."""
    available = datasets.split_names(config.dataset, data_dir=config.data_dir)
    if split not in available:
        raise DataError(
            f"{config.dataset} has no split {split!r}: use one of {', '.join(available)}"
        )
    where = dict(data_dir=config.data_dir, manual_dir=config.manual_dir)
    data, sources, references = _split_data(
        config, datasets.load(config.dataset, split, **where), src_tokenizer, tgt_tokenizer
    )
    batch_size = batch_size or config.get("eval_batch_size") or config.batch_size
    return _eval_data(config, data, sources, references, batch_size)


def source_lengths(max_len: int) -> list[int]:
    """The source lengths user input is padded to: 8, 16, 32, ... up to `max_len` (and `max_len`).

    Fixed, whatever the input, so translating any number of chunks compiles each decode program at
    most once per length here.
    """
    lengths, length = [], 8
    while length < max_len:
        lengths.append(length)
        length *= 2
    return [*lengths, max_len]


def source_batches(
    config,
    src_ids: Sequence[Sequence[int]],
    batch_size: int,
    special: tokenizers.SpecialIds = tokenizers.SEQZOO_IDS,
) -> list:
    """Ordered decode batches of already tokenized sources (user input, each at most
    `config.max_len - 1` tokens, padded with `special.pad`), with `mask` for real rows; every batch
    is `[batch_size, L]` with L from `source_lengths(config.max_len)`."""
    data = examples.Tokenized.from_lists(src_ids, [[] for _ in src_ids], special)
    blanks = [""] * len(src_ids)
    buckets = [(length, batching.BUCKET_MULTIPLE) for length in source_lengths(config.max_len)]
    return batching.make_eval_data(
        data, blanks, blanks, buckets=buckets, batch_size=batch_size, max_len=config.max_len
    ).batches


def head(eval_data: batching.EvalData, count: int) -> batching.EvalData:
    """The first `count` examples of `eval_data` (rows past them masked out)."""
    if count <= 0 or count >= len(eval_data.references):
        return eval_data
    batches, seen = [], 0
    for batch in eval_data.batches:
        if seen >= count:
            break
        keep = np.cumsum(batch["mask"]) + seen <= count
        batches.append({**batch, "mask": batch["mask"] & keep})
        seen += int(batch["mask"].sum())
    return dataclasses.replace(
        eval_data,
        batches=batches,
        sources=eval_data.sources[:count],
        references=eval_data.references[:count],
    )
