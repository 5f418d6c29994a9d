"""The batching machinery on synthetic token ids (no TFDS): fast and exact."""

import dataclasses
import itertools

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data import batching, examples, segmentations
from data.tokenizers import BOS_ID, EOS_ID

MAX_LEN = 40


def synthetic(n: int, seed: int = 0) -> examples.Tokenized:
    """`n` pairs; example i's tokens all equal i + 4 (so a row names its example), lengths 1-44."""
    rng = np.random.default_rng(seed)
    src_lengths = rng.integers(1, 45, n)
    tgt_lengths = np.clip(src_lengths + rng.integers(-4, 5, n), 1, 44)
    return examples.Tokenized.from_lists(
        [[i + 4] * k for i, k in enumerate(src_lengths)],
        [[i + 4] * k for i, k in enumerate(tgt_lengths)],
    )


@pytest.fixture(scope="module")
def data() -> examples.Tokenized:
    return synthetic(600)


@pytest.fixture(scope="module")
def train(data) -> batching.TrainPipeline:
    return batching.TrainPipeline(data, max_len=MAX_LEN, batch_size=16, seed=3)


def example_ids(batch) -> list[int]:
    """Example index per row (-1 for filler rows), checking the row's layout on the way."""
    ids = []
    for src, tgt_in, tgt_out in zip(batch["src"], batch["tgt_in"], batch["tgt_out"], strict=True):
        n, m = int((src != 0).sum()) - 1, int((tgt_out != 0).sum()) - 1
        assert src[n] == EOS_ID and tgt_in[0] == BOS_ID and not src[n + 1 :].any()
        if m < 0:  # filler row: an empty sentence
            assert n == 0 and not tgt_in[1:].any()
            ids.append(-1)
            continue
        assert tgt_out[m] == EOS_ID and (tgt_in[1 : m + 1] == tgt_out[:m]).all()
        assert len(set(src[:n]) | set(tgt_out[:m])) == 1
        ids.append(int(src[0]) - 4)
    return ids


def take(iterator, k: int) -> list[dict]:
    return [next(iterator) for _ in range(k)]


def assert_same_batches(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


# Batches and buckets.


def test_make_batch_layout(data):
    batch = batching.make_batch(data, np.array([5, -1, 2]), 48, 48)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((3, 48), np.int32) for k in ("src", "tgt_in", "tgt_out")
    }
    assert example_ids(batch) == [5, -1, 2]
    assert (batch["src"][0, : len(data.source(5))] == data.source(5)).all()


def test_buckets_increase_and_fit_everything(train, data):
    src_lengths, tgt_lengths = examples.padded_lengths(data)
    kept = train.example_ids
    assert 1 < len(train.buckets) <= batching.DEFAULT_NUM_BUCKETS
    assert train.buckets == sorted(train.buckets)
    for (s0, t0), (s1, t1) in zip(train.buckets, train.buckets[1:]):
        assert s0 <= s1 and t0 <= t1
    for s, t in train.buckets:
        assert s <= MAX_LEN and t <= MAX_LEN and (s % batching.BUCKET_MULTIPLE == 0 or s == MAX_LEN)
    buckets = batching.assign_buckets(src_lengths[kept], tgt_lengths[kept], train.buckets)
    assert (buckets >= 0).all() and len(np.unique(buckets)) == len(train.buckets)


@pytest.mark.parametrize("num_buckets", [1, 2, 3, 5])
def test_buckets_pad_least(num_buckets):
    """Against brute force: no choice of boundaries (by the longer side) pads fewer positions."""
    rng = np.random.default_rng(num_buckets)
    src = np.clip(rng.lognormal(2.5, 0.45, size=300).astype(int), 1, 38)  # skewed, like sentences
    tgt = np.clip(src + rng.integers(-3, 6, size=300), 1, 40)
    buckets = batching.bucket_lengths(src, tgt, num_buckets=num_buckets, max_len=40)
    which = batching.assign_buckets(src, tgt, buckets)
    assert len(buckets) <= num_buckets and (which >= 0).all()
    padded = np.array([max(buckets[b]) for b in which]).sum()
    longer = -(-np.maximum(src, tgt) // batching.BUCKET_MULTIPLE) * batching.BUCKET_MULTIPLE
    candidates = np.unique(longer)
    best = min(
        np.sort(ends)[np.searchsorted(np.sort(ends), longer)].sum()
        for k in range(num_buckets)
        for ends in map(list, itertools.combinations(candidates[:-1], k))
        for ends in [ends + [candidates[-1]]]
    )
    assert padded == best


def test_long_examples_are_dropped_and_counted(train, data):
    src_lengths, tgt_lengths = examples.padded_lengths(data)
    too_long = (src_lengths > MAX_LEN) | (tgt_lengths > MAX_LEN)
    assert train.num_dropped == too_long.sum() > 0
    assert set(train.example_ids) == set(np.flatnonzero(~too_long))


def test_each_epoch_has_every_kept_example_once(train):
    for epoch in range(3):
        seen = [
            i
            for step in range(train.batches_per_epoch)
            for i in example_ids(train.global_batch(epoch * train.batches_per_epoch + step))
        ]
        real = [i for i in seen if i >= 0]
        assert sorted(real) == sorted(train.example_ids)
        assert len(seen) - len(real) < 16  # at most one batch has filler rows


def test_batch_shapes_are_bounded(train):
    shapes = set(train.batch_shapes())
    assert len(shapes) <= batching.DEFAULT_NUM_BUCKETS
    seen = set()
    for step in range(3 * train.batches_per_epoch):
        batch = train.global_batch(step)
        seen.add(batching.BatchShape(*batch["src"].shape, batch["tgt_in"].shape[1]))
    assert seen == shapes


def test_batching_by_tokens(data):
    train = batching.TrainPipeline(
        data, max_len=MAX_LEN, batch_size=0, tokens_per_batch=500, batch_multiple=4
    )
    sizes = [shape.batch_size for shape in train.batch_shapes()]
    assert len(set(sizes)) > 1 and all(size % 4 == 0 for size in sizes)
    for shape in train.batch_shapes():
        assert shape.batch_size * max(shape.src_len, shape.tgt_len) <= 500
    real = [i for s in range(train.batches_per_epoch) for i in example_ids(train.global_batch(s))]
    assert sorted(i for i in real if i >= 0) == sorted(train.example_ids)


def test_bad_batch_settings(data):
    with pytest.raises(ValueError, match="batch_size 10 must be a positive multiple of 4"):
        batching.TrainPipeline(data, max_len=MAX_LEN, batch_size=10, batch_multiple=4)
    with pytest.raises(ValueError, match="longer than max_len=1"):
        batching.TrainPipeline(data, max_len=1, batch_size=8)


# Order and determinism.


def steps(train, k: int) -> list[list[int]]:
    return [example_ids(train.global_batch(step)) for step in range(k)]


def test_same_seed_same_order_other_seed_other_order(data, train):
    again = batching.TrainPipeline(data, max_len=MAX_LEN, batch_size=16, seed=3)
    other = batching.TrainPipeline(data, max_len=MAX_LEN, batch_size=16, seed=4)
    k = 2 * train.batches_per_epoch
    assert steps(again, k) == steps(train, k)
    assert steps(other, k) != steps(train, k)
    n = train.batches_per_epoch
    first, second = steps(train, k)[:n], steps(train, k)[n:]
    assert first != second  # reshuffled every epoch


def test_iterator_yields_the_stream(train):
    iterator = train.iterator()
    assert isinstance(iterator, grain.DatasetIterator)
    batches = take(iterator, train.batches_per_epoch + 2)  # across an epoch boundary
    assert_same_batches(batches, [train.global_batch(s) for s in range(len(batches))])


def test_host_shards_are_disjoint_slices_of_the_global_batch(train):
    shards = [take(train.iterator(k, 4), 3) for k in range(4)]
    for step in range(3):
        glued = {key: np.concatenate([s[step][key] for s in shards]) for key in shards[0][0]}
        assert_same_batches([glued], [train.global_batch(step)])
    with pytest.raises(ValueError, match="do not split over shard_count=3"):
        train.iterator(0, 3)
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        train.iterator(4, 4)


# Exact resumption.


def test_state_round_trip_resumes_exactly(train):
    uninterrupted = take(train.iterator(), train.batches_per_epoch + 5)
    for k in (0, 3, train.batches_per_epoch - 1, train.batches_per_epoch + 1):
        interrupted = train.iterator()
        take(interrupted, k)
        state = interrupted.get_state()
        resumed = train.iterator()
        resumed.set_state(state)
        assert resumed.get_state() == state
        assert_same_batches(take(resumed, 4), uninterrupted[k : k + 4])


def test_orbax_checkpoint_with_grain_handler(train, tmp_path):
    uninterrupted = take(train.iterator(), 12)
    iterator = train.iterator()
    take(iterator, 7)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    fresh = train.iterator()
    with ocp.CheckpointManager(tmp_path) as manager:
        restored = manager.restore(
            manager.latest_step(),
            args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)),
        )["data"]
    assert_same_batches(take(restored, 5), uninterrupted[7:12])


# Evaluation batches.


# Subword sampling.


def lengthened(data: examples.Tokenized, n: int) -> segmentations.Segmentations:
    """Example i's k-th best segmentation: its tokens and k more of the same (k < n, fewer for odd
    i), log-probability -k: the chosen k reads off a row's length."""

    def nbest(side, i):
        ids = side(i).tolist()
        return [(ids + [ids[0]] * k, -float(k)) for k in range(n if i % 2 == 0 else 2)]

    return segmentations.Segmentations.from_nbest(
        [nbest(data.source, i) for i in range(len(data))],
        [nbest(data.target, i) for i in range(len(data))],
        data.special_ids,
        alpha=0.5,
    )


@pytest.fixture(scope="module")
def sampled(data) -> batching.TrainPipeline:
    return batching.TrainPipeline(
        data, max_len=MAX_LEN, batch_size=16, seed=3, segmentations=lengthened(data, 4)
    )


def chosen(train, batch) -> list[tuple[int, int, int]]:
    """(example, source tokens added, target tokens added) of each real row of a sampled batch."""
    src_lengths, tgt_lengths = (batch["src"] != 0).sum(1) - 1, (batch["tgt_out"] != 0).sum(1) - 1
    return [
        (i, src_lengths[r] - train.data.src_lengths[i], tgt_lengths[r] - train.data.tgt_lengths[i])
        for r, i in enumerate(example_ids(batch))
        if i >= 0
    ]


def test_sampling_keeps_the_plan_and_draws_within_the_bucket(train, sampled):
    draws = []
    for step in range(2 * sampled.batches_per_epoch):
        batch = sampled.global_batch(step)
        assert example_ids(batch) == example_ids(train.global_batch(step))  # the same plan
        draws += chosen(sampled, batch)
    extra = np.array([(s, t) for _, s, t in draws])
    odd = np.array([i % 2 == 1 for i, _, _ in draws])
    assert extra.min() == 0 and extra[~odd].max() == 3 and extra[odd].max() == 1
    # Drawn ~ exp(0.5 x -k): every k, the best most often.
    counts = np.bincount(extra[~odd].ravel(), minlength=4)
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0


def test_sampling_is_a_function_of_seed_and_epoch(data, sampled):
    again = batching.TrainPipeline(
        data, max_len=MAX_LEN, batch_size=16, seed=3, segmentations=lengthened(data, 4)
    )
    steps = [0, 1, sampled.batches_per_epoch]  # two of epoch 0, the first of epoch 1
    assert_same_batches(
        [again.global_batch(s) for s in steps], [sampled.global_batch(s) for s in steps]
    )
    first, second = (sampled.epoch_data(e) for e in (0, 1))
    assert (first.src_choice != second.src_choice).any()
    greedy = dataclasses.replace(lengthened(data, 4), alpha=1e4)
    assert not greedy.sample(
        np.random.default_rng(0), *[np.full(len(data), 99)] * 2
    ).src_choice.any()


def test_sampling_needs_the_nbest_of_every_example(data):
    with pytest.raises(ValueError, match="n-best of every example"):
        batching.TrainPipeline(
            data, max_len=MAX_LEN, batch_size=16, segmentations=lengthened(synthetic(5), 3)
        )


def test_eval_batches_keep_order_and_mask_fillers(data, train):
    sources = [f"s{i}" for i in range(len(data))]
    ev = batching.make_eval_data(
        data, sources, sources, buckets=train.buckets, batch_size=32, max_len=MAX_LEN
    )
    rows = [i for b in ev.batches for i in example_ids(b)]
    assert rows[: len(data)] == list(range(len(data))) and set(rows[len(data) :]) == {-1}
    masks = np.concatenate([b["mask"] for b in ev.batches])
    assert (masks == (np.array(rows) >= 0)).all()
    assert all(b["src"].shape[0] == 32 for b in ev.batches)
    assert len(ev.batch_shapes) <= len(train.buckets) + 1
    assert all(s.src_len <= MAX_LEN and s.tgt_len <= MAX_LEN for s in ev.batch_shapes)
    src_lengths, tgt_lengths = examples.padded_lengths(data)
    assert ev.num_truncated == ((src_lengths > MAX_LEN) | (tgt_lengths > MAX_LEN)).sum() > 0
    assert ev.sources == sources
