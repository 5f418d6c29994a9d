"""interop/marian_export.py: seqzoo Transformer runs (imported ones, and seqzoo's own with
interleaved positions) written as Marian directories, loaded by transformers and CTranslate2 and
compared logit for logit and token for token."""

from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import (
    MARIAN_MAX_NEW,
    MARIAN_NGRAM,
    MARIAN_SENTENCES,
    marian_batch,
    marian_decode,
    until_eos,
)

from evaluation import loading
from experiment import pretrained, programs
from interop import marian_export, marian_import

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def export(run, out_dir: Path) -> Path:
    """`run` (an `evaluation.loading.Run`) written as a Marian directory `out_dir`."""
    return marian_export.write_directory(
        out_dir, run.model, run.params, run.src_tokenizer, run.tgt_tokenizer
    )


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory) -> dict:
    """source -> (run, its export): "converted", an imported model (a round trip: import, export),
    and "seqzoo", a seqzoo Transformer (interleaved positions, LayerNorm eps 1e-6, its own
    SentencePiece tokenizer)."""
    root = tmp_path_factory.mktemp("exported")
    runs = {
        "converted": converted["shared"][2],
        "seqzoo": loading.Run(seqzoo_transformer_run(root / "seqzoo_run")),
    }
    return {source: (run, export(run, root / source)) for source, run in runs.items()}


@pytest.mark.parametrize("source", ["converted", "seqzoo"])
def test_export_loads_in_transformers_and_decodes_the_same(exported, source):
    run, out = exported[source]
    hf, info = transformers.MarianMTModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.MarianTokenizer.from_pretrained(out)
    batch = tokenizer(MARIAN_SENTENCES[:2], return_tensors="pt", padding=True)
    targets = np.random.default_rng(1).integers(4, run.model.tgt_vocab_size - 1, (2, 5))
    targets = np.concatenate([np.full((2, 1), run.special_ids.bos), targets], axis=1)
    with torch.no_grad():
        theirs = hf.eval()(**batch, decoder_input_ids=torch.from_numpy(targets)).logits.numpy()
    mine = run.model.apply({"params": run.params}, batch["input_ids"].numpy(), targets)
    # LayerNorm eps: transformers' 1e-5 against the seqzoo model's own 1e-6.
    assert np.abs(np.asarray(mine) - theirs).max() <= (1e-4 if source == "converted" else 2e-3)
    if source == "converted":  # and generate on the export gives our tokens
        with torch.no_grad():
            out = hf.generate(  # greedy: the export's generation_config says beam 4, as opus-mt's
                **marian_batch(tokenizer),
                num_beams=1,
                do_sample=False,
                max_new_tokens=MARIAN_MAX_NEW,
                bad_words_ids=[[run.special_ids.pad]],
                forced_eos_token_id=None,
                no_repeat_ngram_size=MARIAN_NGRAM,
            )
        theirs = [
            run.tgt_tokenizer.pieces(until_eos(r, run.special_ids)) for r in out[:, 1:].tolist()
        ]
        assert marian_decode(run, tokenizer, "greedy") == theirs


def seqzoo_transformer_run(workdir: Path) -> Path:
    """A post-LN seqzoo Transformer (random weights, interleaved positions, seqzoo's special ids)
    with a seqzoo SentencePiece tokenizer, as a run directory."""
    from conftest import marian_corpus

    from data import tokenizers
    from experiment import config as run_config

    tokenizer = tokenizers.SentencePieceTokenizer.train(marian_corpus(5, 2000), vocab_size=300)
    hparams = dict(
        d_model=16,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        ffn_dim=32,
        pre_ln=False,
        share_embeddings=True,
        activation="gelu",
    )
    config = pretrained.run_config_for(hparams, max_len=32)
    config.tokenizer = "sentencepiece"
    model = programs.create_model(config, 300, 300)
    params = jax.tree.map(lambda x: x * 4, programs.init_params(model, config))  # not tiny
    run_config.save_config(config, workdir)
    tokenizer.save(workdir / run_config.SRC_TOKENIZER)
    tokenizer.save(workdir / run_config.TGT_TOKENIZER)
    pretrained.save_params(workdir, params)
    return workdir


def test_ctranslate2_converts_an_export_and_translates_the_same(converted, exported, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")  # benchmarks/requirements.txt
    hf, tokenizer, run = converted["shared"]
    out = exported["converted"][1]
    ctranslate2.converters.TransformersConverter(str(out)).convert(str(tmp_path / "ct2"))
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu")
    sources = [tokenizer.convert_ids_to_tokens(tokenizer(s)["input_ids"]) for s in MARIAN_SENTENCES]
    results = translator.translate_batch(
        sources, beam_size=1, max_decoding_length=MARIAN_MAX_NEW, no_repeat_ngram_size=MARIAN_NGRAM
    )
    theirs = [r.hypotheses[0] for r in results]
    mine = marian_decode(run, tokenizer, "greedy")
    assert [[p for p in row if p != "</s>"] for row in mine] == theirs


# Rare characters (accents, CJK, Cyrillic, symbols, an emoji, a ligature), digits, punctuation,
# whitespace runs and tabs, the empty sentence, and the special pieces' names as plain text.
RARE_TEXT = [
    "Zürich, 3:45 p.m. — «Ça va?» ½ € 100%!",
    "naïve café résumé 2024-01-31 #42 (n=7)",
    "日本語のテキスト и кириллица",
    "x² + y² = z²; π ≈ 3.14159…",
    "  two  spaces,\ta tab and 🙂 ",
    "ﬁ ligature Ⅷ ＡＢＣ",
    "",
    "a </s> in the text, <unk> and <pad> too",
]


@pytest.mark.parametrize("source", ["converted", "seqzoo"])
def test_the_exported_tokenizers_split_text_into_the_runs_own_ids(exported, source):
    run, out = exported[source]
    tokenizer = transformers.MarianTokenizer.from_pretrained(out)
    eos = [run.special_ids.eos]
    assert tokenizer(RARE_TEXT)["input_ids"] == [
        run.src_tokenizer.encode(t) + eos for t in RARE_TEXT
    ]
    targets = tokenizer(text_target=RARE_TEXT)["input_ids"]
    assert targets == [run.tgt_tokenizer.encode(t) + eos for t in RARE_TEXT]
    imported = marian_import.read_directory(out)  # and seqzoo's own import of the export
    for side in ("src_tokenizer", "tgt_tokenizer"):
        theirs, ours = getattr(imported, side), getattr(run, side)
        assert [theirs.encode(t) for t in RARE_TEXT] == [ours.encode(t) for t in RARE_TEXT]
