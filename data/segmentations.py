"""Subword sampling (Kudo 2018, "Subword Regularization"): each training pair's n-best
segmentations, and one draw of them per epoch, which `batching.TrainPipeline` reads batches from."""

import dataclasses
from collections.abc import Sequence

import numpy as np

from data import examples
from data.tokenizers import SpecialIds


@dataclasses.dataclass(frozen=True)
class Segmentations:
    """Each training pair's n-best segmentations, for subword sampling (Kudo 2018, "Subword
    Regularization"): every epoch, each side of each example is read in one of them, drawn with
    probability proportional to exp(alpha x log-probability) among those that fit its bucket.

    `alternatives[k]` holds every example's k-th best segmentation (its best where it has fewer);
    `src_scores`, `tgt_scores`: float64 [num_examples, n], their log-probabilities, -inf where an
    example has no k-th best.
    """

    alternatives: tuple[examples.Tokenized, ...]
    src_scores: np.ndarray
    tgt_scores: np.ndarray
    alpha: float

    @classmethod
    def from_nbest(
        cls,
        src_nbest: Sequence[Sequence[tuple[Sequence[int], float]]],
        tgt_nbest: Sequence[Sequence[tuple[Sequence[int], float]]],
        special_ids: SpecialIds,
        alpha: float,
    ):
        """`src_nbest[i]`, `tgt_nbest[i]`: example i's [(ids, log-probability), ...], best first."""
        n = max(map(len, [*src_nbest, *tgt_nbest]))

        def side(nbest):
            ids = [[c[min(k, len(c) - 1)][0] for c in nbest] for k in range(n)]
            scores = np.full((len(nbest), n), -np.inf)
            for i, candidates in enumerate(nbest):
                scores[i, : len(candidates)] = [score for _, score in candidates]
            return ids, scores

        (src_ids, src_scores), (tgt_ids, tgt_scores) = side(src_nbest), side(tgt_nbest)
        alternatives = tuple(
            examples.Tokenized.from_lists(s, t, special_ids)
            for s, t in zip(src_ids, tgt_ids, strict=True)
        )
        return cls(alternatives, src_scores, tgt_scores, alpha)

    def sample(
        self, rng: np.random.Generator, src_limits: np.ndarray, tgt_limits: np.ndarray
    ) -> "SampledTokenized":
        """One segmentation per example and side, none longer than its limit (padded lengths, int
        [num_examples]; the best segmentation always counts as fitting)."""

        def choose(scores, lengths, limits):
            fits = (lengths <= limits[:, None]) & np.isfinite(scores)
            fits[:, 0] = True
            logits = np.where(fits, self.alpha * np.where(fits, scores, 0.0), -np.inf)
            return np.argmax(logits + rng.gumbel(size=scores.shape), axis=1)  # Gumbel-max

        src_lengths, tgt_lengths = (
            np.stack(side, axis=1) for side in zip(*map(examples.padded_lengths, self.alternatives))
        )
        return SampledTokenized(
            self.alternatives,
            choose(self.src_scores, src_lengths, src_limits),
            choose(self.tgt_scores, tgt_lengths, tgt_limits),
            self.alternatives[0].special_ids,
        )


@dataclasses.dataclass(frozen=True)
class SampledTokenized:
    """`Tokenized`'s reading of one draw of `Segmentations`: example i's source is its
    `src_choice[i]`-th best segmentation, its target the `tgt_choice[i]`-th (int [num_examples])."""

    alternatives: tuple[examples.Tokenized, ...]
    src_choice: np.ndarray
    tgt_choice: np.ndarray
    special_ids: SpecialIds

    def source(self, i: int) -> np.ndarray:
        return self.alternatives[self.src_choice[i]].source(i)

    def target(self, i: int) -> np.ndarray:
        return self.alternatives[self.tgt_choice[i]].target(i)
