"""Translation datasets by name, as random-access sources of (source_text, target_text) pairs.

Names: `dates`, `dates/tiny`, `dates/lists`, `multi30k/<pair>` (`en-de`, `en-fr`, `de-en`, `fr-en`)
and any TFDS dataset with supervised keys (e.g. `wmt14_translate/de-en`), the source and target being its
`supervised_keys`. Image captioning: `digit_captions`, `digit_captions/tiny`, served as
(image, caption) pairs (`ImageCaptionPairs`). The first `load` of a dataset prepares it in `data_dir`
as array_record files, which `tfds.data_source` then serves without TensorFlow.
"""

import importlib
import os
import tempfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data import DataError, dates, digit_captions, multi30k

SEQZOO_BUILDERS = {
    "dates": dates.Dates,
    "multi30k": multi30k.Multi30k,
    "digit_captions": digit_captions.DigitCaptions,
}
KNOWN_NAMES = (
    "dates",
    "dates/tiny",
    "dates/lists",
    *(f"multi30k/{pair}" for pair in multi30k.PAIRS),
    "digit_captions",
    "digit_captions/tiny",
)
_READ_CHUNK = 4096


class _Pairs:
    """A split of a TFDS data source as a random-access source of pairs made by `_decode`: a valid
    grain random-access data source (`__len__`, `__getitem__`), e.g. for
    `grain.MapDataset.source(pairs)`."""

    def __init__(self, source, keys: tuple[str, str], description: str):
        self._source = source
        self.keys = keys
        self.description = description

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        return self._decode(self._source[index])

    def __getitems__(self, indices) -> list:
        return [self._decode(example) for example in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, {len(self)} pairs, keys={self.keys})"

    def _decode(self, example: dict):
        raise NotImplementedError


class TextPairs(_Pairs):
    """One split as a random-access source of `(source_text, target_text)` string pairs."""

    def columns(self) -> tuple[list[str], list[str]]:
        """All pairs in order, as a list of sources and a list of targets."""
        sources, targets = [], []
        for start in range(0, len(self), _READ_CHUNK):
            for src, tgt in self.__getitems__(range(start, min(start + _READ_CHUNK, len(self)))):
                sources.append(src)
                targets.append(tgt)
        return sources, targets

    def _decode(self, example: dict) -> tuple[str, str]:
        src, tgt = (example[key] for key in self.keys)
        return _text(src), _text(tgt)


class ImageCaptionPairs(_Pairs):
    """One split of an image-captioning dataset as a random-access source of `(image, caption)`.

    `image` is uint8 `[height, width, channels]`; `description` is the dataset's one-line text of
    each image (what reports show as its "source").
    """

    DESCRIPTION_KEY = "description"

    def columns(self) -> tuple[np.ndarray, list[str], list[str]]:
        """All examples in order: uint8 images `[n, height, width, channels]`, captions, and the
        text descriptions of the images."""
        images, captions, descriptions = [], [], []
        for start in range(0, len(self), _READ_CHUNK):
            chunk = range(start, min(start + _READ_CHUNK, len(self)))
            for example in self._source.__getitems__(list(chunk)):
                image, text = self._decode(example)
                images.append(image)
                captions.append(text)
                descriptions.append(_text(example[self.DESCRIPTION_KEY]))
        return np.stack(images), captions, descriptions

    def _decode(self, example: dict) -> tuple[np.ndarray, str]:
        image, text = (example[key] for key in self.keys)
        return np.asarray(image, np.uint8), _text(text)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _is_text_pair(features, keys) -> bool:
    if not isinstance(keys, tuple | list) or len(keys) != 2:
        return False
    return all(
        isinstance(k, str) and k in features and isinstance(features[k], tfds.features.Text)
        for k in keys
    )


def _is_image_caption(features, keys) -> bool:
    """Supervised keys (uint8 image tensor [height, width, channels], text) plus a text description."""
    description = ImageCaptionPairs.DESCRIPTION_KEY
    if not isinstance(keys, tuple | list) or len(keys) != 2:
        return False
    if not all(k in features for k in (*keys, description)):
        return False
    image = features[keys[0]]
    return (
        isinstance(image, tfds.features.Tensor)
        and len(image.shape) == 3
        and np.dtype(image.np_dtype) == np.uint8
        and isinstance(features[keys[1]], tfds.features.Text)
        and isinstance(features[description], tfds.features.Text)
    )


def _unknown_name(name: str) -> DataError:
    return DataError(
        f"unknown dataset {name!r}: use one of {', '.join(KNOWN_NAMES)} or a TFDS translation "
        "dataset name such as wmt14_translate/de-en"
    )


def builder(
    name: str, *, data_dir: str | os.PathLike | None = None, manual_dir=None
) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name` (array_record format), not yet prepared.

    `manual_dir` is Multi30k's raw-file directory (see data/multi30k.py); other builders get it as
    TFDS's manual_dir in `prepare`.
    """
    base = name.split("/")[0].split(":")[0]
    kwargs = {"raw_dir": manual_dir} if base == "multi30k" and manual_dir else {}
    if base not in SEQZOO_BUILDERS:
        importlib.import_module("tensorflow_datasets.translate")  # registers TFDS's legacy ones
    try:
        return tfds.builder(name, data_dir=data_dir, file_format="array_record", **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        raise _unknown_name(name) from None
    except (ValueError, AssertionError) as e:  # unknown config or version
        if "not found" not in str(e) and "cannot be loaded at version" not in str(e):
            raise
        configs = [c.name for c in tfds.builder_cls(base).BUILDER_CONFIGS] or ["(none)"]
        what = "language pair" if base == "multi30k" else "config or version"
        raise DataError(
            f"unknown {what} in {name!r}: {base} has {', '.join(configs)} (e.g. {base}/{configs[0]})"
        ) from None


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
        raise DataError(
            f"data_dir {directory} is not writable ({e.strerror or e}): pass a writable data_dir "
            "(config.data_dir) or set TFDS_DATA_DIR"
        ) from None


def prepare(ds_builder: tfds.core.DatasetBuilder, *, manual_dir=None) -> None:
    """Generates the dataset's array_record files unless they are already there."""
    if ds_builder.is_prepared():
        return
    _check_writable(Path(ds_builder.data_dir_root))
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        ds_builder.download_and_prepare(download_config=config)
    except DataError as e:  # ours, from inside the builder: drop TFDS's frames and prefix
        raise DataError(e.message) from None
    except PermissionError as e:
        raise DataError(
            f"cannot write {e.filename or ds_builder.data_dir}: pass a writable data_dir "
            "(config.data_dir) or set TFDS_DATA_DIR"
        ) from None


def load(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> TextPairs | ImageCaptionPairs:
    """The `split` of dataset `name` as (source_text, target_text) pairs, preparing it if needed.

    An image-captioning dataset (`digit_captions`) gives (image, caption) pairs instead.

    Args:
      name: `dates`, `dates/tiny`, `multi30k/en-de` (etc.) or a TFDS translation dataset name.
      split: `train`, `validation`, `test` (or TFDS slicing such as `train[:1000]`).
      data_dir: TFDS data directory; None means TFDS's default (`TFDS_DATA_DIR` or
        `~/tensorflow_datasets`).
      manual_dir: directory of manually downloaded raw files (Multi30k: the gzip files).

    Raises:
      DataError: unknown name, config or split; missing, empty or corrupt raw files; unwritable
        data_dir; a dataset prepared in a format other than array_record. One-line messages.
    """
    if manual_dir is not None and not Path(manual_dir).is_dir():
        raise DataError(
            f"manual_dir {manual_dir} does not exist: create it and put the raw files there, "
            "or pass manual_dir=None"
        )
    ds_builder = builder(name, data_dir=data_dir, manual_dir=manual_dir)
    keys = ds_builder.info.supervised_keys
    is_image = _is_image_caption(ds_builder.info.features, keys)
    if not is_image and not _is_text_pair(ds_builder.info.features, keys):
        raise DataError(
            f"dataset {name!r} is not a translation dataset (supervised keys {keys} are not two "
            "text features): use one whose supervised_keys are (source text, target text)"
        )
    prepare(ds_builder, manual_dir=manual_dir)
    splits = list(ds_builder.info.splits)
    if split.split("[")[0] not in splits:
        raise DataError(f"dataset {name!r} has no split {split!r}: use one of {', '.join(splits)}")
    try:
        source = ds_builder.as_data_source(split=split)
    except NotImplementedError:
        raise DataError(
            f"{name} in {ds_builder.data_dir} was prepared as {ds_builder.info.file_format.value}, "
            "not array_record: delete that directory or use another data_dir"
        ) from None
    pairs = ImageCaptionPairs if is_image else TextPairs
    return pairs(source, tuple(keys), f"{name}:{split}")


def split_names(name: str, *, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The splits of dataset `name` (e.g. train, validation, test)."""
    return list(builder(name, data_dir=data_dir).info.splits)
