"""How to decode: `DecodeSettings`, the one settings object of decoding.

A run's config holds one (`config.decoding`, overridden by `--config.decoding.<field>=value`;
training validates with it), eval.py makes a command-line flag of each field (`--<field>`, its help
the field's `metadata["help"]`), and `experiment.decode_programs.decode_fn` takes one whole. The
fields in `TRACED` are inputs of a compiled decode program, the others shape it (one compilation
per value). Besides the settings, what follows from them alone: their one-line errors (`check`),
each sentence's length limit (`source_limits`, `length_limits`), the keys of a draw (`sampling`) and
the report's fields (`report`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from decoding import length_penalty
from decoding.beam_search import POLICIES, STOPPING

DECODES = ("greedy", "beam", "sample")


def setting(default, help: str, choices: tuple = ()):
    """A dataclass field with its default, its help and its allowed values (none: any), as eval.py
    makes a command-line flag of it."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How to decode: greedy, beam or sample, length normalization, length limits, n-gram blocking,
    sampling and per-token alignments (each field's `metadata["help"]` says what it does)."""

    decode: str = setting("beam", "Greedy search, beam search, or sampling.", DECODES)
    beam_size: int = setting(4, "Beam width B.")
    alpha: float = setting(0.6, "Length-normalization exponent.")
    length_penalty: str = setting(
        "gnmt",
        "Length normalization: rank by log P / ((5+T)/6)^alpha (gnmt), / T^alpha (average), or "
        "log P (none).",
        length_penalty.KINDS,
    )
    max_decode_len: int = setting(128, "Generated tokens at most (EOS included).")
    max_decode_len_a: float = setting(
        0.0,
        "> 0: each sentence generates at most ceil(a * source tokens) + b tokens, and never more "
        "than max_decode_len (fairseq's --max-len-a/b; 0 turns it off).",
    )
    max_decode_len_b: int = setting(0, "The b of max_decode_len_a.")
    no_repeat_ngram_size: int | None = setting(
        None, "n >= 1: no n-gram occurs twice in an output (greedy, beam and sampling); unset: off."
    )
    temperature: float = setting(1.0, "Sampling: divides the log-probabilities (> 0).")
    top_k: int = setting(0, "Sampling: draw from the k likeliest tokens (0: all).")
    top_p: float = setting(1.0, "Sampling: draw from the nucleus of this probability, in (0, 1].")
    num_samples: int = setting(
        1, "Sampling: N draws per sentence; the first is the output (eval.py writes all N)."
    )
    seed: int = setting(0, "Sampling: draw j of sentence i uses fold_in(fold_in(key(seed), j), i).")
    alignment_layer: int | None = setting(
        None,
        "The decoder cross-attention layer whose head-averaged weights give each output token's "
        "most attended source token (Python indexing: -1 is the last layer); unset: none.",
    )
    beam_policy: str = setting(
        "classic",
        "Beam search: the extensions kept at each step. classic: the beam_size best, an EOS one "
        "taking a place (Marian, OpenNMT); full: the 2 x beam_size best are candidates, EOS ones "
        "among the first beam_size finish and the beam_size best others stay alive (transformers, "
        "fairseq, CTranslate2). docs/design.md, Beam policies, says which setting matches which.",
        POLICIES,
    )
    beam_stopping: str = setting(
        "exact",
        "Beam search: when a sentence stops. exact: once no alive hypothesis can still win "
        "(transformers' early_stopping='never'); heuristic: once the best alive one, scored at its "
        "current length, would not (early_stopping=False, transformers' default); nbest: once "
        "beam_size hypotheses have finished (early_stopping=True, fairseq, CTranslate2).",
        STOPPING,
    )

    def check(self, prefix: str = "") -> "DecodeSettings":
        """Returns the settings; raises a one-line ValueError naming the first bad field as
        `<prefix><field>=<value>` (e.g. prefix "--" for eval.py's flags) and its fix."""
        for name, choices in (
            ("decode", DECODES),
            ("length_penalty", length_penalty.KINDS),
            ("beam_policy", POLICIES),
            ("beam_stopping", STOPPING),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{prefix}{name}={getattr(self, name)}: use one of {', '.join(choices)}"
                )
        problems = {
            "beam_size": (self.beam_size < 1, "use a beam of 1 or more"),
            "max_decode_len": (self.max_decode_len < 1, "use a limit of 1 token or more"),
            "no_repeat_ngram_size": (
                self.no_repeat_ngram_size is not None and self.no_repeat_ngram_size < 1,
                "use n >= 1 (e.g. 3), or leave it out to allow repeats",
            ),
            "temperature": (self.temperature <= 0, "use a value > 0 (lower is closer to greedy)"),
            "top_k": (self.top_k < 0, "use k >= 1, or 0 to keep every token"),
            "top_p": (not 0 < self.top_p <= 1, "use a value in (0, 1] (1 keeps every token)"),
            "num_samples": (self.num_samples < 1, "use N >= 1"),
        }
        for name, (bad, fix) in problems.items():
            if bad:
                raise ValueError(f"{prefix}{name}={getattr(self, name)}: {fix}")
        return self

    def static(self) -> "DecodeSettings":
        """These settings with the `TRACED` fields at their defaults: what a compiled decode program
        depends on (`decode_fn` compiles once per value of it)."""
        return dataclasses.replace(self, **{name: DEFAULTS[name] for name in TRACED})

    def source_limits(self, src: jax.Array, pad_id: int) -> jax.Array | None:
        """int32 `[batch]` `ceil(max_decode_len_a * source tokens) + max_decode_len_b` for text
        `src [batch, src_len]` (traced or not); None (no per-sentence limit) when
        `max_decode_len_a` is 0 or the sources are images."""
        if self.max_decode_len_a <= 0 or src.ndim != 2:
            return None
        lengths = jnp.sum(src != pad_id, axis=-1)
        return jnp.ceil(self.max_decode_len_a * lengths).astype(jnp.int32) + self.max_decode_len_b

    def length_limits(self, src: np.ndarray, pad_id: int) -> np.ndarray:
        """int `[batch]`: the most tokens (EOS included) each sentence of `src` may generate:
        `max_decode_len`, or `min(max_decode_len, ceil(a * source tokens) + b)`."""
        limits = self.source_limits(jnp.asarray(src), pad_id)
        full = np.full(len(src), self.max_decode_len)
        return full if limits is None else np.minimum(full, np.asarray(limits))

    def sampling(self, draw: int, example_ids: np.ndarray) -> dict | None:
        """A decode program's `sampling` input for draw `draw` of the sentences `example_ids
        [batch]`: sentence i's draw j uses the key `fold_in(fold_in(key(seed), j), example_ids[i])`,
        so it does not depend on the batching. None unless `decode == "sample"`."""
        if self.decode != "sample":
            return None
        return {
            "rng": jax.random.fold_in(jax.random.key(self.seed), draw),
            "temperature": jnp.float32(self.temperature),
            "top_k": jnp.int32(self.top_k),
            "top_p": jnp.float32(self.top_p),
            "example_ids": jnp.asarray(example_ids, jnp.int32),
        }

    def report(self) -> dict:
        """The settings as a JSON report names them (the beam search fields only with beam search,
        the sampling fields only when sampling)."""
        report = {
            "decode": self.decode,
            "beam_size": self.beam_size if self.decode == "beam" else 1,
            "alpha": self.alpha,
            "length_penalty": self.length_penalty,
            "max_decode_len": self.max_decode_len,
            "max_decode_len_a": self.max_decode_len_a,
            "max_decode_len_b": self.max_decode_len_b,
            "no_repeat_ngram_size": self.no_repeat_ngram_size or 0,
        }
        if self.decode == "beam":
            report.update(beam_policy=self.beam_policy, beam_stopping=self.beam_stopping)
        if self.decode == "sample":
            fields = ("temperature", "top_k", "top_p", "num_samples", "seed")
            report.update({f: getattr(self, f) for f in fields})
        return report


# What a compiled decode program does not depend on (its inputs, or not read by it): changing them
# never recompiles.
TRACED = ("alpha", "temperature", "top_k", "top_p", "num_samples", "seed")
DEFAULTS = {field.name: field.default for field in dataclasses.fields(DecodeSettings)}
