"""What models, decoding and data agree on; a leaf module (it imports nothing of the project).

- Special ids of seqzoo's tokenizers: PAD 0 (never generated; the filler after EOS and of every
  padded array), BOS 1 (the decoder's first input), EOS 2 (ends a sequence), UNK 3. Models mask
  padding by `PAD_ID`; decoders take `bos_id` / `eos_id` as arguments.
- `BeamShared`: decoder state that beam search does not reorder between beams.
- `check_positive`: the one-line error for a count that must be a positive integer.
"""

import numbers
from typing import Any, NamedTuple

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NUM_SPECIAL = 4


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
