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

import numpy as np

from interop import InteropError
from models.transformer import sinusoidal_positions

SAFETENSORS = "model.safetensors"  # a Marian directory's weights
PICKLE = "pytorch_model.bin"  # or, in older uploads, these (a PyTorch pickle)

# transformers' activation names -> ours, and back.
ACTIVATIONS = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu_exact"}
ACTIVATIONS.update({"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"})
EXPORT_ACTIVATIONS = {"silu": "swish", "relu": "relu", "gelu_exact": "gelu", "gelu": "gelu_new"}
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
    `src_vocab_size` / `tgt_vocab_size`) of a Marian `config.json`; `InteropError` if unsupported."""
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
    pairs = (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    )
    for encoder, decoder in pairs:
        if config.get(encoder) != config.get(decoder):
            raise InteropError(
                f"{name} has {encoder}={config.get(encoder)} but {decoder}={config.get(decoder)}: "
                "seqzoo's Transformer uses one value for both"
            )
    activation = config.get("activation_function", "gelu")
    if activation not in ACTIVATIONS:
        raise InteropError(
            f"{name} has activation_function {activation!r}: supported are "
            f"{', '.join(sorted(ACTIVATIONS))}"
        )
    shared = bool(config.get("share_encoder_decoder_embeddings", True))
    vocab = int(config["vocab_size"])
    decoder_vocab = int(config.get("decoder_vocab_size") or vocab)
    if shared and decoder_vocab != vocab:
        raise InteropError(
            f"{name} shares embeddings but has vocab_size {vocab} and decoder_vocab_size "
            f"{decoder_vocab}: a shared vocabulary has one size"
        )
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        if len(eos) != 1:
            raise InteropError(f"{name} has several eos_token_id {eos}: seqzoo decodes to one EOS")
        eos = eos[0]
    pad = config.get("pad_token_id")
    bos = config.get("decoder_start_token_id", pad)
    if pad is None or eos is None or bos is None:
        raise InteropError(
            f"{name} lacks pad_token_id, eos_token_id or decoder_start_token_id: add them"
        )
    return {
        "src_vocab_size": vocab,
        "tgt_vocab_size": decoder_vocab,
        "d_model": int(config["d_model"]),
        "num_heads": int(config["encoder_attention_heads"]),
        "num_encoder_layers": int(config["encoder_layers"]),
        "num_decoder_layers": int(config["decoder_layers"]),
        "ffn_dim": int(config["encoder_ffn_dim"]),
        "dropout_rate": float(config.get("dropout", 0.1)),
        "attention_dropout_rate": float(config.get("attention_dropout", 0.0)),
        "activation_dropout_rate": float(config.get("activation_dropout", 0.0)),
        "pre_ln": False,
        "share_embeddings": shared,
        "tie_output": bool(config.get("tie_word_embeddings", True)),
        "activation": ACTIVATIONS[activation],
        "max_positions": int(config.get("max_position_embeddings", 512)),
        "scale_embeddings": bool(config.get("scale_embedding", False)),
        "position_layout": "halves",
        "final_logits_bias": True,
        "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "pad_id": int(pad),
        "bos_id": int(bos),
        "eos_id": int(eos),
    }


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


def params_from_state_dict(state: dict, hparams: dict, expected_shapes: dict, name: str) -> dict:
    """seqzoo params (nested dict of float32 numpy arrays) of a Marian state dict.

    `expected_shapes`: the model's param shapes (a nested dict like the params, e.g. from
    `jax.eval_shape` of its init). Raises `InteropError` naming the first missing, unexpected or
    mis-shaped weight of `name` (the weights file).
    """
    heads = hparams["num_heads"]
    params: dict = {}
    used = set()
    for theirs, path, kind in _entries(hparams):
        key = theirs
        if key not in state and theirs == "model.shared.weight":
            key = "model.encoder.embed_tokens.weight"  # some exports keep only the tied copies
        if key not in state:
            raise InteropError(
                f"{name} has no {theirs}, which its config.json needs: the weights are not of this "
                "model (or not a Marian checkpoint)"
            )
        value = _to_ours(np.asarray(state[key], np.float32), kind, heads)
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
