"""experiment/pretrained.py: Marian (opus-mt) models imported as run directories, against
transformers itself, offline: tiny random models built and saved by transformers (conftest
`tiny_marian`), imported (conftest `converted`) and compared logit for logit and token for token;
eval.py and fine-tuning on the imported runs."""

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
from experiment import pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_tokenizer_ids_and_logits_equal_transformers(converted, kind):
    hf, tokenizer, run = converted[kind]
    batch = marian_batch(tokenizer)
    ours = [run.src_tokenizer.encode(s) + [run.special_ids.eos] for s in MARIAN_SENTENCES]
    for row, ids in zip(batch["input_ids"].tolist(), ours, strict=True):
        assert row[: len(ids)] == ids and set(row[len(ids) :]) <= {run.special_ids.pad}
    rng = np.random.default_rng(0)
    targets = rng.integers(3, run.model.tgt_vocab_size - 1, (len(MARIAN_SENTENCES), 7))
    targets[:, 0] = hf.config.decoder_start_token_id
    with torch.no_grad():
        theirs = hf(**batch, decoder_input_ids=torch.from_numpy(targets)).logits.numpy()
    mine = run.model.apply(
        {"params": run.params}, batch["input_ids"].numpy(), targets.astype(np.int32)
    )
    assert np.abs(np.asarray(mine) - theirs).max() <= 1e-4


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_greedy_and_beam_give_generates_tokens(converted, kind):
    hf, tokenizer, run = converted[kind]
    batch = marian_batch(tokenizer)
    pad = run.special_ids.pad
    # No forced EOS at the limit: a hypothesis that reaches it ends there without EOS, as ours do.
    settings = dict(
        max_new_tokens=MARIAN_MAX_NEW,
        bad_words_ids=[[pad]],
        do_sample=False,
        forced_eos_token_id=None,
        no_repeat_ngram_size=MARIAN_NGRAM,
    )
    for beam, penalty in ((1, 1.0), (4, 1.0), (4, 0.6)):
        with torch.no_grad():
            out = hf.generate(
                **batch, num_beams=beam, length_penalty=penalty, early_stopping="never", **settings
            )
        theirs = []
        for row in out[:, 1:].tolist():  # after the decoder start
            theirs.append(run.tgt_tokenizer.pieces(until_eos(row, run.special_ids)))
        mine = marian_decode(run, tokenizer, "greedy" if beam == 1 else "beam", beam, penalty)
        assert mine == theirs, (beam, penalty)
        if beam == 1:  # and the same text
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            assert [run.tgt_tokenizer.decode(row) for row in out[:, 1:].tolist()] == texts
            assert sum(len(t.split()) for t in texts) >= len(texts)


# ------------------------------------------------------------------ eval, fine-tuning


EVAL_OPTIONS = dict(
    split="validation", decoding=dict(decode="greedy", no_repeat_ngram_size=MARIAN_NGRAM)
)


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
        max_decode_len=MARIAN_MAX_NEW,
    )
    return workdir


def test_eval_translates_input_as_transformers_does(converted, evaluable, tmp_path):
    import eval as eval_script

    hf, tokenizer, _ = converted["shared"]
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(MARIAN_SENTENCES) + "\n")
    options = eval_script.Options(**EVAL_OPTIONS, input=str(source), output=str(output))
    assert eval_script.evaluate(evaluable, options) is None
    with torch.no_grad():
        out = hf.generate(
            **marian_batch(tokenizer),
            max_new_tokens=MARIAN_MAX_NEW,
            bad_words_ids=[[hf.config.pad_token_id]],
            forced_eos_token_id=None,
            no_repeat_ngram_size=MARIAN_NGRAM,
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
        max_decode_len=MARIAN_MAX_NEW,
    )
    whole, _ = training.train_and_evaluate(config, tmp_path / "whole")
    training.train_and_evaluate(config, tmp_path / "resumed", stop_after_steps=2)
    resumed, _ = training.train_and_evaluate(config, tmp_path / "resumed")
    assert jax.tree.all(jax.tree.map(np.array_equal, whole.params, resumed.params))
    run = loading.Run(tmp_path / "whole")
    assert run.src_tokenizer.kind == "marian" and run.special_ids == imported.special_ids
    distance = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), run.params, imported.params)
    assert 0 < max(jax.tree.leaves(distance)) < 0.1  # a few small steps away from the import
