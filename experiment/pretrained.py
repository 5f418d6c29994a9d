"""Pretrained models as run directories: a Marian (opus-mt) model imported as a run, and fine-tuning
that starts from one.

`import_marian(hf_dir, workdir)` reads a local MarianMTModel directory (`interop.marian_import`,
its generation settings `interop.marian_generation`) and writes a run directory that eval.py, the
sweep, the error analysis and `train.py --config.init_from` read like any trained run:
`config.json` (model "transformer" with the Marian options and the model's special ids; its
generation settings as `config.decoding`, which eval.py and the Translator decode with unless told
otherwise; no dataset unless one is given), `tokenizer/{src,tgt}` (`tokenizers.MarianTokenizer`)
and the params as `pretrained/0`. Everything is written to a temporary directory beside the target and
renamed into place at the end (`interop.staging`): a failure leaves nothing half-written. Writing a
run as a Marian directory is `interop.marian_export` (convert.py export).

`adopt_model(config)`: a run started with `--config.init_from=DIR` takes DIR's model.
"""

import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from configs import default
from data import tokenizers
from experiment import RunError, checkpoints, programs
from experiment import config as run_config
from interop import InteropError, marian_generation, marian_import, staging

PRETRAINED_DIR = "pretrained"  # a run directory's imported params (`pretrained/0`)


# ------------------------------------------------------------------------------------------ import


def run_config_for(
    hparams: dict, generation: dict | None = None, **fields
) -> ml_collections.ConfigDict:
    """A run config for a Transformer of `hparams` (vocabulary sizes come from the tokenizers) that
    decodes with `generation` (DecodeSettings fields, `marian_generation.read`) unless `fields`
    (run-config or decoding fields) say otherwise. No dataset unless `fields` name one."""
    config = default.get_config()
    config.model = "transformer"
    config.model_hparams = ml_collections.ConfigDict(
        {k: v for k, v in hparams.items() if k not in ("src_vocab_size", "tgt_vocab_size")}
    )
    config.tokenizer = tokenizers.MarianTokenizer.kind
    config.shared_vocab = bool(hparams.get("share_embeddings", True))
    config.eval_metric = "bleu"
    config.dataset = ""  # what eval.py scores: only a dataset the user names
    # The model's max_length, else 128, within the positions it has.
    positions = hparams.get("max_positions", 512)
    config.decoding.update({"decode": "beam", "max_decode_len": 128, **(generation or {})})
    config.decoding.max_decode_len = min(config.decoding.max_decode_len, positions)
    config.eval_decoding = tuple(dict.fromkeys([*config.eval_decoding, *(generation or {})]))
    for key, value in fields.items():
        if value is not None:  # a decoding setting (e.g. max_decode_len) is config.decoding's
            (config.decoding if key in config.decoding else config)[key] = value
    return config


def import_marian(hf_dir, workdir, **config_fields) -> ml_collections.ConfigDict:
    """Writes the Marian model in `hf_dir` as a run directory `workdir`; returns its config.

    `config_fields` set run-config fields (e.g. `dataset`, `manual_dir`, `max_len`,
    `max_decode_len`): what eval.py evaluates and decodes with; the model's generation settings
    fill in the decoding ones (a note on stderr for each that seqzoo does not apply).
    """
    try:
        found = marian_import.read_directory(hf_dir)
        generation, notes = marian_generation.read(Path(hf_dir), found.hparams)
        config = run_config_for(found.hparams, generation, **config_fields)
        model = programs.create_model(
            config, found.hparams["src_vocab_size"], found.hparams["tgt_vocab_size"]
        )
        shapes = jax.tree.map(
            lambda x: x.shape, jax.eval_shape(lambda: programs.init_params(model, config))
        )
        params = found.params(shapes)
        with staging.staged(Path(workdir)) as tmp:
            run_config.save_config(config, tmp)
            found.src_tokenizer.save(tmp / run_config.SRC_TOKENIZER)
            found.tgt_tokenizer.save(tmp / run_config.TGT_TOKENIZER)
            save_params(tmp, params)
    except InteropError as e:
        raise RunError(str(e)) from None
    for note in notes:
        print(f"notice: {note}", file=sys.stderr)
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
