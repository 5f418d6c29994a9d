"""Bucketed, padded batches of a split's examples (data/examples.py): an exactly resumable grain training iterator, and evaluation batches.

Batches are dicts of int32 arrays (docs/design.md), with the tokenizers' special ids (`Tokenized.
special_ids`; seqzoo's PAD is 0):
  `src [batch, src_len]`: x1 .. xS EOS, then PAD;
  `tgt_in [batch, tgt_len]`: BOS y1 .. yT, then PAD;
  `tgt_out [batch, tgt_len]`: y1 .. yT EOS, then PAD.
Every (src_len, tgt_len) is one of a few buckets, so jit compiles a bounded number of programs.
A filler row (to complete a batch) is an empty sentence: `src` = EOS, `tgt_in` = BOS, `tgt_out` all
PAD, so it adds nothing to a loss masked by `tgt_out != PAD` and never leaves attention without keys.

Image captioning (`ImageCaptions` data): `src` is float32 `[batch, height, width, channels]`, pixels
scaled to [0, 1], and the caption is the target. Images have one size and are never padded or
truncated: their source length is 0 everywhere (buckets and `BatchShape.src_len`), so buckets differ
only in target length. A filler row's image is all zeros.

Training: each epoch is a plan of batches, a pure function of (seed, epoch): shuffle the examples,
group them by bucket (each bucket's leftover examples move up into the next bucket, which fits them,
and the last leftovers fill one batch with filler rows), then shuffle the batches. Batch `step` of
the infinite stream is batch `step % batches_per_epoch` of epoch `step // batches_per_epoch`, so the
grain iterator's state is a single position and a restored iterator yields exactly the batches an
uninterrupted one would. With subword sampling (`data/segmentations.py`), which segmentation each
example is read in is drawn per epoch too, from (seed, epoch). Host `k` of `n` takes rows
`[k*B/n, (k+1)*B/n)` of each global batch: the hosts see disjoint examples and agree on every
step's shape.
"""

import dataclasses
import functools
import sys
from collections.abc import Sequence
from typing import NamedTuple

import grain
import numpy as np

from data.examples import ImageCaptions, Tokenized, padded_lengths
from data.segmentations import SampledTokenized, Segmentations
from data.tokenizers import SEQZOO_IDS

BUCKET_MULTIPLE = 4  # bucket lengths are multiples of this (or max_len)
DEFAULT_NUM_BUCKETS = 4

Batch = dict[str, np.ndarray]


class BatchShape(NamedTuple):
    """Global batch shape: `src [batch_size, src_len]`, `tgt_in`/`tgt_out [batch_size, tgt_len]`."""

    batch_size: int
    src_len: int
    tgt_len: int


def _round_up(lengths: np.ndarray, max_len: int) -> np.ndarray:
    rounded = -(-np.asarray(lengths) // BUCKET_MULTIPLE) * BUCKET_MULTIPLE
    return np.minimum(rounded, np.maximum(max_len, lengths))


def bucket_lengths(
    src_lengths: np.ndarray, tgt_lengths: np.ndarray, *, num_buckets: int, max_len: int
) -> list[tuple[int, int]]:
    """At most `num_buckets` (src_len, tgt_len) pairs, increasing in both, the last fitting all,
    chosen to pad as little as possible.

    Examples are grouped by their longer side, at the boundaries (multiples of BUCKET_MULTIPLE,
    capped at max_len) that minimize the padded length summed over examples, by dynamic programming;
    each group's bucket is its longest source and target, rounded up. With token-based batching that
    sum is the compute spent per epoch. Lengths are padded lengths (`padded_lengths`), int [num_examples].
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    longer = _round_up(np.maximum(src_lengths, tgt_lengths), max_len)
    # Every distinct rounded length is a candidate boundary; count[i] examples end at candidate i.
    # cost[k][j]: least padded length of the examples up to candidate j in exactly k + 1 groups, the
    # last one ending at j; start[k][j]: the candidate its last group begins after (-1: none). More
    # groups never pad more, so the answer uses min(num_buckets, len(candidates)) of them.
    candidates, count = np.unique(longer, return_counts=True)
    before = np.concatenate([[0], np.cumsum(count)])
    n = len(candidates)

    def padded(i: int, j: int) -> int:  # the examples after candidate i up to j, padded to j
        return int(before[j + 1] - before[i + 1]) * int(candidates[j])

    cost, start = [[padded(-1, j) for j in range(n)]], [[-1] * n]
    for k in range(1, min(num_buckets, n)):
        row, arg = [np.inf] * n, [-1] * n
        for j in range(k, n):
            for i in range(k - 1, j):
                if cost[-1][i] + padded(i, j) < row[j]:
                    row[j], arg[j] = cost[-1][i] + padded(i, j), i
        cost.append(row)
        start.append(arg)
    ends, j = [], n - 1
    for k in reversed(range(len(cost))):
        ends.append(j)
        j = start[k][j]
    buckets, previous = [], (0, 0)
    for end in sorted(ends):
        members = longer <= candidates[end]
        src = max(previous[0], int(_round_up(src_lengths[members].max(), max_len)))
        tgt = max(previous[1], int(_round_up(tgt_lengths[members].max(), max_len)))
        buckets.append(previous := (src, tgt))
    return buckets


def assign_buckets(
    src_lengths: np.ndarray, tgt_lengths: np.ndarray, buckets: Sequence[tuple[int, int]]
) -> np.ndarray:
    """Index of the first bucket fitting each example, or -1: int64 [num_examples]."""
    src_max, tgt_max = np.asarray(buckets).T
    fits = (src_lengths[:, None] <= src_max) & (tgt_lengths[:, None] <= tgt_max)
    return np.where(fits.any(axis=1), fits.argmax(axis=1), -1)


def bucket_batch_sizes(
    buckets: Sequence[tuple[int, int]], *, batch_size: int, tokens_per_batch: int, multiple: int
) -> list[int]:
    """Global batch size per bucket: `batch_size` sentences, or, if `tokens_per_batch` > 0, as many
    sentences as fit `tokens_per_batch` padded tokens (batch * max(src_len, tgt_len)); always a
    multiple of `multiple` (at least `multiple`)."""
    if multiple < 1:
        raise ValueError(f"batch multiple must be >= 1, got {multiple}")
    if tokens_per_batch > 0:
        return [max(multiple, tokens_per_batch // max(b) // multiple * multiple) for b in buckets]
    if batch_size < 1 or batch_size % multiple:
        raise ValueError(
            f"batch_size {batch_size} must be a positive multiple of {multiple} (the number of "
            "devices it is split over): change batch_size"
        )
    return [batch_size] * len(buckets)


def make_batch(
    data: Tokenized | ImageCaptions | SampledTokenized,
    ids: np.ndarray,
    src_len: int,
    tgt_len: int,
) -> Batch:
    """The padded batch of examples `ids` (int [batch]; -1 gives a filler row).

    Image data: `src` is float32 `[batch, height, width, channels]` and `src_len` is unused.
    """
    images = isinstance(data, ImageCaptions)
    special = SEQZOO_IDS if images else data.special_ids
    if images:
        src = np.zeros((len(ids), *data.images.shape[1:]), np.float32)
    else:
        src = np.full((len(ids), src_len), special.pad, np.int32)
    tgt_in = np.full((len(ids), tgt_len), special.pad, np.int32)
    tgt_out = np.full((len(ids), tgt_len), special.pad, np.int32)
    tgt_in[:, 0] = special.bos
    for row, i in enumerate(ids):
        if i < 0:  # filler: the empty sentence (a blank image)
            if not images:
                src[row, 0] = special.eos
            continue
        y = data.target(i)
        if images:
            src[row] = data.image(i)
        else:
            x = data.source(i)
            src[row, : len(x)] = x
            src[row, len(x)] = special.eos
        tgt_in[row, 1 : len(y) + 1] = y
        tgt_out[row, : len(y)] = y
        tgt_out[row, len(y)] = special.eos
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


class TrainPipeline:
    """Training batches over an infinite, per-epoch reshuffled stream (see the module docstring)."""

    def __init__(
        self,
        data: Tokenized | ImageCaptions,
        *,
        max_len: int,
        batch_size: int,
        tokens_per_batch: int = 0,
        batch_multiple: int = 1,
        num_buckets: int = DEFAULT_NUM_BUCKETS,
        seed: int = 0,
        segmentations: Segmentations | None = None,
    ):
        """Keeps the examples whose padded lengths (`padded_lengths`) are at most `max_len`.

        Args:
          data: the tokenized training split (or images with tokenized captions).
          max_len: longest array length; longer examples are dropped (`num_dropped`).
          batch_size: sentences per global batch (when `tokens_per_batch` is 0).
          tokens_per_batch: if > 0, padded tokens per global batch instead (one size per bucket).
          batch_multiple: every global batch size is a multiple of this (e.g. the device count).
          num_buckets: at most this many (src_len, tgt_len) buckets.
          seed: shuffling (and segmentation sampling) seed.
          segmentations: `data`'s n-best segmentations: each epoch reads every example in one drawn
            from them (`data.segmentations`); buckets and batches are planned on `data`, which is their
            best. None: always `data`.
        """
        if segmentations is not None and (
            isinstance(data, ImageCaptions) or len(segmentations.src_scores) != len(data)
        ):
            raise ValueError("segmentations must hold the n-best of every example of text data")
        self.data = data
        self.seed = seed
        self.segmentations = segmentations
        src_lengths, tgt_lengths = padded_lengths(data)
        self.example_ids = np.flatnonzero((src_lengths <= max_len) & (tgt_lengths <= max_len))
        self.num_dropped = len(data) - len(self.example_ids)
        if not len(self.example_ids):
            raise ValueError(
                f"all {len(data)} training examples are longer than max_len={max_len} tokens "
                "(with EOS): raise max_len"
            )
        kept_src, kept_tgt = src_lengths[self.example_ids], tgt_lengths[self.example_ids]
        self.buckets = bucket_lengths(kept_src, kept_tgt, num_buckets=num_buckets, max_len=max_len)
        self.batch_sizes = bucket_batch_sizes(
            self.buckets,
            batch_size=batch_size,
            tokens_per_batch=tokens_per_batch,
            multiple=batch_multiple,
        )
        self._bucket_of = np.full(len(data), -1)
        self._bucket_of[self.example_ids] = assign_buckets(kept_src, kept_tgt, self.buckets)
        self.epoch_plan = functools.lru_cache(maxsize=2)(self._epoch_plan)  # per instance
        self.epoch_data = functools.lru_cache(maxsize=2)(self._epoch_data)
        self.batches_per_epoch = len(self.epoch_plan(0))

    @property
    def num_examples(self) -> int:
        """Training examples kept (after the max_len filter)."""
        return len(self.example_ids)

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The epoch's batches in order: (bucket index, example ids int64 [batch], -1 = filler)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.example_ids)
        bucket_of = self._bucket_of[order]
        batches, carry = [], order[:0]
        for bucket, size in enumerate(self.batch_sizes):
            pool = np.concatenate([carry, order[bucket_of == bucket]])
            full = len(pool) // size * size
            batches += [(bucket, ids) for ids in pool[:full].reshape(-1, size)]
            carry = pool[full:]
        if len(carry):
            fill = np.full(self.batch_sizes[-1] - len(carry), -1)
            batches.append((len(self.buckets) - 1, np.concatenate([carry, fill])))
        return [batches[i] for i in rng.permutation(len(batches))]

    def _epoch_data(self, epoch: int) -> Tokenized | ImageCaptions | SampledTokenized:
        """The examples as the epoch reads them: `data`, or one draw of `segmentations` (a pure
        function of (seed, epoch), each segmentation within the example's bucket)."""
        if self.segmentations is None:
            return self.data
        limits = np.asarray(self.buckets + [(sys.maxsize, sys.maxsize)])[self._bucket_of]
        rng = np.random.default_rng([self.seed, epoch, 1])  # not the plan's stream
        return self.segmentations.sample(rng, limits[:, 0], limits[:, 1])

    def batch_shapes(self) -> list[BatchShape]:
        """Every global batch shape the iterator can yield (the same set in every epoch)."""
        buckets = sorted({bucket for bucket, _ in self.epoch_plan(0)})
        return [BatchShape(self.batch_sizes[b], *self.buckets[b]) for b in buckets]

    def global_batch(self, step: int) -> Batch:
        """Batch `step` of the infinite stream, all rows."""
        return self._host_batch(step, 0, 1)

    def _host_batch(self, step: int, shard_index: int, shard_count: int) -> Batch:
        epoch, position = divmod(step, self.batches_per_epoch)
        bucket, ids = self.epoch_plan(epoch)[position]
        rows = len(ids) // shard_count
        ids = ids[shard_index * rows : (shard_index + 1) * rows]
        return make_batch(self.epoch_data(epoch), ids, *self.buckets[bucket])

    def dataset(self, shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
        """The infinite stream of this host's batches as a grain MapDataset (index = step)."""
        if not 0 <= shard_index < shard_count:
            raise ValueError(
                f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}"
            )
        if bad := [b for b in self.batch_sizes if b % shard_count]:
            raise ValueError(
                f"global batch sizes {bad} do not split over shard_count={shard_count} hosts: "
                "use a batch size (or batch multiple) divisible by it"
            )
        host_batch = functools.partial(
            self._host_batch, shard_index=shard_index, shard_count=shard_count
        )
        return grain.MapDataset.range(sys.maxsize).map(host_batch)

    def iterator(
        self,
        shard_index: int = 0,
        shard_count: int = 1,
        *,
        prefetch_threads: int = 1,
        prefetch_buffer: int = 8,
    ) -> grain.DatasetIterator:
        """This host's training batches, prefetched by grain's threads.

        `get_state()`/`set_state()` (and grain's orbax handler, `grain.checkpoint.CheckpointSave`)
        save and restore the exact position. Rows are `[global_batch / shard_count, ...]`.
        """
        read_options = grain.ReadOptions(
            num_threads=prefetch_threads, prefetch_buffer_size=prefetch_buffer
        )
        return iter(self.dataset(shard_index, shard_count).to_iter_dataset(read_options))


@dataclasses.dataclass(frozen=True)
class EvalData:
    """One evaluation split: batches in the original example order, and the raw strings.

    `batches[k]` holds examples `k * batch_size ...`: `src`, `tgt_in`, `tgt_out` (int32, padded to a
    bucket shape; image data: `src` float32 images) and `mask` (bool [batch]: False for the filler
    rows completing the last batch). `sources[i]`, `references[i]` are example i's raw source and
    target text (image data: a text description of the image, and the caption).
    """

    batches: list[Batch]
    sources: list[str]
    references: list[str]
    num_truncated: int  # examples cut to max_len tokens (the references stay whole)

    @property
    def batch_shapes(self) -> list[BatchShape]:
        shapes = {BatchShape(*_src_shape(b["src"]), b["tgt_in"].shape[1]) for b in self.batches}
        return sorted(shapes)


def _src_shape(src: np.ndarray) -> tuple[int, int]:
    """(batch, src_len) of a batch's `src`; images have src_len 0."""
    return (src.shape[0], src.shape[1] if src.ndim == 2 else 0)


def make_eval_data(
    data: Tokenized | ImageCaptions,
    sources: Sequence[str],
    references: Sequence[str],
    *,
    buckets: Sequence[tuple[int, int]],
    batch_size: int,
    max_len: int,
) -> EvalData:
    """Fixed-size batches of a split in order, each padded to the first of `buckets` fitting it.

    Sequences longer than `max_len` (with EOS/BOS) are truncated to it; if the longest needs more
    than the last bucket, one more bucket is added, so there are at most len(buckets) + 1 shapes.
    """
    src_lengths, tgt_lengths = padded_lengths(data)
    truncated = (src_lengths > max_len) | (tgt_lengths > max_len)
    src_lengths, tgt_lengths = np.minimum(src_lengths, max_len), np.minimum(tgt_lengths, max_len)
    (last_src, last_tgt), buckets = buckets[-1], list(buckets)
    top_src, top_tgt = src_lengths.max(initial=1), tgt_lengths.max(initial=1)
    if top_src > last_src or top_tgt > last_tgt:
        top_src, top_tgt = _round_up(top_src, max_len), _round_up(top_tgt, max_len)
        buckets.append((max(last_src, int(top_src)), max(last_tgt, int(top_tgt))))
    if truncated.any():
        data = _truncate(data, max_len)
    batches = []
    for start in range(0, len(data), batch_size):
        ids = np.arange(start, min(start + batch_size, len(data)))
        bucket = assign_buckets(
            np.array([src_lengths[ids].max()]), np.array([tgt_lengths[ids].max()]), buckets
        )[0]
        filled = np.concatenate([ids, np.full(batch_size - len(ids), -1)])
        batch = make_batch(data, filled, *buckets[bucket])
        batch["mask"] = filled >= 0
        batches.append(batch)
    return EvalData(batches, list(sources), list(references), int(truncated.sum()))


def _truncate(data: Tokenized | ImageCaptions, max_len: int) -> Tokenized | ImageCaptions:
    """`data` with every sequence cut to `max_len - 1` tokens (room for EOS/BOS)."""
    if isinstance(data, ImageCaptions):
        captions = [data.target(i)[: max_len - 1] for i in range(len(data))]
        return ImageCaptions.from_lists(data.images, captions)
    return Tokenized.from_lists(
        [data.source(i)[: max_len - 1] for i in range(len(data))],
        [data.target(i)[: max_len - 1] for i in range(len(data))],
        data.special_ids,
    )
