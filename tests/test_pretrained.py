"""Marian (opus-mt) import and export against transformers itself, offline: tiny random models built
and saved by transformers (conftest `tiny_marian`), converted, and compared logit for logit and
token for token; the refused inputs; eval.py, fine-tuning and export on converted models."""

import json
import pickle
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from evaluation import loading
from experiment import RunError, pretrained, programs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "a man sits on the street",
    "the dog runs",
    "young girl plays with red ball in water , .",
    "ein mann",
]
MAX_NEW = 12
# Random weights repeat one token whatever the source; without repeated bigrams (here and in
# transformers alike) the hypotheses differ and their scores do not tie.
NGRAM = 2


@pytest.fixture(scope="module")
def converted(tiny_marian, tmp_path_factory) -> dict:
    """kind -> (hf model, hf tokenizer, seqzoo Run) for the shared and the separate model."""
    out = {}
    root = tmp_path_factory.mktemp("converted")
    for kind, directory in tiny_marian.items():
        workdir = root / kind
        pretrained.import_marian(directory, workdir, max_len=32, max_decode_len=MAX_NEW)
        hf = transformers.MarianMTModel.from_pretrained(directory).eval()
        tokenizer = transformers.MarianTokenizer.from_pretrained(directory)
        out[kind] = (hf, tokenizer, loading.Run(workdir))
    return out


def hf_batch(tokenizer, sentences=SENTENCES):
    return tokenizer(sentences, return_tensors="pt", padding=True)


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_tokenizer_ids_and_logits_equal_transformers(converted, kind):
    hf, tokenizer, run = converted[kind]
    batch = hf_batch(tokenizer)
    ours = [run.src_tokenizer.encode(s) + [run.special_ids.eos] for s in SENTENCES]
    for row, ids in zip(batch["input_ids"].tolist(), ours, strict=True):
        assert row[: len(ids)] == ids and set(row[len(ids) :]) <= {run.special_ids.pad}
    rng = np.random.default_rng(0)
    targets = rng.integers(3, run.model.tgt_vocab_size - 1, (len(SENTENCES), 7))
    targets[:, 0] = hf.config.decoder_start_token_id
    with torch.no_grad():
        theirs = hf(**batch, decoder_input_ids=torch.from_numpy(targets)).logits.numpy()
    mine = run.model.apply(
        {"params": run.params}, batch["input_ids"].numpy(), targets.astype(np.int32)
    )
    assert np.abs(np.asarray(mine) - theirs).max() <= 1e-4


def until_eos(row, ids) -> list[int]:
    """`row` up to and including its first EOS (or without its trailing pad, if it has none)."""
    row = list(row)
    if ids.eos in row:
        return row[: row.index(ids.eos) + 1]
    while row and row[-1] == ids.pad:
        row.pop()
    return row


def decoded(run, tokenizer, decode, beam=1, alpha=0.0):
    src = hf_batch(tokenizer)["input_ids"].numpy().astype(np.int32)
    search = loading.Search(decode, beam, alpha, "average", MAX_NEW, no_repeat_ngram_size=NGRAM)
    result = search.decode_fn(run)(run.decoding_params, src, alpha)
    sequences = programs.best_sequences(result)
    return [run.tgt_tokenizer.pieces(until_eos(row, run.special_ids)) for row in sequences]


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_greedy_and_beam_give_generates_tokens(converted, kind):
    hf, tokenizer, run = converted[kind]
    batch = hf_batch(tokenizer)
    pad = run.special_ids.pad
    # No forced EOS at the limit: a hypothesis that reaches it ends there without EOS, as ours do.
    settings = dict(
        max_new_tokens=MAX_NEW,
        bad_words_ids=[[pad]],
        do_sample=False,
        forced_eos_token_id=None,
        no_repeat_ngram_size=NGRAM,
    )
    for beam, penalty in ((1, 1.0), (4, 1.0), (4, 0.6)):
        with torch.no_grad():
            out = hf.generate(
                **batch, num_beams=beam, length_penalty=penalty, early_stopping="never", **settings
            )
        theirs = []
        for row in out[:, 1:].tolist():  # after the decoder start
            theirs.append(run.tgt_tokenizer.pieces(until_eos(row, run.special_ids)))
        mine = decoded(run, tokenizer, "greedy" if beam == 1 else "beam", beam, penalty)
        assert mine == theirs, (beam, penalty)
        if beam == 1:  # and the same text
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            assert [run.tgt_tokenizer.decode(row) for row in out[:, 1:].tolist()] == texts
            assert sum(len(t.split()) for t in texts) >= len(texts)


# ---------------------------------------------------------------------------------- bad input


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


class Exploit:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def _damage(kind: str, directory: Path) -> None:
    if kind == "config":
        (directory / "config.json").unlink()
    elif kind == "bart":
        _edit_config(directory, model_type="bart")
    elif kind == "activation":
        _edit_config(directory, activation_function="tanh")
    elif kind == "pre_ln":
        _edit_config(directory, normalize_before=True)
    elif kind == "shapes":
        _edit_config(directory, encoder_ffn_dim=64, decoder_ffn_dim=64)
    elif kind == "tokenizer":
        (directory / "source.spm").unlink()
    elif kind == "pickle":
        (directory / pretrained.SAFETENSORS).unlink()
        (directory / pretrained.PICKLE).write_bytes(pickle.dumps({"w": Exploit()}))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("config", "is not a Marian model directory: it has no config.json"),
        ("bart", "has model_type 'bart', not 'marian'"),
        ("activation", "has activation_function 'tanh': supported are"),
        ("pre_ln", "sets normalize_before, which MarianMTModel does not have"),
        ("shapes", r"fc1.weight has shape \(32, 16\), which does not match config.json"),
        ("tokenizer", "has no source.spm: a Marian model directory holds its tokenizer files"),
        ("pickle", "is not a plain tensor pickle .*weights_only=True refused"),
    ],
)
def test_bad_directories_are_refused_in_one_line_and_nothing_is_written(
    tiny_marian, tmp_path, kind, message
):
    directory = tmp_path / "marian"
    shutil.copytree(tiny_marian["shared"], directory)
    _damage(kind, directory)
    with pytest.raises(RunError, match=message) as error:
        pretrained.import_marian(directory, tmp_path / "run")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists() and [p.name for p in tmp_path.iterdir()] == ["marian"]


def test_a_plain_tensor_pickle_imports_like_safetensors(tiny_marian, converted, tmp_path):
    directory = tmp_path / "marian"
    shutil.copytree(tiny_marian["shared"], directory)
    state = transformers.MarianMTModel.from_pretrained(directory).state_dict()
    torch.save(state, directory / pretrained.PICKLE)
    (directory / pretrained.SAFETENSORS).unlink()
    (directory / "tokenizer_config.json").unlink()  # optional: the vocabularies follow config.json
    pretrained.import_marian(directory, tmp_path / "run", max_len=32, max_decode_len=MAX_NEW)
    params = loading.Run(tmp_path / "run").params
    expected = converted["shared"][2].params
    assert jax.tree.all(jax.tree.map(np.array_equal, params, expected))


# ------------------------------------------------------------------ eval, fine-tuning, export


EVAL_OPTIONS = dict(split="validation", decode="greedy", no_repeat_ngram_size=NGRAM)


@pytest.fixture(scope="module")
def evaluable(tiny_marian, tfds_data_dir, tmp_path_factory) -> Path:
    """The shared tiny model imported with a dataset to evaluate (dates/tiny)."""
    workdir = tmp_path_factory.mktemp("evaluable") / "run"
    pretrained.import_marian(
        tiny_marian["shared"],
        workdir,
        dataset="dates/tiny",
        data_dir=str(tfds_data_dir),
        max_len=32,
        max_decode_len=MAX_NEW,
    )
    return workdir


def test_eval_translates_input_as_transformers_does(converted, evaluable, tmp_path):
    import eval as eval_script

    hf, tokenizer, _ = converted["shared"]
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(SENTENCES) + "\n")
    options = eval_script.Options(**EVAL_OPTIONS, input=str(source), output=str(output))
    assert eval_script.evaluate(evaluable, options) is None
    with torch.no_grad():
        out = hf.generate(
            **hf_batch(tokenizer),
            max_new_tokens=MAX_NEW,
            bad_words_ids=[[hf.config.pad_token_id]],
            forced_eos_token_id=None,
            no_repeat_ngram_size=NGRAM,
        )
    assert output.read_text().splitlines() == tokenizer.batch_decode(out, skip_special_tokens=True)


def test_eval_evaluates_and_analyses_a_converted_model(evaluable):
    import eval as eval_script

    # (--sweep reads the run as this does: tests/test_eval.py runs it on a trained run.)
    options = eval_script.Options(**EVAL_OPTIONS, num_examples=8, error_analysis=True)
    report = eval_script.evaluate(evaluable, options)
    assert report["num_examples"] == 8 and "bleu" in report and report["sentences_per_sec"] > 0
    analysis = report["error_analysis"]
    assert analysis["num_sentences"] == 8
    assert (
        analysis["num_correct"] + analysis["num_search_errors"] + analysis["num_model_errors"] == 8
    )


def test_eval_decodes_a_transformer_run_with_int8_weights(evaluable, tmp_path):
    import eval as eval_script
    from models import int8

    run = loading.Run(evaluable, quantize="int8")
    leaves = jax.tree.leaves(run.params, is_leaf=lambda x: isinstance(x, int8.Int8Array))
    assert any(isinstance(x, int8.Int8Array) for x in leaves) and int8.TIED_OUTPUT in run.params
    output = tmp_path / "int8.txt"
    options = eval_script.Options(
        **EVAL_OPTIONS, num_examples=8, quantize="int8", output=str(output)
    )
    report = eval_script.evaluate(evaluable, options)
    assert report["quantize"] == "int8" and report["num_examples"] == 8
    assert len(output.read_text().splitlines()) == 8


def test_fine_tuning_starts_from_the_converted_model_and_resumes_exactly(
    converted, tfds_data_dir, tokenizer_dir, tmp_path
):
    from conftest import tiny_run_config

    from experiment import training

    imported = converted["shared"][2]
    config = tiny_run_config(
        tfds_data_dir,
        tokenizer_dir,
        init_from=str(imported.workdir),
        num_train_steps=4,
        eval_every=4,
        checkpoint_every=2,
        num_eval_examples=8,
        max_decode_len=MAX_NEW,
    )
    whole, _ = training.train_and_evaluate(config, tmp_path / "whole")
    training.train_and_evaluate(config, tmp_path / "resumed", stop_after_steps=2)
    resumed, _ = training.train_and_evaluate(config, tmp_path / "resumed")
    assert jax.tree.all(jax.tree.map(np.array_equal, whole.params, resumed.params))
    run = loading.Run(tmp_path / "whole")
    assert run.src_tokenizer.kind == "marian" and run.special_ids == imported.special_ids
    distance = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), run.params, imported.params)
    assert 0 < max(jax.tree.leaves(distance)) < 0.1  # a few small steps away from the import


@pytest.mark.parametrize("source", ["converted", "seqzoo"])
def test_export_loads_in_transformers_and_decodes_the_same(converted, tmp_path, source):
    if source == "converted":  # round trip: import, export
        run = converted["shared"][2]
        workdir = run.workdir
    else:  # a seqzoo Transformer: interleaved positions, LayerNorm eps 1e-6, its own tokenizer
        workdir = seqzoo_transformer_run(tmp_path / "seqzoo")
        run = loading.Run(workdir)
    out = pretrained.export_marian(workdir, tmp_path / "exported")
    hf, info = transformers.MarianMTModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.MarianTokenizer.from_pretrained(out)
    batch = tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)
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
                **hf_batch(tokenizer),
                num_beams=1,
                do_sample=False,
                max_new_tokens=MAX_NEW,
                bad_words_ids=[[run.special_ids.pad]],
                forced_eos_token_id=None,
                no_repeat_ngram_size=NGRAM,
            )
        theirs = [
            run.tgt_tokenizer.pieces(until_eos(r, run.special_ids)) for r in out[:, 1:].tolist()
        ]
        assert decoded(run, tokenizer, "greedy") == theirs


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


def test_ctranslate2_converts_an_export_and_translates_the_same(converted, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")  # benchmarks/requirements.txt
    hf, tokenizer, run = converted["shared"]
    out = pretrained.export_marian(run.workdir, tmp_path / "exported")
    ctranslate2.converters.TransformersConverter(str(out)).convert(str(tmp_path / "ct2"))
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu")
    sources = [tokenizer.convert_ids_to_tokens(tokenizer(s)["input_ids"]) for s in SENTENCES]
    results = translator.translate_batch(
        sources, beam_size=1, max_decoding_length=MAX_NEW, no_repeat_ngram_size=NGRAM
    )
    theirs = [r.hypotheses[0] for r in results]
    mine = decoded(run, tokenizer, "greedy")
    assert [[p for p in row if p != "</s>"] for row in mine] == theirs
