"""evaluation/translator.py: the Python API on the session's tiny dates run (the same text as
eval.py --input, one-line errors) and on the tiny Marian model (from_marian, its generation
settings, the printed next command, <unk> dropped as transformers' skip_special_tokens does)."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, eval_options

import convert
import eval as eval_script
from evaluation.translator import Translator
from experiment import RunError

SENTENCES = ["3 May 1979", "", "Thursday, May 3, 1979", "12/24/2001"]


@pytest.fixture(scope="module")
def translator(tiny_run):
    return Translator.from_run(tiny_run[0], batch_size=2)


def test_translate_gives_eval_inputs_text_with_scores(translator, tiny_run, tmp_path):
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("\n".join(SENTENCES) + "\n")
    options = eval_options(input=str(source), output=str(output), batch_size=2, beam_size=3)
    eval_script.evaluate(tiny_run[0], options)
    results = translator.translate(SENTENCES, beam_size=3, nbest=2)
    assert [r.text for r in results] == output.read_text().splitlines()
    assert results[1].text == "" and results[1].hypotheses == []
    for r in (results[0], results[2], results[3]):
        assert [h["text"] for h in r.hypotheses][:1] == [r.text] and len(r.hypotheses) == 2
        assert r.score == r.hypotheses[0]["score"] and r.log_prob == r.hypotheses[0]["log_prob"]
        assert r.log_prob < 0
    greedy = translator.translate(SENTENCES[:1], decode="greedy")[0]
    assert greedy.hypotheses is None and greedy.score == greedy.log_prob < 0


def test_bad_arguments_are_the_clis_one_line_errors(translator, tiny_run):
    cases = [(dict(beam_size=0), "beam_size=0: use a beam of 1 or more")]
    cases.append((dict(length_penalty="gmnt"), "length_penalty=gmnt: use one of"))
    for options, message in cases:
        with pytest.raises(RunError) as python:
            translator.translate(["3 May 1979"], **options)
        with pytest.raises(RunError) as cli:
            eval_script.evaluate(tiny_run[0], eval_options(**options))
        assert str(python.value).startswith(message) and "\n" not in str(python.value)
        assert str(cli.value) == "--" + str(python.value)
    with pytest.raises(RunError, match="^beam is not a decoding option: use one of decode, "):
        translator.translate(["3 May 1979"], beam=4)
    with pytest.raises(RunError, match=r"^nbest=5 needs decode beam with beam_size >= 5"):
        translator.translate(["3 May 1979"], nbest=5)
    with pytest.raises(RunError, match=r"not one string: use \[text\]"):
        translator.translate("3 May 1979")


def with_generation_config(source, directory, **settings):
    """A copy of the Marian model `source` whose generation_config.json adds `settings`."""
    shutil.copytree(source, directory)
    path = directory / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    return directory


def test_from_marian_decodes_with_the_models_generation_settings(tiny_marian, converted, tmp_path):
    from conftest import MARIAN_SENTENCES

    model = with_generation_config(
        tiny_marian["shared"],
        tmp_path / "model",
        num_beams=3,
        length_penalty=0.6,
        max_length=9,
        bad_words_ids=[[66], [5]],
    )
    translator = Translator.from_marian(model, max_len=32)
    config = translator.run.config
    settings = translator.settings()
    assert (settings.decode, settings.beam_size, settings.alpha) == ("beam", 3, 0.6)
    assert (settings.length_penalty, settings.max_decode_len) == ("average", 8)
    if "beam_policy" in config.decoding:
        assert (settings.beam_policy, settings.beam_stopping) == ("full", "heuristic")
    assert config.dataset == ""
    results = translator.translate(MARIAN_SENTENCES)
    explicit = Translator(converted["shared"][2]).translate(
        MARIAN_SENTENCES, **{k: getattr(settings, k) for k in config.eval_decoding}
    )
    assert results == explicit
    assert translator.translate(MARIAN_SENTENCES, max_decode_len=12) != results or all(
        len(r.text.split()) < 8 for r in results
    )
    assert translator.settings(beam_size=2).beam_size == 2  # an option overrides the model's
    # Without generation settings transformers' defaults hold: greedy, length_penalty 1.0.
    plain = Translator.from_marian(tiny_marian["shared"], max_len=32, max_decode_len=12)
    assert (plain.settings().decode, plain.settings().alpha) == ("greedy", 1.0)


def test_import_prints_a_next_command_that_runs(tiny_marian, tmp_path, capsys):
    run = tmp_path / "my run"
    assert convert.main(["import", str(tiny_marian["shared"]), str(run), "--max_len", "32"]) == 0
    printed = capsys.readouterr().out.splitlines()
    nexts = [line[6:] for line in printed if line.startswith("next: ")]
    assert len(nexts) == 1 and "--input -" in nexts[0]  # no dataset: no split to score
    command = nexts[0].replace("| python ", f"| {sys.executable} ")
    result = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) == 1
    with pytest.raises(RunError, match="names no dataset to evaluate .* --input FILE"):
        eval_script.evaluate(run, eval_options(num_examples=2))


def test_unk_is_dropped_as_transformers_skip_special_tokens_does(converted):
    _, tokenizer, run = converted["shared"]
    ids = run.tgt_tokenizer.encode("a man sits")
    unk, eos = run.tgt_tokenizer.special_ids.unk, run.tgt_tokenizer.special_ids.eos
    with_unk = [ids[0], unk, *ids[1:], unk, eos]
    assert "\u2047" not in run.tgt_tokenizer.decode(with_unk)
    assert run.tgt_tokenizer.decode(with_unk) == tokenizer.decode(
        with_unk, skip_special_tokens=True
    )
    assert run.tgt_tokenizer.pieces([unk]) == ["<unk>"]  # the jsonl tokens keep it
