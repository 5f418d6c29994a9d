"""A split's examples in memory, stored flat: token ids of (source, target) pairs (`Tokenized`),
images with tokenized captions (`ImageCaptions`), and the array lengths each example needs in a batch
(`padded_lengths`). data/batching.py makes batches of them; data/segmentations.py their n-best."""

import dataclasses
from collections.abc import Sequence

import numpy as np

from data.tokenizers import SEQZOO_IDS, SpecialIds


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """Token ids of (source, target) pairs, stored flat; no BOS/EOS.

    Example i's source is `src[src_offsets[i]:src_offsets[i + 1]]` (int32), likewise its target.
    `special_ids`: the tokenizers' pad, BOS and EOS, which batches are built with.
    """

    src: np.ndarray
    src_offsets: np.ndarray
    tgt: np.ndarray
    tgt_offsets: np.ndarray
    special_ids: SpecialIds = SEQZOO_IDS

    @classmethod
    def from_lists(
        cls,
        src_ids: Sequence[Sequence[int]],
        tgt_ids: Sequence[Sequence[int]],
        special_ids: SpecialIds = SEQZOO_IDS,
    ):
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
        src, src_offsets = _flatten(src_ids)
        tgt, tgt_offsets = _flatten(tgt_ids)
        return cls(src, src_offsets, tgt, tgt_offsets, SpecialIds(*special_ids))

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    @property
    def src_lengths(self) -> np.ndarray:
        """Tokens per source, int64 [num_examples]."""
        return np.diff(self.src_offsets)

    @property
    def tgt_lengths(self) -> np.ndarray:
        """Tokens per target, int64 [num_examples]."""
        return np.diff(self.tgt_offsets)

    def source(self, i: int) -> np.ndarray:
        return self.src[self.src_offsets[i] : self.src_offsets[i + 1]]

    def target(self, i: int) -> np.ndarray:
        return self.tgt[self.tgt_offsets[i] : self.tgt_offsets[i + 1]]


@dataclasses.dataclass(frozen=True)
class ImageCaptions:
    """Images with tokenized captions (the targets, no BOS/EOS), captions stored flat.

    `images` is uint8 `[num_examples, height, width, channels]` (0..255); example i's caption is
    `tgt[tgt_offsets[i]:tgt_offsets[i + 1]]` (int32).
    """

    images: np.ndarray
    tgt: np.ndarray
    tgt_offsets: np.ndarray

    @classmethod
    def from_lists(cls, images: np.ndarray, tgt_ids: Sequence[Sequence[int]]):
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [num_examples, height, width, channels], got "
                f"{images.dtype} {list(images.shape)}"
            )
        if len(images) != len(tgt_ids):
            raise ValueError(f"{len(images)} images but {len(tgt_ids)} captions")
        tgt, tgt_offsets = _flatten(tgt_ids)
        return cls(images, tgt, tgt_offsets)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def src_lengths(self) -> np.ndarray:
        """0 for every example: an image has no sequence length, int64 [num_examples]."""
        return np.zeros(len(self), np.int64)

    @property
    def tgt_lengths(self) -> np.ndarray:
        """Tokens per caption, int64 [num_examples]."""
        return np.diff(self.tgt_offsets)

    def image(self, i: int) -> np.ndarray:
        """float32 `[height, width, channels]` in [0, 1]."""
        return self.images[i].astype(np.float32) / 255.0

    def target(self, i: int) -> np.ndarray:
        return self.tgt[self.tgt_offsets[i] : self.tgt_offsets[i + 1]]


def _flatten(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.fromiter((i for row in rows for i in row), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def padded_lengths(data: Tokenized | ImageCaptions) -> tuple[np.ndarray, np.ndarray]:
    """Array lengths each example needs, with EOS (src) and BOS/EOS (tgt): int64 [num_examples].

    Image sources need no length: 0.
    """
    if isinstance(data, ImageCaptions):
        return data.src_lengths, data.tgt_lengths + 1
    return data.src_lengths + 1, data.tgt_lengths + 1
