"""A transformers Marian (opus-mt) model directory, read and checked.

`read_directory(directory)` reads a local MarianMTModel directory (`config.json`, weights,
`source.spm`, `target.spm`, `vocab.json` and, for separate vocabularies, `target_vocab.json`;
`tokenizer_config.json` is optional) into the model's Transformer hyperparameters, its state dict
and its two `tokenizers.MarianTokenizer`s; `MarianDirectory.params(shapes)` maps the state dict to
seqzoo params. Nothing is downloaded: the user points at a directory (e.g. one that
`huggingface-cli download Helsinki-NLP/opus-mt-en-de --local-dir DIR` fetched). Whatever is wrong
with it is one `InteropError` line naming the file and the fix. Writing it as a run directory is
`experiment/pretrained.py`'s.

Weights come from `model.safetensors` (numpy, no PyTorch needed); a `pytorch_model.bin` is read only
with `torch.load(..., weights_only=True)`, which refuses pickles that hold anything but tensors, and
only where torch is installed (without it: one line saying what to install).
"""

import dataclasses
import json
from pathlib import Path

from data import DataError, tokenizers
from interop import InteropError, marian


@dataclasses.dataclass(frozen=True)
class MarianDirectory:
    """What a Marian directory holds, in seqzoo's terms: Transformer `hparams` (with the vocabulary
    sizes and special ids), the `state` dict (transformers' names -> float32 numpy arrays) read from
    `weights_file`, and the source and target tokenizers."""

    hparams: dict
    state: dict
    weights_file: str
    src_tokenizer: tokenizers.MarianTokenizer
    tgt_tokenizer: tokenizers.MarianTokenizer

    def params(self, expected_shapes: dict) -> dict:
        """seqzoo params (nested dict of float32 numpy arrays) of the weights; `expected_shapes`: the
        model's param shapes (a nested dict like the params, e.g. from `jax.eval_shape` of its
        init)."""
        return marian.params_from_state_dict(
            self.state, self.hparams, expected_shapes, self.weights_file
        )


def read_directory(directory) -> MarianDirectory:
    """The Marian model in `directory`: its config, tokenizers and weights, in that order of
    checking (the weights' layers and embedding against the config before any model is built);
    `InteropError` for the first thing that is missing or wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InteropError(
            f"{directory} is not a directory: point at a local Marian model directory"
        )
    hparams = read_config(directory)
    src_tokenizer, tgt_tokenizer = read_tokenizers(directory, hparams)
    state, weights_file = read_weights(directory)
    marian.check_sizes(state, hparams, weights_file)
    return MarianDirectory(hparams, state, weights_file, src_tokenizer, tgt_tokenizer)


def _read_json(path: Path):
    """The JSON value in `path` (of any type: the callers check it)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InteropError(
            f"{path.parent} is not a Marian model directory: it has no {path.name} (point at the "
            "directory holding config.json, the weights and the tokenizer files)"
        ) from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise InteropError(f"{path} is not readable JSON ({e}): restore the file") from None


def _read_object(path: Path, what: str, valid) -> dict:
    """The JSON object in `path`, whose every value passes `valid` (it is `what`)."""
    value = _read_json(path)
    if not isinstance(value, dict):
        raise InteropError(
            f"{path} holds a JSON {type(value).__name__}, not an object: restore the model's own"
        )
    for key, item in value.items():
        if not valid(item):
            raise InteropError(
                f"{path} has {key} {json.dumps(item)}, not {what}: restore the model's own"
            )
    return value


def read_config(directory: Path) -> dict:
    """Transformer hyperparameters of `directory/config.json` (`marian.hparams_from_config`)."""
    path = directory / "config.json"
    return marian.hparams_from_config(_read_json(path), str(path))


def read_weights(directory: Path) -> tuple[dict, str]:
    """The state dict (name -> numpy array) of a Marian directory and the file it came from."""
    path = directory / marian.SAFETENSORS
    if path.is_file():
        from safetensors.numpy import load_file

        try:
            return load_file(str(path)), str(path)
        except Exception as e:  # noqa: BLE001 — safetensors raises its own kinds
            raise InteropError(
                f"{path} is not a readable safetensors file ({e}): restore it"
            ) from None
    path = directory / marian.PICKLE
    if not path.is_file():
        raise InteropError(
            f"{directory} has no {marian.SAFETENSORS} nor {marian.PICKLE}: put the model's weights there"
        )
    try:
        import torch
    except ImportError:
        raise InteropError(
            f"{path} is a PyTorch pickle, which needs torch to read: pip install torch (the CPU "
            "build: --index-url https://download.pytorch.org/whl/cpu), or convert the weights to "
            f"{marian.SAFETENSORS} where torch is installed"
        ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — torch raises UnpicklingError, RuntimeError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InteropError(
            f"{path} is not a plain tensor pickle (torch.load with weights_only=True refused it: "
            f"{reason}): convert it to {marian.SAFETENSORS} where you trust it, e.g. with transformers' "
            "save_pretrained(..., safe_serialization=True)"
        ) from None
    if not isinstance(state, dict) or not all(hasattr(v, "numpy") for v in state.values()):
        raise InteropError(
            f"{path} does not hold a dict of tensors: it is not a model's state dict"
        )
    return {k: v.float().numpy() for k, v in state.items()}, str(path)


def read_tokenizers(directory: Path, hparams: dict):
    """(source, target) `MarianTokenizer`s of a Marian directory."""
    settings = {}  # tokenizer_config.json is optional (older opus-mt uploads lack it)
    if (directory / "tokenizer_config.json").is_file():
        settings = _read_object(directory / "tokenizer_config.json", "a setting", lambda v: True)
    separate = settings.get("separate_vocabs", not hparams["share_embeddings"])
    if not isinstance(separate, bool):
        raise InteropError(
            f"{directory / 'tokenizer_config.json'} has separate_vocabs {json.dumps(separate)}, "
            "not true or false: restore the model's own"
        )
    files = ["source.spm", "target.spm", "vocab.json"]
    if separate:
        files.append("target_vocab.json")
    for name in files:
        if not (directory / name).is_file():
            raise InteropError(
                f"{directory} has no {name}: a Marian model directory holds its tokenizer files "
                f"({', '.join(files)}) beside config.json; copy them from the model's source"
            )
    target_name = "target_vocab.json" if separate else "vocab.json"
    source_vocab, target_vocab = (
        _read_object(directory / name, "a token id (an integer >= 0)", marian.is_token_id)
        for name in ("vocab.json", target_name)
    )
    bos = hparams["bos_id"]
    try:
        src = tokenizers.MarianTokenizer(
            (directory / "source.spm").read_bytes(), source_vocab, bos, "vocab.json"
        )
        tgt = tokenizers.MarianTokenizer(
            (directory / "target.spm").read_bytes(), target_vocab, bos, target_name
        )
    except (RuntimeError, OSError) as e:  # sentencepiece: not a model file
        raise InteropError(
            f"{directory}: a tokenizer file is not a SentencePiece model ({e})"
        ) from None
    except DataError as e:
        raise InteropError(f"{directory}/{e}") from None
    for side, tokenizer, size in (
        ("source", src, hparams["src_vocab_size"]),
        ("target", tgt, hparams["tgt_vocab_size"]),
    ):
        if tokenizer.vocab_size > size:
            raise InteropError(
                f"{directory}: the {side} vocabulary has ids up to {tokenizer.vocab_size - 1}, "
                f"beyond the model's {size} embeddings: the tokenizer files are not this model's"
            )
        ids = tokenizer.special_ids
        if (ids.pad, ids.eos) != (hparams["pad_id"], hparams["eos_id"]):
            raise InteropError(
                f"{directory}: the {side} vocabulary has <pad> {ids.pad} and </s> {ids.eos}, but "
                f"config.json says pad_token_id {hparams['pad_id']} and eos_token_id "
                f"{hparams['eos_id']}: the tokenizer files are not this model's"
            )
    return src, tgt
