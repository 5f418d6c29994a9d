"""What models, decoding and data agree on; a leaf module (it imports nothing of the project).

- `SpecialIds`: a vocabulary's pad, BOS, EOS and UNK ids. PAD is never generated and fills every
  padded array (sources after their EOS, targets, decoded sequences after EOS); BOS is the
  decoder's first input; EOS ends a sequence. They belong to a run's tokenizers and model, never to
  the code: seqzoo's own tokenizers use `SEQZOO_IDS` (pad 0, BOS 1, EOS 2, UNK 3), an imported
  opus-mt model its own (opus-mt-en-de: pad 58100, EOS 0, UNK 1, BOS = pad). Tokenizers carry
  `special_ids`, the data pipeline pads and appends with the tokenizers' ids, models that mask
  padding take `pad_id`, and decoding takes `pad_id` / `bos_id` / `eos_id` as arguments (defaults:
  `SEQZOO_IDS`).
- `BeamShared`: decoder state that beam search does not reorder between beams.
- `check_positive`: the one-line error for a count that must be a positive integer.
"""

import numbers
from typing import Any, NamedTuple

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # seqzoo's own tokenizers' ids
NUM_SPECIAL = 4


class SpecialIds(NamedTuple):
    """A vocabulary's special ids; BOS may equal PAD (Marian starts decoding from pad)."""

    pad: int
    bos: int
    eos: int
    unk: int

    def as_dict(self) -> dict:
        return self._asdict()


SEQZOO_IDS = SpecialIds(PAD_ID, BOS_ID, EOS_ID, UNK_ID)


class BeamShared(NamedTuple):
    """Decoder state that beam search does not reorder: its rows are shared by the beams of a sentence.

    After each step, beam search makes row `n` of the state continue its parent hypothesis' row by
    gathering every leaf by rows; under `BeamShared` it does not. Like any state, its leaves have the
    `N` rows first (repeated from `[batch, ...]` at the start); the step function writes row `n` only
    for hypothesis `n` and reads a hypothesis' past through indices it keeps in the ordinary, reordered
    state. A KV cache kept so is written in place, never copied between beams: each step's new keys go
    to their own row, and a hypothesis' attention reads position `t` from the row recorded for `t`.
    (Greedy, sampling and scoring never reorder rows, so there it is plain state.)
    """

    value: Any


def is_int(value: Any) -> bool:
    """True for a Python or numpy integer (not a bool, not an array)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive(**fields: Any) -> None:
    """Raises a one-line ValueError for the first field that is not a positive integer."""
    for field, value in fields.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"{field}={value!r} must be a positive integer")
