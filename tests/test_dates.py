import datetime
import random
import re

import pytest
import tensorflow_datasets as tfds

from data import datasets, dates

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def examples(tfds_data_dir) -> dict[str, list[dict[str, str]]]:
    """Every dates/tiny example with all its features, per split."""
    out = {}
    for split in SPLITS:
        source = tfds.data_source("dates/tiny", split=split, data_dir=tfds_data_dir)
        out[split] = [
            {k: v.decode() for k, v in ex.items()} for ex in source.__getitems__(range(len(source)))
        ]
    return out


def test_split_sizes(tfds_data_dir):
    sizes = {s: len(datasets.load("dates/tiny", s, data_dir=tfds_data_dir)) for s in SPLITS}
    assert sizes == {"train": 2_000, "validation": 200, "test": 200}
    default = datasets.builder("dates", data_dir=tfds_data_dir).builder_config
    assert (default.train_size, default.validation_size, default.test_size) == (
        50_000,
        1_000,
        2_000,
    )


def test_every_target_is_the_sources_date(examples):
    for split in SPLITS:
        for ex in examples[split]:
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", ex["target"]), ex
            date = datetime.date.fromisoformat(ex["target"])
            assert dates.FIRST_DATE <= date <= dates.LAST_DATE
            # Writing the target's date the way the source claims to be written gives the source.
            assert dates.format_source(date, ex["locale"], ex["format"]) == ex["source"], ex
            if dates.has_two_digit_year(ex["format"]):
                assert dates.TWO_DIGIT_YEARS[0] <= date.year <= dates.TWO_DIGIT_YEARS[1]
            else:
                assert str(date.year) in ex["source"]


def test_no_overlap_between_splits(examples):
    sources = [ex["source"] for split in SPLITS for ex in examples[split]]
    assert len(set(sources)) == len(sources) == 2_400


def test_many_formats_and_all_locales(examples):
    train = examples["train"]
    assert {ex["locale"] for ex in train} == set(dates.FORMATS)
    all_formats = {(locale, p) for locale, patterns in dates.FORMATS.items() for p in patterns}
    assert {(ex["locale"], ex["format"]) for ex in train} == all_formats
    assert len(all_formats) >= 25
    lengths = [len(ex["source"]) for ex in train]
    assert min(lengths) <= 8 and max(lengths) >= 25  # "5/3/79" ... "Thursday, September 23, 1979"


def test_every_source_names_one_date():
    """Across all locales and patterns, no string is the rendering of two different dates."""
    rng = random.Random(0)
    span = (dates.LAST_DATE - dates.FIRST_DATE).days
    sample = {dates.FIRST_DATE + datetime.timedelta(rng.randrange(span + 1)) for _ in range(1500)}
    # Dates whose day and month can be swapped are the ones that could collide.
    sample |= {datetime.date(y, m, d) for y in (1979, 2031) for m in range(1, 13) for d in (1, 12)}
    seen = {}
    for locale, patterns in dates.FORMATS.items():
        for pattern in patterns:
            for date in sample:
                if dates.has_two_digit_year(pattern) and not (
                    dates.TWO_DIGIT_YEARS[0] <= date.year <= dates.TWO_DIGIT_YEARS[1]
                ):
                    continue
                source = dates.format_source(date, locale, pattern)
                assert seen.setdefault(source, date) == date, (source, locale, pattern)


def test_generation_is_deterministic_and_prefix_stable():
    first = dates.generate(300)
    assert first == dates.generate(300)
    assert dates.generate(350)[:300] == first
    assert dates.generate(300, seed=dates.SEED + 1) != first


def test_lists_of_dates_are_long_distinct_and_aligned():
    examples = dates.generate_lists(300, max_dates=5)
    assert examples == dates.generate_lists(300, max_dates=5)
    assert {ex["num_dates"] for ex in examples} == {1, 2, 3, 4, 5}
    parts = [ex["source"].split(dates.LIST_SEPARATOR) for ex in examples]
    singles = [p for ps in parts for p in ps]
    assert len(singles) == len(set(singles))  # no date string in two examples (or twice in one)
    stream = dates.generate(len(singles))  # each list is the next dates of one single-date stream
    assert singles == [d["source"] for d in stream]
    assert " ".join(ex["target"] for ex in examples) == " ".join(d["target"] for d in stream)
    for ex, sources in zip(examples, parts):
        targets = ex["target"].split(" ")
        assert len(sources) == len(targets) == ex["num_dates"]
        for source, target in zip(sources, targets):
            assert datetime.date.fromisoformat(target)
            assert dates.LIST_SEPARATOR.strip() not in source
    assert max(len(ex["source"]) for ex in examples) > 100
