"""eval.py on a split of the session's tiny dates run: the report, quality by source length, error
analysis, attention plots, the sweep, checkpoint averaging, and the errors of a run that cannot be
evaluated. The decoding options are tests/test_eval_decoding.py's, --input tests/test_eval_input.py's."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import damage_checkpoint, eval_options, validation_head

import eval as eval_script
from data import tokenizers
from evaluation import loading, sweep
from experiment import RunError, checkpoints

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def beam_report(tiny_run, tmp_path_factory):
    workdir, _, _ = tiny_run
    out = tmp_path_factory.mktemp("eval")
    report = eval_script.evaluate(
        workdir,
        eval_options(
            error_analysis=True,
            plot_attention=2,
            output=str(out / "hyps.txt"),
            report=str(out / "report.json"),
        ),
    )
    return report, out


def test_report_has_the_promised_fields(beam_report):
    report, out = beam_report
    for key in (
        "split",
        "decode",
        "beam_size",
        "alpha",
        "num_examples",
        "bleu",
        "bleu_signature",
        "bleu_lc_tok",
        "chrf",
        "exact_match",
        "sentences_per_sec",
    ):
        assert key in report, key
    assert report["split"] == "validation" and report["decode"] == "beam"
    assert report["beam_size"] == 4 and report["num_examples"] == 40
    assert report["sentences_per_sec"] > 0
    assert report["bleu_signature"].startswith("nrefs:1|case:mixed")
    assert 0.0 <= report["exact_match"] <= 1.0
    assert json.loads((out / "report.json").read_text())["bleu"] == report["bleu"]
    assert len((out / "hyps.txt").read_text().splitlines()) == 40


def test_error_analysis_accounts_for_every_sentence(beam_report):
    analysis = beam_report[0]["error_analysis"]
    assert analysis["num_sentences"] == 40
    errors = analysis["num_search_errors"] + analysis["num_model_errors"]
    assert analysis["num_correct"] + errors == 40
    if errors:
        fractions = analysis["search_error_fraction"] + analysis["model_error_fraction"]
        assert fractions == pytest.approx(1.0)
    assert analysis["suggested_fix"]


def test_attention_plots_are_written(beam_report):
    paths = [Path(p) for p in beam_report[0]["attention_plots"]]
    assert len(paths) == 2
    assert all(p.suffix == ".png" and p.stat().st_size > 2000 for p in paths)


def test_quality_by_source_length_scores_each_bin_on_its_own_sentences(beam_report, tiny_run):
    report, out = beam_report
    rows = report["by_source_length"]
    assert len(rows) > 1
    run = loading.Run(tiny_run[0])
    data = validation_head(run, 40)
    sources = data.sources[:40]
    hypotheses = (out / "hyps.txt").read_text().split("\n")[:40]
    lengths = np.array([len(run.src_tokenizer.encode(s)) for s in sources])
    for row in rows:
        members = np.flatnonzero((lengths >= row["min_len"]) & (lengths <= row["max_len"]))
        assert row["count"] == len(members)
        exact = np.mean([hypotheses[i] == data.references[i] for i in members])
        assert row["exact_match"] == pytest.approx(exact)


def test_checkpoint_averaging_is_the_mean_of_the_last_checkpoints(tiny_run, tmp_path):
    workdir, _, _ = tiny_run  # periodic checkpoints at steps 10 and 20
    run = loading.Run(workdir)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.params)
    restore = checkpoints._restore_params

    with ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints") as manager:
        assert sorted(manager.all_steps()) == [10, 20]
        at_10, at_20 = (restore(manager, s, "checkpoints", template) for s in (10, 20))
    mean, step, which = checkpoints.restore_params(workdir, template, average_last=2)
    assert step == 20 and which == "average of checkpoints 10-20 (2)"
    for m, a, b in zip(*(jax.tree.leaves(t) for t in (mean, at_10, at_20)), strict=True):
        np.testing.assert_allclose(m, (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-6)
    report = eval_script.evaluate(
        workdir,
        eval_options(
            average_checkpoints=2,
            num_examples=8,
            output=str(tmp_path / "h.txt"),
            report=str(tmp_path / "r.json"),
        ),
    )
    assert report["checkpoint"] == "average of checkpoints 10-20 (2)"
    with pytest.raises(RunError, match="cannot average 3 checkpoints.*holds 2"):
        checkpoints.restore_params(workdir, template, average_last=3)


def test_greedy_equals_beam_of_one(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    greedy = tmp_path / "greedy.txt"
    beam1 = tmp_path / "beam1.txt"
    eval_script.evaluate(
        workdir, eval_options(decode="greedy", output=str(greedy), report=str(tmp_path / "g.json"))
    )
    eval_script.evaluate(
        workdir, eval_options(beam_size=1, output=str(beam1), report=str(tmp_path / "b.json"))
    )
    assert greedy.read_text() == beam1.read_text()


def test_sweep_covers_greedy_and_beams_with_and_without_normalization(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    report = eval_script.evaluate(
        workdir,
        eval_options(
            num_examples=16,
            sweep=True,
            report=str(tmp_path / "r.json"),
            output=str(tmp_path / "h.txt"),
        ),
    )
    settings = {(r["decode"], r["beam_size"], r["length_penalty"]) for r in report["sweep"]}
    assert settings == {("greedy", 1, "none")} | {
        ("beam", b, lp) for b in (1, 2, 4, 8) for lp in ("gnmt", "none")
    }
    assert all(r["num_examples"] == 16 and r["sentences_per_sec"] > 0 for r in report["sweep"])


def test_the_report_and_sweep_lead_with_the_runs_eval_metric(tiny_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir)
    saved = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps({**saved, "eval_metric": "chrf"}))
    eval_script.evaluate(workdir, eval_options(num_examples=8, output=str(tmp_path / "h.txt")))
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("validation: chrf ") and "; " in printed[0]
    assert "chrf" in next(line for line in printed if "source length" in line)
    rows = [
        dict(decode="greedy", beam_size=1, length_penalty="none", chrf=61.5, bleu=9.1),
        dict(decode="beam", beam_size=4, length_penalty="gnmt", chrf=62.5, bleu=9.5),
    ]
    rows = [{**r, "sentences_per_sec": 10.0} for r in rows]
    head, *lines = sweep.sweep_table(rows, "chrf").splitlines()
    assert head.split()[-3:] == ["chrf", "bleu", "sent/s"]
    assert lines[1].split()[-3:] == ["62.5000", "9.5000", "10.0"]
    assert sweep.sweep_table(rows, "bleu").splitlines()[0].split()[-2:] == ["bleu", "sent/s"]


def test_greedy_error_analysis_scores_both_sides_alike(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    reports = {}
    for decode in ("greedy", "beam"):
        reports[decode] = eval_script.evaluate(
            workdir,
            eval_options(
                decode=decode,
                beam_size=1,
                error_analysis=True,
                output=str(tmp_path / f"{decode}.txt"),
                report=str(tmp_path / f"{decode}.json"),
            ),
        )["error_analysis"]
    # Greedy and beam 1 find the same hypotheses, so under one normalization their analyses agree.
    keys = ("num_correct", "num_search_errors", "num_model_errors", "verdict")
    assert {k: reports["greedy"][k] for k in keys} == {k: reports["beam"][k] for k in keys}
    for kind in ("search", "model"):
        for g, b in zip(reports["greedy"]["examples"][kind], reports["beam"]["examples"][kind]):
            assert g["hypothesis_score"] == pytest.approx(b["hypothesis_score"], abs=1e-5)
    assert reports["greedy"]["num_search_errors"] + reports["greedy"]["num_model_errors"] > 0


def test_hypotheses_with_line_separators_stay_aligned(tiny_run, tmp_path, monkeypatch):
    workdir, _, _ = tiny_run
    decode = tokenizers.CharTokenizer.decode
    odd = ["\x0b", "\x1c", "\x85", "\u2028", "\n"]
    monkeypatch.setattr(
        tokenizers.CharTokenizer,
        "decode",
        lambda self, ids: decode(self, ids) + odd[len(decode(self, ids)) % len(odd)] + "x",
    )
    output = tmp_path / "h.txt"
    report = eval_script.evaluate(
        workdir, eval_options(output=str(output), report=str(tmp_path / "r.json"))
    )
    assert report["num_examples"] == 40
    lines = output.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 41 and lines[-1] == ""  # one line per sentence
    assert all(line.endswith("x") for line in lines[:-1])


def test_int8_weights_are_refused_for_a_model_without_an_int8_path(tiny_run):
    workdir, _, _ = tiny_run
    with pytest.raises(RunError, match="attention_rnn has no int8 path; use a transformer run"):
        eval_script.evaluate(workdir, eval_options(quantize="int8"))


def test_missing_run_and_checkpoint_errors(tmp_path):
    with pytest.raises(RunError, match="no run at"):
        eval_script.evaluate(tmp_path / "nope", eval_options())
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="config.json is missing"):
        eval_script.evaluate(tmp_path / "empty", eval_options())


def test_damaged_or_mismatched_checkpoint_errors(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    [best] = (broken / "best").iterdir()
    damage_checkpoint(best)
    with pytest.raises(RunError, match=rf"checkpoint {best.absolute()} is damaged \(.*SHA-256"):
        eval_script.evaluate(broken, eval_options())

    averaged = tmp_path / "averaged"
    shutil.copytree(workdir, averaged)
    damage_checkpoint(averaged / "checkpoints" / "10")
    with pytest.raises(RunError, match=r"checkpoints/10 is damaged.*average the others"):
        eval_script.evaluate(averaged, eval_options(average_checkpoints=2))

    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    config = json.loads((other / "config.json").read_text())
    config["model_hparams"]["hidden_dim"] = 64  # a config from another model
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="is intact but does not match this config"):
        eval_script.evaluate(other, eval_options())


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "eval.py", "--workdir", str(tmp_path / "missing")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: no run at {tmp_path / 'missing'}: train one first with "
        f"`python train.py --workdir {tmp_path / 'missing'}`"
    ]
