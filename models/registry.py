"""Model names -> Linen module classes, and a constructor that checks overrides.

A model's default hyperparameters are its module's own dataclass defaults (models/<family>.py), which
suit the dates task and Multi30k on a CPU (the captioner: digit_captions); configs override any of
them by name.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from models.attention_rnn import AttentionRNN
from models.captioner import RNNCaptioner, TransformerCaptioner
from models.seq2seq_rnn import Seq2SeqRNN
from models.transformer import Transformer

MODELS: dict[str, type[nn.Module]] = {
    "seq2seq_rnn": Seq2SeqRNN,
    "attention_rnn": AttentionRNN,
    "transformer": Transformer,
    "captioner_rnn": RNNCaptioner,
    "captioner_transformer": TransformerCaptioner,
}

_NOT_HPARAMS = ("src_vocab_size", "tgt_vocab_size", "parent", "name")
_DTYPE_FIELDS = ("dtype", "param_dtype")


def _lookup(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODELS)}")
    return MODELS[name]


def _hparam_fields(name: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(_lookup(name)) if f.name not in _NOT_HPARAMS]


def hparam_names(name: str) -> tuple[str, ...]:
    """Every hyperparameter `create_model` accepts for `name` (dtype and param_dtype included)."""
    return tuple(f.name for f in _hparam_fields(name))


def default_hparams(name: str) -> dict[str, Any]:
    """A copy of the default hyperparameters of model `name`: its module's dataclass defaults."""
    return {f.name: f.default for f in _hparam_fields(name)}


def create_model(name: str, *, src_vocab_size: int, tgt_vocab_size: int, **overrides) -> nn.Module:
    """The Linen module `name` with its default hyperparameters updated by `overrides`.

    `dtype` and `param_dtype` may be given as strings ("bfloat16"). Raises a one-line ValueError for an
    unknown model or hyperparameter, listing the valid ones, or for an invalid value.
    """
    module_class = _lookup(name)
    valid = hparam_names(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for model {name!r}: "
            f"use {', '.join(valid)}"
        )
    hparams = dict(overrides)  # the rest: the module's own defaults
    for field in _DTYPE_FIELDS:
        if field in hparams:
            try:
                hparams[field] = jnp.dtype(hparams[field]).type
            except TypeError:
                raise ValueError(
                    f"{field}={hparams[field]!r} is not a dtype: use e.g. float32 or bfloat16"
                ) from None
    return module_class(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, **hparams)


def example_source(model: nn.Module) -> jax.Array:
    """A one-example source batch of the kind `model` reads, for `init` (parameter shapes do not
    depend on its size): the model's own `example_source()` if it has one (the captioner: a float32
    image `[1, h, w, channels]`), else token ids int32 `[1, 4]`."""
    make = getattr(model, "example_source", None)
    return make() if make is not None else jnp.ones((1, 4), jnp.int32)


def reads_images(model: nn.Module) -> bool:
    """Whether `model`'s source is a batch of images `[batch, height, width, channels]`."""
    return example_source(model).ndim == 4


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (or in a `{"params": ...}` variables dict)."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params))
