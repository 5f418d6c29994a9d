"""`digit_captions`: real handwritten digits on a canvas, captioned in words, as a TFDS builder.

The digits are scikit-learn's copy of the UCI handwritten digits (`sklearn.datasets.load_digits`:
1,797 grey images of 8x8 pixels, values 0-16, shipped inside the package), so preparing needs no
network. Each example is a 32x32 canvas divided into a 2x2 grid of 16x16 cells; 1 to 4 cells (count
and cells uniform) each hold one digit image, pasted at a random offset of 0-8 pixels down and right
inside its cell, so digits never overlap but move around. Pixels are uint8, `round(value * 255 / 16)`,
background 0.

**Caption grammar.** Digits are English words (`zero` .. `nine`). A row with two digits is
`<left> left of <right>`, a row with one digit is `<digit> on the left` or `<digit> on the right`.
Both rows occupied: `<top row> above <bottom row>`; one row only: `<row> at the top` or
`<row> at the bottom`. For example

    7 2 / . .   ->  "seven left of two at the top"
    3 . / 5 1   ->  "three on the left above five left of one"
    . . / . 4   ->  "four on the right at the bottom"
    3 8 / 6 0   ->  "three left of eight above six left of zero"

A caption names every digit and its cell, and `parse_caption` inverts it: the caption is a function
of the image and the image's layout (cells and digits) is a function of the caption, so exact match
means every digit was read and placed right. Captions are 26-45 characters.

**Splits by source image.** The 1,797 digit images are partitioned (seeded, stratified by digit class)
into pools of 70% train, 15% validation and 15% test, and each split's canvases are composed only from
its own pool: no source image of the test split ever appears in training. Each example records its
source image indices (`source_ids`, into `load_digits()`), digit classes and pixel offsets per cell
(-1 for an empty cell), and a one-line text `description` of the grid (`"3 . / 5 1"`, used as the
"source" in reports).

The data is a pure function of the builder version, `SEED` and the split sizes of the config.

    import tensorflow_datasets as tfds
    from data import digit_captions  # registers the builder
    tfds.builder("digit_captions/tiny", data_dir=..., file_format="array_record").download_and_prepare()
"""

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from data import DataError

SEED = 8  # part of the dataset's definition: changing it means a new builder version
CANVAS = 32  # canvas height and width (pixels)
CELL = 16  # the canvas is a 2x2 grid of CELL x CELL cells
DIGIT = 8  # sklearn digit images are DIGIT x DIGIT
NUM_CELLS = 4  # cell order: top left, top right, bottom left, bottom right (index = 2 * row + col)
MAX_VALUE = 16  # sklearn digit pixels are 0..16
POOL_FRACTIONS = {"validation": 0.15, "test": 0.15}  # the rest of each digit class is "train"
SPLITS = ("train", "validation", "test")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EMPTY = -1


def caption(digits: Sequence[int]) -> str:
    """The caption of a layout (grammar in the module docstring).

    Args:
      digits: 4 ints, the digit class in each cell (top left, top right, bottom left, bottom right),
        EMPTY (-1) for an empty cell; at least one cell is filled.
    """
    if len(digits) != NUM_CELLS or not all(d == EMPTY or 0 <= d <= 9 for d in digits):
        raise ValueError(f"digits must be {NUM_CELLS} values in -1..9, got {list(digits)}")
    rows = []
    for left, right in (digits[0:2], digits[2:4]):
        if left != EMPTY and right != EMPTY:
            rows.append(f"{WORDS[left]} left of {WORDS[right]}")
        elif left != EMPTY:
            rows.append(f"{WORDS[left]} on the left")
        elif right != EMPTY:
            rows.append(f"{WORDS[right]} on the right")
        else:
            rows.append(None)
    top, bottom = rows
    if top and bottom:
        return f"{top} above {bottom}"
    if top:
        return f"{top} at the top"
    if bottom:
        return f"{bottom} at the bottom"
    raise ValueError("digits has no filled cell: a caption needs at least one digit")


def _parse_row(phrase: str) -> list[int]:
    words = phrase.split(" ")
    index = {w: i for i, w in enumerate(WORDS)}
    if len(words) == 4 and words[1:3] == ["left", "of"] and {words[0], words[3]} <= set(index):
        return [index[words[0]], index[words[3]]]
    if len(words) == 4 and words[1:3] == ["on", "the"] and words[0] in index:
        if words[3] == "left":
            return [index[words[0]], EMPTY]
        if words[3] == "right":
            return [EMPTY, index[words[0]]]
    raise ValueError(f"{phrase!r} is not a row phrase of the caption grammar")


def parse_caption(text: str) -> list[int]:
    """The layout of a caption: the inverse of `caption` (4 digits, EMPTY for empty cells).

    Raises:
      ValueError: `text` is not a caption of the grammar (one-line message).
    """
    try:
        if " above " in text:
            top, bottom = text.split(" above ")
            return _parse_row(top) + _parse_row(bottom)
        for suffix, row in ((" at the top", 0), (" at the bottom", 1)):
            if text.endswith(suffix):
                cells = _parse_row(text.removesuffix(suffix))
                return cells + [EMPTY, EMPTY] if row == 0 else [EMPTY, EMPTY] + cells
    except ValueError:
        pass
    raise ValueError(f"{text!r} is not a caption of the digit_captions grammar")


def describe(digits: Sequence[int]) -> str:
    """The layout as one line, rows top to bottom: `"3 . / 5 1"` (`.` = empty cell)."""
    marks = ["." if d == EMPTY else str(d) for d in digits]
    return f"{marks[0]} {marks[1]} / {marks[2]} {marks[3]}"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: uint8 images `[1797, 8, 8]` (0..255) and int labels `[1797]`."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / MAX_VALUE)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def split_pools(labels: np.ndarray, seed: int = SEED) -> dict[str, np.ndarray]:
    """Disjoint sorted index arrays per split, together covering every image once.

    Stratified: within each digit class, a seeded permutation gives its first 15% to test, the next
    15% to validation and the rest to train, so every split has every class.
    """
    rng = np.random.default_rng([seed, 0])
    pools = {split: [] for split in SPLITS}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for split in ("test", "validation"):
            size = round(len(members) * POOL_FRACTIONS[split])
            pools[split].append(members[start : start + size])
            start += size
        pools["train"].append(members[start:])
    return {split: np.sort(np.concatenate(parts)) for split, parts in pools.items()}


def compose(
    images: np.ndarray, cells: Sequence[int], source_ids: Sequence[int], offsets: np.ndarray
) -> np.ndarray:
    """A uint8 canvas `[CANVAS, CANVAS, 1]` with `images[source_ids[k]]` pasted at `offsets[k]`.

    Args:
      images: uint8 `[num_images, DIGIT, DIGIT]`.
      cells, source_ids: the cells used and the image in each (equal lengths).
      offsets: int `[len(cells), 2]`, each digit's (row, column) inside its cell, 0..CELL - DIGIT.
    """
    canvas = np.zeros((CANVAS, CANVAS, 1), np.uint8)
    for cell, source, (dy, dx) in zip(cells, source_ids, offsets, strict=True):
        top, left = (cell // 2) * CELL + dy, (cell % 2) * CELL + dx
        canvas[top : top + DIGIT, left : left + DIGIT, 0] = images[source]
    return canvas


def generate(
    sizes: dict[str, int], seed: int = SEED
) -> dict[str, list[dict[str, np.ndarray | str]]]:
    """Examples per split, each composed from the split's own pool of source images.

    Deterministic in (sizes, seed); a split's examples do not depend on the other splits' sizes.
    Each example: `image` uint8 `[32, 32, 1]`, `caption`, `description`, and per cell (top left,
    top right, bottom left, bottom right; -1 when empty) int32 `digits [4]`, `source_ids [4]` and
    `offsets [4, 2]` (the digit's top-left pixel on the canvas).
    """
    images, labels = load_digits()
    pools = split_pools(labels, seed)
    out = {}
    for number, split in enumerate(SPLITS, start=1):
        rng = np.random.default_rng([seed, number])
        pool, examples = pools[split], []
        for _ in range(sizes.get(split, 0)):
            count = int(rng.integers(1, NUM_CELLS + 1))
            cells = np.sort(rng.choice(NUM_CELLS, size=count, replace=False))
            sources = rng.choice(pool, size=count, replace=False)
            offsets = rng.integers(0, CELL - DIGIT + 1, size=(count, 2))
            digits = np.full(NUM_CELLS, EMPTY, np.int32)
            source_ids = np.full(NUM_CELLS, EMPTY, np.int32)
            positions = np.full((NUM_CELLS, 2), EMPTY, np.int32)
            digits[cells] = labels[sources]
            source_ids[cells] = sources
            positions[cells] = offsets + np.stack([cells // 2, cells % 2], axis=1) * CELL
            examples.append(
                {
                    "image": compose(images, cells, sources, offsets),
                    "caption": caption(digits.tolist()),
                    "description": describe(digits.tolist()),
                    "digits": digits,
                    "source_ids": source_ids,
                    "offsets": positions,
                }
            )
        out[split] = examples
    return out


@dataclasses.dataclass(eq=False)
class DigitCaptionsConfig(tfds.core.BuilderConfig):
    """Split sizes of a `digit_captions` variant."""

    train_size: int = 20_000
    validation_size: int = 1_000
    test_size: int = 1_000


class DigitCaptions(tfds.core.GeneratorBasedBuilder):
    """1-4 handwritten digits (scikit-learn's) on a 32x32 canvas, captioned with their layout."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        DigitCaptionsConfig(
            name="default", description="20,000 train / 1,000 validation / 1,000 test."
        ),
        DigitCaptionsConfig(
            name="tiny",
            description="1,000 / 100 / 100, for tests and quick runs.",
            train_size=1_000,
            validation_size=100,
            test_size=100,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        cells = tfds.features.Tensor(shape=(NUM_CELLS,), dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(CANVAS, CANVAS, 1), dtype=np.uint8),
                    "caption": tfds.features.Text(),
                    "description": tfds.features.Text(),
                    "digits": cells,
                    "source_ids": cells,
                    "offsets": tfds.features.Tensor(shape=(NUM_CELLS, 2), dtype=np.int32),
                }
            ),
            supervised_keys=("image", "caption"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the digits ship with scikit-learn
        config = self.builder_config
        sizes = {
            "train": config.train_size,
            "validation": config.validation_size,
            "test": config.test_size,
        }
        try:
            examples = generate(sizes)
        except ImportError:
            raise DataError(
                "digit_captions needs scikit-learn (its digits ship inside it): "
                "pip install -r requirements.txt"
            ) from None
        return {split: self._generate_examples(examples[split]) for split in SPLITS}

    def _generate_examples(self, examples):
        yield from enumerate(examples)
