"""`dates`: human-readable dates to ISO `YYYY-MM-DD`, the classic attention exercise, as a TFDS builder.

Each example is a date drawn with Faker between 1900-01-01 and 2099-12-31 and written by Babel in
one of many CLDR patterns of one of six locales ("3 May 1979", "Thursday, May 3, 1979", "03.05.79",
"3 mai 1979", "jueves, 3 de mayo de 1979", ...); the target is the same date in ISO form. The
patterns are chosen so that a source names exactly one date: two-digit years appear only for
1950-2049 ("03.05.79" is 1979, "03.05.31" is 2031) and the only numeric day-month orders are
`M/d/yy` (US, unpadded, two-digit year), `dd/MM/y` (four-digit year) and `dd.MM.yy`/`dd.MM.y`.

Sources are unique across all splits (no overlap between train, validation and test), and the data is
a pure function of the builder version, the seed below and the split sizes of the config.

Config `lists` makes inputs long: each source is a list of 1 to `max_dates` (5) such dates joined by
" ; " ("3 May 1979 ; 03.05.31 ; jueves, 3 de mayo de 1979"), its target their ISO forms joined by
spaces ("1979-05-03 2031-05-03 1979-05-03"); sources run to ~180 characters. No date string appears
in two examples, so test dates are unseen in training. It exists to show what a fixed-size encoding
costs: a plain encoder-decoder must carry the whole list in one vector, attention need not.

    import tensorflow_datasets as tfds
    from data import dates  # registers the builder
    tfds.builder("dates/tiny", data_dir=..., file_format="array_record").download_and_prepare()
"""

import dataclasses
import datetime
import random

import babel.dates
import faker
import numpy as np
import tensorflow_datasets as tfds

FIRST_DATE = datetime.date(1900, 1, 1)
LAST_DATE = datetime.date(2099, 12, 31)
TWO_DIGIT_YEARS = (1950, 2049)  # the only years written with a two-digit-year pattern
SEED = 1979  # part of the dataset's definition: changing it means a new builder version

# CLDR date patterns per locale (https://unicode.org/reports/tr35/tr35-dates.html).
FORMATS: dict[str, tuple[str, ...]] = {
    "en_US": (
        "d MMM y",
        "d MMMM y",
        "dd MMM y",
        "MMM d, y",
        "MMMM d, y",
        "EEE, MMM d, y",
        "EEEE, MMMM d, y",
        "M/d/yy",
    ),
    "en_GB": ("d MMMM y", "EEE d MMM y", "EEEE d MMMM y", "dd/MM/y"),
    "fr_FR": ("d MMM y", "d MMMM y", "EEE d MMM y", "EEEE d MMMM y", "dd/MM/y"),
    "de_DE": ("d. MMM y", "d. MMMM y", "EEEE, d. MMMM y", "dd.MM.y", "dd.MM.yy"),
    "es_ES": ("d MMM y", "d 'de' MMMM 'de' y", "EEEE, d 'de' MMMM 'de' y"),
    "it_IT": ("d MMM y", "d MMMM y", "EEEE d MMMM y"),
}


def has_two_digit_year(pattern: str) -> bool:
    """Whether a CLDR pattern writes the year with two digits (`yy`)."""
    return "yy" in pattern and "yyy" not in pattern


_ALL_CHOICES = tuple((locale, pattern) for locale, ps in FORMATS.items() for pattern in ps)
_FOUR_DIGIT_CHOICES = tuple((loc, p) for loc, p in _ALL_CHOICES if not has_two_digit_year(p))


def format_source(date: datetime.date, locale: str, pattern: str) -> str:
    """The human-readable form of `date` in `locale` with CLDR `pattern`."""
    return babel.dates.format_date(date, pattern, locale=locale)


def generate(count: int, seed: int = SEED) -> list[dict[str, str]]:
    """`count` examples with distinct sources: dicts of `source`, `target`, `locale`, `format`.

    Deterministic in (count, seed); a prefix of the list for `count + k` equals the list for `count`.
    """
    fake = faker.Faker()
    fake.seed_instance(seed)
    examples, seen = [], set()
    while len(examples) < count:
        date = fake.date_between_dates(FIRST_DATE, LAST_DATE)
        two_digit_ok = TWO_DIGIT_YEARS[0] <= date.year <= TWO_DIGIT_YEARS[1]
        locale, pattern = fake.random.choice(_ALL_CHOICES if two_digit_ok else _FOUR_DIGIT_CHOICES)
        source = format_source(date, locale, pattern)
        if source in seen:
            continue
        seen.add(source)
        examples.append(
            {"source": source, "target": date.isoformat(), "locale": locale, "format": pattern}
        )
    return examples


LIST_SEPARATOR = " ; "  # appears in no date pattern


def generate_lists(count: int, max_dates: int, seed: int = SEED) -> list[dict[str, str]]:
    """`count` examples, each a list of 1 to `max_dates` dates (uniformly many): dicts of `source`,
    `target` and `num_dates`. Every date string of every example is distinct (drawn from one
    `generate` stream). Deterministic in (count, max_dates, seed).
    """
    rng = random.Random(seed)
    sizes = [rng.randint(1, max_dates) for _ in range(count)]
    singles, start, examples = generate(sum(sizes), seed), 0, []
    for size in sizes:
        dates = singles[start : start + size]
        start += size
        examples.append(
            {
                "source": LIST_SEPARATOR.join(d["source"] for d in dates),
                "target": " ".join(d["target"] for d in dates),
                "num_dates": size,
            }
        )
    return examples


@dataclasses.dataclass(eq=False)
class DatesConfig(tfds.core.BuilderConfig):
    """Split sizes of a `dates` variant; `max_dates` > 1: sources are lists of dates."""

    train_size: int = 50_000
    validation_size: int = 1_000
    test_size: int = 2_000
    max_dates: int = 1


class Dates(tfds.core.GeneratorBasedBuilder):
    """Human-readable dates (many formats, six locales) to ISO `YYYY-MM-DD`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        DatesConfig(
            name="default",
            description="50,000 train / 1,000 validation / 2,000 test: enough for >=99.5% "
            "exact match with an attention model.",
        ),
        DatesConfig(
            name="tiny",
            description="2,000 / 200 / 200, for tests and quick runs.",
            train_size=2_000,
            validation_size=200,
            test_size=200,
        ),
        DatesConfig(
            name="lists",
            description="Lists of 1-5 dates to lists of ISO dates, 50,000 / 1,000 / 2,000: long "
            "inputs, where a plain encoder-decoder degrades and attention does not.",
            max_dates=5,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        if self.builder_config.max_dates > 1:
            features = {"source": text, "target": text, "num_dates": tfds.features.Scalar(np.int32)}
        else:
            features = {"source": text, "target": text, "locale": text, "format": text}
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("source", "target"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        sizes = {
            "test": config.test_size,
            "validation": config.validation_size,
            "train": config.train_size,
        }
        if config.max_dates > 1:
            examples = generate_lists(sum(sizes.values()), config.max_dates)
        else:
            examples = generate(sum(sizes.values()))
        splits, start = {}, 0
        for split, size in sizes.items():  # test first: it stays fixed when train grows
            splits[split] = self._generate_examples(examples[start : start + size])
            start += size
        return splits

    def _generate_examples(self, examples):
        yield from enumerate(examples)
