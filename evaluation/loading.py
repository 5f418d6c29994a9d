"""A trained run loaded for evaluation."""

import functools
import sys
from pathlib import Path

import jax

import sharding
from data import tokenizers
from experiment import RunError, checkpoints, decode_programs, programs
from experiment import config as run_config
from models import int8
from models.transformer import Transformer


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr)


class Run:
    """A trained run loaded for evaluation: config, tokenizers, model, `params` (int8 with
    `quantize="int8"`) and `decoding_params`, the same as decoding and scoring read them fastest
    (`decode_programs.decoding_params`, made on first use).

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
        return decode_programs.decoding_params(self.model, self.params)


def int8_params(model, params, name: str):
    """`params` with int8 kernels (`models.int8.quantize_params`); the text Transformer only,
    whose dense layers all take `models.int8`'s product."""
    if not isinstance(model, Transformer):
        raise RunError(
            f"--quantize int8: {name} has no int8 path; use a transformer run or leave --quantize out"
        )
    quantize = functools.partial(int8.quantize_params, tied_output=model.tie_output)
    return jax.jit(quantize)(params)
