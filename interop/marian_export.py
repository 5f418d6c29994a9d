"""A seqzoo Transformer written as a transformers Marian (opus-mt) model directory.

`write_directory(out_dir, model, params, src_tokenizer, tgt_tokenizer)` writes a post-LN
Transformer (the built module, its params and its run's tokenizers, e.g. those of an
`evaluation.loading.Run`) as `model.safetensors`, `config.json`, `generation_config.json` and the
tokenizer files (`source.spm`, `target.spm`, `vocab.json`, `target_vocab.json` for separate
vocabularies, `tokenizer_config.json`) that transformers' `MarianMTModel` / `MarianTokenizer` load
and CTranslate2's converter accepts; the weights go through safetensors' numpy API, without PyTorch.
transformers' `MarianTokenizer` splits text into the run's own ids (tests/test_marian_export.py),
with one exception that the format fixes: a sentence that starts with `>>xx<<` is a language code
to a Marian tokenizer, one token (UNK unless the vocabulary has it).
Everything is written to a temporary directory beside `out_dir` and renamed into place at the end
(`interop.staging`).
"""

import dataclasses
import json
from pathlib import Path

import jax

from data import tokenizers
from interop import InteropError, marian, staging
from models.transformer import Transformer


def _vocabulary(tokenizer) -> dict[str, int]:
    """piece -> id of a SentencePiece or Marian tokenizer (what `vocab.json` holds)."""
    if isinstance(tokenizer, tokenizers.MarianTokenizer):
        return dict(tokenizer.vocab)
    if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
        return {piece: i for i, piece in enumerate(tokenizer.pieces(range(tokenizer.vocab_size)))}
    raise InteropError(
        f"the run's {tokenizer.kind} tokenizer has no Marian form: export runs trained with "
        "--config.tokenizer=sentencepiece"
    )


def write_directory(out_dir, model, params, src_tokenizer, tgt_tokenizer) -> Path:
    """Writes `model` (a `Transformer`) with `params` and the tokenizers as a Marian model directory
    `out_dir`; returns its path. `InteropError` for a model or tokenizer that has no Marian form."""
    from safetensors.numpy import save_file

    if not isinstance(model, Transformer):
        raise InteropError(
            f"the run's model is {type(model).__name__}: only Transformer runs have a Marian form"
        )
    # Every field of the built model, defaults included (the run's config lists only what it set).
    hparams = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    config = marian.config_from_hparams(hparams)
    src_vocab, tgt_vocab = _vocabulary(src_tokenizer), _vocabulary(tgt_tokenizer)
    separate = not hparams["share_embeddings"]
    state = marian.state_dict_from_params(jax.device_get(params), hparams)
    with staging.staged(Path(out_dir)) as tmp:
        save_file(state, str(tmp / marian.SAFETENSORS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = marian.generation_config(hparams)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "source.spm").write_bytes(src_tokenizer.model_proto)
        (tmp / "target.spm").write_bytes(tgt_tokenizer.model_proto)
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
            # Text is text, as to the run's own tokenizers: "</s>" in a sentence is not EOS.
            "split_special_tokens": True,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return Path(out_dir)
