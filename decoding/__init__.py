"""Decoding on a step function and a state pytree, never on a model (see docs/design.md).

`step_fn(tokens [N] int32, state) -> (logits [N, vocab], new_state)`; every leaf of `state` has the N
rows first; beam search reorders the rows after each step to follow the hypotheses' parents, except
under `BeamShared`. Length normalization and the length T are defined in `decoding.length_penalty`.
"""

from decoding.beam_search import BeamSearchResult, beam_search
from decoding.common import BeamShared
from decoding.error_analysis import error_analysis, format_error_analysis
from decoding.greedy import DecodeResult, greedy
from decoding.sampling import sample
from decoding.scoring import ScoreResult, score
from decoding.settings import DecodeSettings

__all__ = [
    "BeamSearchResult",
    "BeamShared",
    "DecodeResult",
    "DecodeSettings",
    "ScoreResult",
    "beam_search",
    "error_analysis",
    "format_error_analysis",
    "greedy",
    "sample",
    "score",
]
