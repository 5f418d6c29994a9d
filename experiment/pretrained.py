"""Pretrained models: a transformers Marian (opus-mt) directory as a seqzoo run directory, and back.

`import_marian(hf_dir, workdir)` reads a local MarianMTModel directory (`config.json`, weights,
`source.spm`, `target.spm`, `vocab.json` and, for separate vocabularies, `target_vocab.json`) and
writes a run directory that eval.py, the sweep, the error analysis and `train.py
--config.init_from` read like any trained run: `config.json` (model "transformer" with the Marian
options and the model's special ids), `tokenizer/{src,tgt}` (`tokenizers.MarianTokenizer`) and the
params as `pretrained/0`. Nothing is downloaded: the user points at a directory (e.g. one that
`huggingface-cli download Helsinki-NLP/opus-mt-en-de --local-dir DIR` fetched).

Weights come from `model.safetensors`; a `pytorch_model.bin` is read only with `torch.load(...,
weights_only=True)`, which refuses pickles that hold anything but tensors.

`export_marian(workdir, out_dir)` writes a post-LN seqzoo Transformer run as a Marian directory
(`model.safetensors`, `config.json`, `generation_config.json`, tokenizer files) that transformers'
`MarianMTModel` / `MarianTokenizer` load and CTranslate2's converter accepts.

Either way everything is written to a temporary directory beside the target and renamed into place
at the end: a failure leaves nothing half-written.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from configs import default
from data import DataError, tokenizers
from experiment import RunError, checkpoints, programs
from experiment import config as run_config
from models import marian

PRETRAINED_DIR = "pretrained"  # a run directory's imported params (`pretrained/0`)
SAFETENSORS = "model.safetensors"
PICKLE = "pytorch_model.bin"


# ------------------------------------------------------------------------------------------ import


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(
            f"{path.parent} is not a Marian model directory: it has no {path.name} (point at the "
            "directory holding config.json, the weights and the tokenizer files)"
        ) from None
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is not readable JSON ({e}): restore the file") from None


def read_weights(directory: Path) -> tuple[dict, str]:
    """The state dict (name -> numpy array) of a Marian directory and the file it came from."""
    path = directory / SAFETENSORS
    if path.is_file():
        from safetensors.numpy import load_file

        try:
            return load_file(str(path)), str(path)
        except Exception as e:  # noqa: BLE001 — safetensors raises its own kinds
            raise RunError(f"{path} is not a readable safetensors file ({e}): restore it") from None
    path = directory / PICKLE
    if not path.is_file():
        raise RunError(
            f"{directory} has no {SAFETENSORS} nor {PICKLE}: put the model's weights there"
        )
    try:
        import torch
    except ImportError:
        raise RunError(
            f"{path} is a PyTorch pickle, which needs torch to read: install it (README, "
            f"set-up), or convert the weights to {SAFETENSORS}"
        ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — torch raises UnpicklingError, RuntimeError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(
            f"{path} is not a plain tensor pickle (torch.load with weights_only=True refused it: "
            f"{reason}): convert it to {SAFETENSORS} where you trust it, e.g. with transformers' "
            "save_pretrained(..., safe_serialization=True)"
        ) from None
    if not isinstance(state, dict) or not all(hasattr(v, "numpy") for v in state.values()):
        raise RunError(f"{path} does not hold a dict of tensors: it is not a model's state dict")
    return {k: v.float().numpy() for k, v in state.items()}, str(path)


def read_tokenizers(directory: Path, hparams: dict):
    """(source, target) `MarianTokenizer`s of a Marian directory."""
    settings = {}  # tokenizer_config.json is optional (older opus-mt uploads lack it)
    if (directory / "tokenizer_config.json").is_file():
        settings = _read_json(directory / "tokenizer_config.json")
    separate = bool(settings.get("separate_vocabs", not hparams["share_embeddings"]))
    files = ["source.spm", "target.spm", "vocab.json"]
    if separate:
        files.append("target_vocab.json")
    for name in files:
        if not (directory / name).is_file():
            raise RunError(
                f"{directory} has no {name}: a Marian model directory holds its tokenizer files "
                f"({', '.join(files)}) beside config.json; copy them from the model's source"
            )
    source_vocab = _read_json(directory / "vocab.json")
    target_name = "target_vocab.json" if separate else "vocab.json"
    target_vocab = _read_json(directory / target_name)
    bos = hparams["bos_id"]
    try:
        src = tokenizers.MarianTokenizer(
            (directory / "source.spm").read_bytes(), source_vocab, bos, "vocab.json"
        )
        tgt = tokenizers.MarianTokenizer(
            (directory / "target.spm").read_bytes(), target_vocab, bos, target_name
        )
    except (RuntimeError, OSError) as e:  # sentencepiece: not a model file
        raise RunError(
            f"{directory}: a tokenizer file is not a SentencePiece model ({e})"
        ) from None
    except DataError as e:
        raise RunError(f"{directory}/{e}") from None
    for side, tokenizer, size in (
        ("source", src, hparams["src_vocab_size"]),
        ("target", tgt, hparams["tgt_vocab_size"]),
    ):
        if tokenizer.vocab_size > size:
            raise RunError(
                f"{directory}: the {side} vocabulary has ids up to {tokenizer.vocab_size - 1}, "
                f"beyond the model's {size} embeddings: the tokenizer files are not this model's"
            )
        ids = tokenizer.special_ids
        if (ids.pad, ids.eos) != (hparams["pad_id"], hparams["eos_id"]):
            raise RunError(
                f"{directory}: the {side} vocabulary has <pad> {ids.pad} and </s> {ids.eos}, but "
                f"config.json says pad_token_id {hparams['pad_id']} and eos_token_id "
                f"{hparams['eos_id']}: the tokenizer files are not this model's"
            )
    return src, tgt


def run_config_for(hparams: dict, **fields) -> ml_collections.ConfigDict:
    """A run config for a Transformer of `hparams` (vocabulary sizes come from the tokenizers)."""
    config = default.get_config()
    config.model = "transformer"
    config.model_hparams = ml_collections.ConfigDict(
        {k: v for k, v in hparams.items() if k not in ("src_vocab_size", "tgt_vocab_size")}
    )
    config.tokenizer = tokenizers.MarianTokenizer.kind
    config.shared_vocab = bool(hparams.get("share_embeddings", True))
    config.eval_metric = "bleu"
    config.decode = "beam"
    for key, value in fields.items():
        if value is not None:
            config[key] = value
    return config


@contextlib.contextmanager
def _staged(target: Path):
    """A temporary directory beside `target`, renamed to it on success, removed on failure."""
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise RunError(f"{target} exists and is not empty: choose a new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_marian(hf_dir, workdir, **config_fields) -> ml_collections.ConfigDict:
    """Writes the Marian model in `hf_dir` as a run directory `workdir`; returns its config.

    `config_fields` set run-config fields (e.g. `dataset`, `manual_dir`, `max_len`,
    `max_decode_len`): what eval.py evaluates and decodes with.
    """
    hf_dir, workdir = Path(hf_dir), Path(workdir)
    if not hf_dir.is_dir():
        raise RunError(f"{hf_dir} is not a directory: point at a local Marian model directory")
    try:
        hparams = marian.hparams_from_config(
            _read_json(hf_dir / "config.json"), str(hf_dir / "config.json")
        )
    except KeyError as e:
        raise RunError(
            f"{hf_dir}/config.json lacks {e}: it is not a complete Marian config"
        ) from None
    except marian.MarianError as e:
        raise RunError(str(e)) from None
    src_tokenizer, tgt_tokenizer = read_tokenizers(hf_dir, hparams)
    state, weights_file = read_weights(hf_dir)
    config = run_config_for(hparams, **config_fields)
    model = programs.create_model(config, hparams["src_vocab_size"], hparams["tgt_vocab_size"])
    shapes = jax.tree.map(
        lambda x: x.shape, jax.eval_shape(lambda: programs.init_params(model, config))
    )
    try:
        params = marian.params_from_state_dict(state, hparams, shapes, weights_file)
    except marian.MarianError as e:
        raise RunError(str(e)) from None
    with _staged(workdir) as tmp:
        run_config.save_config(config, tmp)
        src_tokenizer.save(tmp / run_config.SRC_TOKENIZER)
        tgt_tokenizer.save(tmp / run_config.TGT_TOKENIZER)
        save_params(tmp, params)
    return config


def save_params(workdir: Path, params) -> None:
    """`params` as the run's `pretrained/0` checkpoint (with its integrity record)."""
    options = ocp.CheckpointManagerOptions(create=True)
    directory = Path(workdir).absolute() / PRETRAINED_DIR
    with ocp.CheckpointManager(directory, options=options) as manager:
        checkpoints.save(manager, 0, ocp.args.StandardSave(jax.tree.map(np.asarray, params)))


# ------------------------------------------------------------------------------ fine-tuning start


MODEL_FIELDS = ("model", "model_hparams", "tokenizer", "shared_vocab", "vocab_size")


def adopt_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the model of the run `config.init_from` (its `MODEL_FIELDS`); unchanged
    without one. The tokenizers and params come from there too (`input_pipeline`,
    `training.restore_or_init`)."""
    if not config.get("init_from"):
        return config
    source = Path(config.init_from)
    if not (source / run_config.CONFIG_FILE).is_file():
        raise RunError(
            f"init_from={source} is not a run directory (no {run_config.CONFIG_FILE}): point at a "
            "trained run or a `convert.py import` directory"
        )
    theirs = run_config.load_config(source)
    config = ml_collections.ConfigDict(config.to_dict())
    for field in MODEL_FIELDS:
        config[field] = theirs[field]
    return config


# ------------------------------------------------------------------------------------------ export


def _vocabulary(tokenizer) -> dict[str, int]:
    """piece -> id of a SentencePiece or Marian tokenizer (what `vocab.json` holds)."""
    if isinstance(tokenizer, tokenizers.MarianTokenizer):
        return dict(tokenizer.vocab)
    if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
        return {piece: i for i, piece in enumerate(tokenizer.pieces(range(tokenizer.vocab_size)))}
    raise RunError(
        f"the run's {tokenizer.kind} tokenizer has no Marian form: export runs trained with "
        "--config.tokenizer=sentencepiece"
    )


def export_marian(workdir, out_dir, average_checkpoints: int = 0) -> Path:
    """Writes the run in `workdir` (its best params, or the mean of its last
    `average_checkpoints`) as a Marian model directory `out_dir`."""
    from safetensors.numpy import save_file

    from evaluation.loading import Run

    run = Run(Path(workdir), average_checkpoints)
    if run.config.model != "transformer":
        raise RunError(
            f"the run's model is {run.config.model}: only Transformer runs have a Marian form"
        )
    # Every field of the built model, defaults included (the run's config lists only what it set).
    hparams = {f.name: getattr(run.model, f.name) for f in dataclasses.fields(run.model)}
    try:
        config = marian.config_from_hparams(hparams)
    except marian.MarianError as e:
        raise RunError(str(e)) from None
    src_vocab, tgt_vocab = _vocabulary(run.src_tokenizer), _vocabulary(run.tgt_tokenizer)
    separate = not hparams["share_embeddings"]
    params = jax.device_get(run.params)
    state = marian.state_dict_from_params(params, hparams)
    with _staged(Path(out_dir)) as tmp:
        save_file(state, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = marian.generation_config(hparams)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "source.spm").write_bytes(run.src_tokenizer.model_proto)
        (tmp / "target.spm").write_bytes(run.tgt_tokenizer.model_proto)
        (tmp / "vocab.json").write_text(json.dumps(src_vocab, ensure_ascii=False))
        if separate:
            (tmp / "target_vocab.json").write_text(json.dumps(tgt_vocab, ensure_ascii=False))
        settings = {
            "tokenizer_class": "MarianTokenizer",
            "separate_vocabs": separate,
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "model_max_length": hparams["max_positions"],
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return Path(out_dir)
