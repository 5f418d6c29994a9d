"""A trained run loaded for evaluation, and the search settings to decode it with."""

import dataclasses
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import sharding
from data import tokenizers
from experiment import RunError, checkpoints, programs
from experiment import config as run_config
from models import int8
from models.transformer import Transformer


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr)


class Run:
    """A trained run loaded for evaluation: config, tokenizers, model, `params` (int8 with
    `quantize="int8"`) and `decoding_params`, the same as decoding and scoring read them fastest
    (`programs.decoding_params`, made on first use).

    Evaluation runs on this host's devices, whatever mesh trained the run: batches are split over
    all of them (`mesh`, one `data` axis) and the params, read from the checkpoint straight into
    that layout, are replicated on each.
    """

    def __init__(self, workdir: Path, average_checkpoints: int = 0, quantize: str = "none"):
        self.workdir = Path(workdir)
        self.mesh = sharding.make_mesh()
        self.config = run_config.load_config(self.workdir)
        self.src_tokenizer = tokenizers.load(self.workdir / run_config.SRC_TOKENIZER)
        self.tgt_tokenizer = tokenizers.load(self.workdir / run_config.TGT_TOKENIZER)
        self.model = programs.create_model(
            self.config, self.src_tokenizer.vocab_size, self.tgt_tokenizer.vocab_size
        )
        programs.check_tokenizer_ids(self.model, self.src_tokenizer, self.tgt_tokenizer)
        self.special_ids = programs.special_ids(self.model)
        shapes = jax.eval_shape(lambda: programs.init_params(self.model, self.config))
        replicated = jax.tree.map(lambda _: sharding.replicated(self.mesh), shapes)
        template = sharding.abstract(shapes, replicated)
        self.params, self.step, self.checkpoint = checkpoints.restore_params(
            self.workdir, template, average_checkpoints
        )
        if quantize == "int8":
            self.params = int8_params(self.model, self.params, self.config.model)

    @functools.cached_property
    def decoding_params(self):
        return programs.decoding_params(self.model, self.params)


def int8_params(model, params, name: str):
    """`params` with int8 kernels (`models.int8.quantize_params`); the text Transformer only,
    whose dense layers all take `models.int8`'s product."""
    if not isinstance(model, Transformer):
        raise RunError(
            f"--quantize int8: {name} has no int8 path; use a transformer run or leave --quantize out"
        )
    quantize = functools.partial(int8.quantize_params, tied_output=model.tie_output)
    return jax.jit(quantize)(params)


@dataclasses.dataclass(frozen=True)
class Search:
    """How to decode: greedy, beam (`beam_size`) or sample, length normalization (`length_penalty`,
    `alpha`) and length limits (`max_decode_len`, and per sentence `ceil(max_decode_len_a x source
    tokens) + max_decode_len_b` when `max_decode_len_a > 0`; see `programs.decode_fn`), n-gram
    blocking (`no_repeat_ngram_size`), sampling (`temperature`, `top_k`, `top_p`, `num_samples`
    draws per sentence from `seed`) and per-token alignments (`alignment_layer`, None: off)."""

    decode: str
    beam_size: int
    alpha: float
    length_penalty: str
    max_decode_len: int
    max_decode_len_a: float = 0.0
    max_decode_len_b: int = 0
    no_repeat_ngram_size: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    alignment_layer: int | None = None

    def sampling(self, draw: int, example_ids: np.ndarray) -> dict | None:
        """`decode_fn`'s sampling settings for draw `draw` of the sentences `example_ids [batch]`:
        sentence i's draw j uses the key `fold_in(fold_in(key(seed), j), example_ids[i])`, so it
        does not depend on the batching. None unless `decode == "sample"`."""
        if self.decode != "sample":
            return None
        return {
            "rng": jax.random.fold_in(jax.random.key(self.seed), draw),
            "temperature": jnp.float32(self.temperature),
            "top_k": jnp.int32(self.top_k),
            "top_p": jnp.float32(self.top_p),
            "example_ids": jnp.asarray(example_ids, jnp.int32),
        }

    def decode_fn(self, run: Run):
        return programs.decode_fn(
            run.model,
            self.decode,
            self.beam_size,
            self.max_decode_len,
            self.length_penalty,
            run.mesh,
            self.max_decode_len_a,
            self.max_decode_len_b,
            self.no_repeat_ngram_size,
            self.alignment_layer,
        )

    def length_limits(self, src, pad_id: int) -> "object":
        """int `[batch]`: each sentence's most generated tokens (EOS included) for `src`."""
        return programs.decode_length_limits(
            src, self.max_decode_len, self.max_decode_len_a, self.max_decode_len_b, pad_id
        )

    def report(self) -> dict:
        """The settings as the JSON report names them."""
        report = {
            "decode": self.decode,
            "beam_size": self.beam_size if self.decode == "beam" else 1,
            "alpha": self.alpha,
            "length_penalty": self.length_penalty,
            "max_decode_len": self.max_decode_len,
            "max_decode_len_a": self.max_decode_len_a,
            "max_decode_len_b": self.max_decode_len_b,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if self.decode == "sample":
            fields = ("temperature", "top_k", "top_p", "num_samples", "seed")
            report.update({f: getattr(self, f) for f in fields})
        return report
