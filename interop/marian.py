"""transformers' `MarianMTModel` (the opus-mt models) as a seqzoo `Transformer`, and back.

Pure functions on dicts: a Marian `config.json` <-> Transformer hyperparameters, and a Marian state
dict (numpy arrays under transformers' names) <-> the Transformer's params. Reading and writing
Marian directories (safetensors, tokenizers) is `interop/marian_import.py` and
`interop/marian_export.py`.

A Marian model is the post-LN encoder-decoder Transformer with learned-free sinusoidal positions laid
out as halves (sines, then cosines), token embeddings scaled by sqrt(d_model) (`scale_embedding`),
biased q/k/v/out projections, a `final_logits_bias`, PyTorch's LayerNorm epsilon 1e-5, and its own
special ids (opus-mt-en-de: pad 58100, EOS 0, UNK 1; decoding starts from pad). Its vocabulary is
shared between source and target (one embedding table) or separate (`share_encoder_decoder_
embeddings: false`); the output projection is the target embedding (`tie_word_embeddings`) or its
own `lm_head`.

Export writes a seqzoo Transformer in that form. A model with interleaved positions (seqzoo's
default) is exported exactly by permuting the model dimension: the network is the same function of
its residual stream in any feature order (LayerNorm, attention heads and the FFN read every feature
alike), so feature `perm[j]` of every d_model-sized axis moves to position j, which turns the
interleaved table into the halves one. Pre-LN models have no Marian form and are refused.
"""

import functools
import json

import numpy as np

from contracts import is_int
from interop import InteropError
from models.transformer import sinusoidal_positions

SAFETENSORS = "model.safetensors"  # a Marian directory's weights
PICKLE = "pytorch_model.bin"  # or, in older uploads, these (a PyTorch pickle)

# transformers' activation names -> ours, and back.
ACTIVATIONS = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu_exact"}
ACTIVATIONS.update({"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"})
EXPORT_ACTIVATIONS = {"silu": "swish", "relu": "relu", "gelu_exact": "gelu", "gelu": "gelu_new"}
# Rows of a positions table, which seqzoo computes whole (opus-mt: 512).
MIN_POSITIONS, MAX_POSITIONS = 16, 1 << 16
LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's, fixed in MarianMTModel
# Options of the BART family that MarianMTModel does not have: a config that turns one on is
# another architecture.
FOREIGN_OPTIONS = (
    "normalize_before",
    "add_final_layer_norm",
    "normalize_embedding",
    "layernorm_embedding",
    "static_position_embeddings",
    "add_bias_logits",
)


def hparams_from_config(config: dict, name: str = "config.json") -> dict:
    """Transformer hyperparameters (`registry.create_model("transformer", ...)` kwargs, with
    `src_vocab_size` / `tgt_vocab_size`) of a Marian `config.json`'s parsed JSON; `InteropError`
    naming `name` and the field for anything unsupported, missing or of the wrong type or range."""
    if not isinstance(config, dict):
        raise InteropError(
            f"{name} holds a JSON {type(config).__name__}, not an object of settings: it is not a "
            "Marian config.json; restore the model's own"
        )
    model_type = config.get("model_type")
    if model_type != "marian":
        raise InteropError(
            f"{name} has model_type {model_type!r}, not 'marian': only MarianMTModel (opus-mt) "
            "checkpoints can be imported"
        )
    on = [option for option in FOREIGN_OPTIONS if config.get(option)]
    if on:
        raise InteropError(
            f"{name} sets {on[0]}, which MarianMTModel does not have: this checkpoint is another "
            "architecture and cannot be imported"
        )
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        if len(eos) != 1:
            raise InteropError(f"{name} has eos_token_id {eos}: seqzoo decodes to one EOS")
        config = {**config, "eos_token_id": eos[0]}
    field = functools.partial(_field, config, name)
    shared = field("share_encoder_decoder_embeddings", _FLAG, True)
    vocab = field("vocab_size", _COUNT)
    decoder_vocab = field("decoder_vocab_size", _COUNT, vocab)
    if shared and decoder_vocab != vocab:
        raise InteropError(
            f"{name} shares embeddings but has vocab_size {vocab} and decoder_vocab_size "
            f"{decoder_vocab}: a shared vocabulary has one size"
        )
    sizes = {}
    for encoder, decoder in (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    ):
        sizes[encoder] = field(encoder, _COUNT)
        if field(decoder, _COUNT) != sizes[encoder]:
            raise InteropError(
                f"{name} has {encoder}={config[encoder]} but {decoder}={config[decoder]}: "
                "seqzoo's Transformer uses one value for both"
            )
    d_model, heads = field("d_model", _COUNT), sizes["encoder_attention_heads"]
    if d_model % heads or d_model % 2:
        raise InteropError(
            f"{name} has d_model {d_model}: seqzoo's Transformer needs it even and divisible by "
            f"encoder_attention_heads ({heads}); use the config.json that came with the weights"
        )
    activation = field("activation_function", _TEXT, "gelu")
    if activation not in ACTIVATIONS:
        raise InteropError(
            f"{name} has activation_function {activation!r}: supported are "
            f"{', '.join(sorted(ACTIVATIONS))}"
        )
    vocab_sizes = {"vocab_size": vocab, "decoder_vocab_size": decoder_vocab}
    ids = {}  # pad and EOS end and pad sources and targets; decoding starts from BOS
    for key, sides in (
        ("pad_token_id", ("vocab_size", "decoder_vocab_size")),
        ("eos_token_id", ("vocab_size", "decoder_vocab_size")),
        ("decoder_start_token_id", ("decoder_vocab_size",)),
    ):
        default = ids["pad_token_id"] if key == "decoder_start_token_id" else _REQUIRED
        ids[key] = field(key, _ID, default)
        for side in sides:
            if ids[key] >= vocab_sizes[side]:
                raise InteropError(
                    f"{name} has {key} {ids[key]}, beyond its {side} {vocab_sizes[side]}: use the "
                    "config.json that came with the weights"
                )
    return {
        "src_vocab_size": vocab,
        "tgt_vocab_size": decoder_vocab,
        "d_model": d_model,
        "num_heads": heads,
        "num_encoder_layers": field("encoder_layers", _COUNT),
        "num_decoder_layers": field("decoder_layers", _COUNT),
        "ffn_dim": sizes["encoder_ffn_dim"],
        "dropout_rate": field("dropout", _RATE, 0.1),
        "attention_dropout_rate": field("attention_dropout", _RATE, 0.0),
        "activation_dropout_rate": field("activation_dropout", _RATE, 0.0),
        "pre_ln": False,
        "share_embeddings": shared,
        "tie_output": field("tie_word_embeddings", _FLAG, True),
        "activation": ACTIVATIONS[activation],
        "max_positions": field("max_position_embeddings", _POSITIONS, 512),
        "scale_embeddings": field("scale_embedding", _FLAG, False),
        "position_layout": "halves",
        "final_logits_bias": True,
        "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "pad_id": ids["pad_token_id"],
        "bos_id": ids["decoder_start_token_id"],
        "eos_id": ids["eos_token_id"],
    }


def is_token_id(value) -> bool:
    """True for an integer >= 0 (not a bool): what a Marian vocabulary or config.json holds as an
    id."""
    return is_int(value) and value >= 0


# What a config.json field must be: (check, what it is called in the error).
_COUNT = (lambda v: is_int(v) and v >= 1, "a positive integer")
_ID = (is_token_id, "a token id (an integer >= 0)")
_RATE = (
    lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1,
    "a rate in [0, 1)",
)
_POSITIONS = (
    lambda v: is_int(v) and MIN_POSITIONS <= v <= MAX_POSITIONS,
    f"a number of positions from {MIN_POSITIONS} to {MAX_POSITIONS}",
)
_FLAG = (lambda v: isinstance(v, bool), "true or false")
_TEXT = (lambda v: isinstance(v, str), "a string")
_REQUIRED = object()


def _field(config: dict, name: str, key: str, kind: tuple, default=_REQUIRED):
    """`config[key]` (`default` if absent, or null where the default is not `_REQUIRED`), checked
    to be of `kind`; `InteropError` naming the file `name` and `key` otherwise."""
    value = config.get(key)
    if value is None and default is not _REQUIRED:
        return default
    if key not in config:
        raise InteropError(f"{name} lacks {key!r}: it is not a complete Marian config")
    check, what = kind
    if not check(value):
        raise InteropError(
            f"{name} has {key} {json.dumps(value)}, not {what}: use the config.json that came "
            "with the weights"
        )
    return value


def config_from_hparams(hparams: dict) -> dict:
    """The Marian `config.json` of Transformer `hparams` (with the vocabulary sizes and special ids);
    `InteropError` for a model that has no Marian form."""
    if hparams.get("pre_ln", True):
        raise InteropError(
            "this run is pre-LN (pre_ln=True), which MarianMTModel cannot express: export runs "
            "trained with --config.model_hparams.pre_ln=False"
        )
    activation = hparams.get("activation", "relu")
    shared = bool(hparams.get("share_embeddings", False))
    pad, bos, eos = hparams.get("pad_id", 0), hparams.get("bos_id", 1), hparams.get("eos_id", 2)
    return {
        "model_type": "marian",
        "architectures": ["MarianMTModel"],
        "vocab_size": hparams["src_vocab_size"],
        "decoder_vocab_size": hparams["tgt_vocab_size"],
        "share_encoder_decoder_embeddings": shared,
        "tie_word_embeddings": bool(hparams.get("tie_output", True)),
        "d_model": hparams["d_model"],
        "encoder_layers": hparams["num_encoder_layers"],
        "decoder_layers": hparams["num_decoder_layers"],
        "encoder_attention_heads": hparams["num_heads"],
        "decoder_attention_heads": hparams["num_heads"],
        "encoder_ffn_dim": hparams["ffn_dim"],
        "decoder_ffn_dim": hparams["ffn_dim"],
        "activation_function": EXPORT_ACTIVATIONS[activation],
        "max_position_embeddings": hparams["max_positions"],
        "scale_embedding": bool(hparams.get("scale_embeddings", True)),
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "pad_token_id": pad,
        "eos_token_id": eos,
        "decoder_start_token_id": bos,
        "forced_eos_token_id": eos,
        "is_encoder_decoder": True,
    }


def generation_config(hparams: dict) -> dict:
    """`generation_config.json`: never generate pad or BOS (seqzoo's decoders do not either)."""
    pad, bos, eos = hparams.get("pad_id", 0), hparams.get("bos_id", 1), hparams.get("eos_id", 2)
    return {
        "bad_words_ids": [[i] for i in sorted({pad, bos})],
        "decoder_start_token_id": bos,
        "eos_token_id": eos,
        "forced_eos_token_id": eos,
        "pad_token_id": pad,
        "max_length": hparams["max_positions"],
        "num_beams": 4,
    }


# ----------------------------------------------------------------------------------- the weights


def _entries(hparams: dict):
    """(transformers name, seqzoo param path, kind) of every weight of `hparams`' model. Kinds:
    "embed" `[vocab, d]` both sides; "bias_row" `[1, V]` <-> `[V]`; "linear" torch `[out, in]` <->
    flax `[in, out]`; "q"/"k"/"v" `[d, d]` <-> `[d, heads, head_dim]` (bias `[heads, head_dim]`);
    "o" `[d, d]` <-> `[heads, head_dim, d]`; "vector" `[n]` both sides."""
    entries = []
    if hparams["share_embeddings"]:
        entries.append(("model.shared.weight", ("tgt_embed", "embedding"), "embed"))
    else:
        entries.append(("model.encoder.embed_tokens.weight", ("src_embed", "embedding"), "embed"))
        entries.append(("model.decoder.embed_tokens.weight", ("tgt_embed", "embedding"), "embed"))
    if not hparams["tie_output"]:
        entries.append(("lm_head.weight", ("output", "kernel"), "linear"))
    if hparams.get("final_logits_bias"):
        entries.append(("final_logits_bias", ("logits_bias",), "bias_row"))

    def attention(prefix, path):
        for theirs, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            entries.append((f"{prefix}.{theirs}.weight", (*path, ours, "kernel"), "qkv"))
            entries.append((f"{prefix}.{theirs}.bias", (*path, ours, "bias"), "qkv_bias"))
        entries.append((f"{prefix}.out_proj.weight", (*path, "out", "kernel"), "o"))
        entries.append((f"{prefix}.out_proj.bias", (*path, "out", "bias"), "vector"))

    def norm(prefix, path):
        entries.append((f"{prefix}.weight", (*path, "scale"), "vector"))
        entries.append((f"{prefix}.bias", (*path, "bias"), "vector"))

    def ffn(prefix, path):
        for theirs, ours in (("fc1", "inner"), ("fc2", "outer")):
            entries.append((f"{prefix}.{theirs}.weight", (*path, "ffn", ours, "kernel"), "linear"))
            entries.append((f"{prefix}.{theirs}.bias", (*path, "ffn", ours, "bias"), "vector"))

    for i in range(hparams["num_encoder_layers"]):
        prefix, path = f"model.encoder.layers.{i}", (f"encoder_layers_{i}",)
        attention(f"{prefix}.self_attn", (*path, "self_attention"))
        norm(f"{prefix}.self_attn_layer_norm", (*path, "norm1"))
        ffn(prefix, path)
        norm(f"{prefix}.final_layer_norm", (*path, "norm2"))
    for i in range(hparams["num_decoder_layers"]):
        prefix, path = f"model.decoder.layers.{i}", (f"decoder_layers_{i}",)
        attention(f"{prefix}.self_attn", (*path, "self_attention"))
        norm(f"{prefix}.self_attn_layer_norm", (*path, "norm1"))
        attention(f"{prefix}.encoder_attn", (*path, "cross_attention"))
        norm(f"{prefix}.encoder_attn_layer_norm", (*path, "norm2"))
        ffn(prefix, path)
        norm(f"{prefix}.final_layer_norm", (*path, "norm3"))
    return entries


# Keys a Marian state dict may hold that map to nothing here: positions (a fixed table, recomputed),
# and the tied copies of the embedding.
_IGNORED = (
    "model.encoder.embed_positions.weight",
    "model.decoder.embed_positions.weight",
    "model.encoder.embed_tokens.weight",
    "model.decoder.embed_tokens.weight",
    "lm_head.weight",
)


def _to_ours(value: np.ndarray, kind: str, heads: int) -> np.ndarray:
    if kind == "bias_row":
        return value.reshape(-1)
    if kind in ("linear", "qkv"):
        value = value.T
        return value.reshape(value.shape[0], heads, -1) if kind == "qkv" else value
    if kind == "qkv_bias":
        return value.reshape(heads, -1)
    if kind == "o":
        return value.T.reshape(heads, -1, value.shape[0])
    return value


def _to_theirs(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "bias_row":
        return value.reshape(1, -1)
    if kind == "qkv":
        return value.reshape(value.shape[0], -1).T
    if kind == "qkv_bias":
        return value.reshape(-1)
    if kind == "o":
        return value.reshape(-1, value.shape[-1]).T
    if kind == "linear":
        return value.T
    return value


def _stored(state: dict, theirs: str, name: str) -> str:
    """The key of `state` that holds the weight `theirs`; `InteropError` if none does."""
    key = theirs
    if key not in state and theirs == "model.shared.weight":
        key = "model.encoder.embed_tokens.weight"  # some exports keep only the tied copies
    if key not in state:
        raise InteropError(
            f"{name} has no {theirs}, which its config.json needs: the weights are not of this "
            "model (or not a Marian checkpoint)"
        )
    return key


def check_sizes(state: dict, hparams: dict, name: str) -> None:
    """`InteropError` unless the Marian state dict `state` (read from `name`) has the layers and the
    embedding table that `hparams` (its config.json) say: checked before a model of that size is
    built, so that a damaged config.json cannot make one that does not fit in memory."""
    for side, field in (("encoder", "num_encoder_layers"), ("decoder", "num_decoder_layers")):
        prefix = f"model.{side}.layers."
        found = {key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)}
        count = hparams[field]  # compared first: it may be far too big to count up to
        if len(found) != count or found != {str(i) for i in range(count)}:
            raise InteropError(
                f"{name} holds {len(found)} {side} layers, but config.json says {side}_layers "
                f"{hparams[field]}: use the config.json that came with these weights"
            )
    shared = hparams["share_embeddings"]
    key = _stored(
        state, "model.shared.weight" if shared else "model.encoder.embed_tokens.weight", name
    )
    expected = (hparams["src_vocab_size"], hparams["d_model"])
    if tuple(np.shape(state[key])) != expected:
        raise InteropError(
            f"{name}: {key} has shape {tuple(np.shape(state[key]))}, but config.json says "
            f"vocab_size {expected[0]} and d_model {expected[1]}: use the config.json that came "
            "with these weights"
        )


def params_from_state_dict(state: dict, hparams: dict, expected_shapes: dict, name: str) -> dict:
    """seqzoo params (nested dict of float32 numpy arrays) of a Marian state dict.

    `expected_shapes`: the model's param shapes (a nested dict like the params, e.g. from
    `jax.eval_shape` of its init). Raises `InteropError` naming the first missing, unexpected,
    mis-shaped, non-float or non-finite weight of `name` (the weights file).
    """
    heads = hparams["num_heads"]
    params: dict = {}
    used = set()
    for theirs, path, kind in _entries(hparams):
        key = _stored(state, theirs, name)
        value = np.asarray(state[key])
        if not np.issubdtype(value.dtype, np.floating):
            raise InteropError(
                f"{name}: {key} holds {value.dtype} values, not floating point: the weights are "
                "damaged or not a model's; restore them"
            )
        value = np.asarray(value, np.float32)
        if not np.isfinite(value).all():
            raise InteropError(
                f"{name}: {key} holds non-finite values (NaN or infinity): the weights are "
                "damaged; restore them"
            )
        value = _to_ours(value, kind, heads)
        expected = tuple(_lookup(expected_shapes, path))
        if value.shape != expected:
            raise InteropError(
                f"{name}: {theirs} has shape {tuple(np.shape(state[key]))}, which does not match "
                f"config.json (seqzoo expects {expected} for {'/'.join(path)}): use the "
                "config.json that came with these weights"
            )
        _assign(params, path, value)
        used.add(key)
    if not hparams["tie_output"]:  # lm_head has no bias of its own: final_logits_bias is it
        _assign(params, ("output", "bias"), np.zeros(hparams["tgt_vocab_size"], np.float32))
    unexpected = sorted(set(state) - used - set(_IGNORED))
    if unexpected:
        raise InteropError(
            f"{name} holds {unexpected[0]} (and {len(unexpected) - 1} more), which MarianMTModel "
            "with this config.json does not have: the weights are of another architecture"
        )
    return params


def state_dict_from_params(params, hparams: dict) -> dict:
    """The Marian state dict (float32 numpy arrays under transformers' names) of seqzoo params,
    the model dimension permuted to Marian's halves position layout when the model's positions
    are interleaved (see the module docstring)."""
    perm = None
    if hparams.get("position_layout", "interleaved") == "interleaved":
        perm = feature_permutation(hparams["d_model"])
    state = {}
    for theirs, path, kind in _entries(hparams):
        value = np.asarray(_lookup(params, path), np.float32)
        if perm is not None:
            value = _permute(value, kind, path, perm)
        state[theirs] = np.ascontiguousarray(_to_theirs(value, kind))
    bias = state.get("final_logits_bias", np.zeros((1, hparams["tgt_vocab_size"]), np.float32))
    if not hparams["tie_output"]:  # our own projection's bias joins final_logits_bias
        bias = bias + np.asarray(params["output"]["bias"], np.float32)[None]
    state["final_logits_bias"] = np.ascontiguousarray(bias, np.float32)
    return state


def feature_permutation(d_model: int) -> np.ndarray:
    """int `[d_model]`: `halves[:, j] = interleaved[:, perm[j]]` of the two position tables."""
    perm = np.concatenate([np.arange(0, d_model, 2), np.arange(1, d_model, 2)])
    interleaved = sinusoidal_positions(4, d_model, "interleaved")
    assert np.array_equal(interleaved[:, perm], sinusoidal_positions(4, d_model, "halves"))
    return perm


def _permute(value: np.ndarray, kind: str, path: tuple, perm: np.ndarray) -> np.ndarray:
    """`value` (seqzoo layout) with its d_model axes reordered by `perm`."""
    if kind == "embed":
        return value[:, perm]
    if kind == "qkv":  # [d_model (in), heads, head_dim]
        return value[perm]
    if kind == "o":  # [heads, head_dim, d_model (out)]
        return value[..., perm]
    if kind == "linear":
        if path[-2] == "inner":  # fc1 [d_model, ffn]
            return value[perm]
        if path[-2] == "outer":  # fc2 [ffn, d_model]
            return value[:, perm]
        return value[perm]  # lm_head [d_model, vocab]
    if kind == "vector" and path[-2] not in ("inner",):  # LayerNorm, out/fc2 biases: d_model
        return value[perm]
    return value  # q/k/v biases, fc1 bias, logits bias: not over d_model


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _assign(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
