"""eval.py on the session's tiny dates run: reports, sweep, error analysis, plots, user input, errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import eval as evaluation
import experiment
from data import input_pipeline

REPO = Path(__file__).resolve().parents[1]


def options(**fields) -> evaluation.Options:
    return evaluation.Options(**{"split": "validation", "num_examples": 40, **fields})


@pytest.fixture(scope="module")
def beam_report(tiny_run, tmp_path_factory):
    workdir, _, _ = tiny_run
    out = tmp_path_factory.mktemp("eval")
    report = evaluation.evaluate(
        workdir,
        options(
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


def test_quality_by_source_length_partitions_the_examples(beam_report):
    rows = beam_report[0]["by_source_length"]
    assert sum(r["count"] for r in rows) == 40
    for previous, row in zip(rows, rows[1:]):
        assert previous["max_len"] < row["min_len"]  # disjoint, increasing length ranges
    assert all(0.0 <= r["exact_match"] <= 1.0 for r in rows)


def test_by_source_length_groups_and_scores():
    hypotheses = ["a", "b", "x", "d", "e", "y"]
    references = ["a", "b", "c", "d", "e", "f"]
    lengths = [5, 1, 9, 1, 5, 9]
    rows = evaluation.by_source_length(hypotheses, references, lengths, exact_match=True, bins=3)
    assert [(r["min_len"], r["max_len"], r["count"]) for r in rows] == [
        (1, 1, 2),
        (5, 5, 2),
        (9, 9, 2),
    ]
    assert [r["exact_match"] for r in rows] == [1.0, 1.0, 0.0]
    # Ties never split: one length, one group.
    rows = evaluation.by_source_length(["a"] * 4, ["a"] * 4, [3, 3, 3, 3], exact_match=True)
    assert [(r["min_len"], r["max_len"], r["count"]) for r in rows] == [(3, 3, 4)]


def test_checkpoint_averaging_is_the_mean_of_the_last_checkpoints(tiny_run, tmp_path):
    import jax
    import numpy as np

    workdir, _, _ = tiny_run  # periodic checkpoints at steps 10 and 20
    run = evaluation.Run(workdir)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.params)
    restore = experiment._restore_params
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints") as manager:
        assert sorted(manager.all_steps()) == [10, 20]
        at_10, at_20 = (restore(manager, s, "checkpoints", template) for s in (10, 20))
    mean, step, which = experiment.restore_params(workdir, template, average_last=2)
    assert step == 20 and which == "average of checkpoints 10-20 (2)"
    for m, a, b in zip(*(jax.tree.leaves(t) for t in (mean, at_10, at_20)), strict=True):
        np.testing.assert_allclose(m, (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-6)
    report = evaluation.evaluate(
        workdir,
        options(
            average_checkpoints=2,
            num_examples=8,
            output=str(tmp_path / "h.txt"),
            report=str(tmp_path / "r.json"),
        ),
    )
    assert report["checkpoint"] == "average of checkpoints 10-20 (2)"
    with pytest.raises(experiment.RunError, match="cannot average 3 checkpoints.*holds 2"):
        experiment.restore_params(workdir, template, average_last=3)


def test_greedy_equals_beam_of_one(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    greedy = tmp_path / "greedy.txt"
    beam1 = tmp_path / "beam1.txt"
    evaluation.evaluate(
        workdir, options(decode="greedy", output=str(greedy), report=str(tmp_path / "g.json"))
    )
    evaluation.evaluate(
        workdir, options(beam_size=1, output=str(beam1), report=str(tmp_path / "b.json"))
    )
    assert greedy.read_text() == beam1.read_text()


def test_sweep_covers_greedy_and_beams_with_and_without_normalization(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    report = evaluation.evaluate(
        workdir,
        options(
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


def test_input_lines_skip_empty_and_truncate_long(tiny_run, tmp_path, capsys):
    workdir, _, _ = tiny_run
    source = tmp_path / "in.txt"
    source.write_text("3 May 1979\n\n" + "1" * 100 + "\nThursday, May 3, 1979\n")
    output = tmp_path / "out.txt"
    assert evaluation.evaluate(workdir, options(input=str(source), output=str(output))) is None
    lines = output.read_text().split("\n")
    assert len(lines) == 5 and lines[-1] == ""  # four outputs, aligned with the inputs
    assert lines[1] == ""
    err = capsys.readouterr().err
    assert "line 2 is empty: skipped" in err
    assert "line 3 has 100 tokens: truncated to 64" in err


def test_failure_mid_file_keeps_what_was_written(tiny_run, tmp_path, monkeypatch):
    workdir, _, _ = tiny_run
    source = tmp_path / "in.txt"
    source.write_text("".join(f"{day} May 1979\n" for day in range(1, 7)))
    output = tmp_path / "out.txt"
    real = evaluation.decode_batches
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "decode_batches", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        evaluation.evaluate(workdir, options(input=str(source), output=str(output), batch_size=2))
    assert len(output.read_text().splitlines()) == 2


def test_missing_run_and_checkpoint_errors(tmp_path):
    with pytest.raises(experiment.RunError, match="no run at"):
        evaluation.evaluate(tmp_path / "nope", options())
    (tmp_path / "empty").mkdir()
    with pytest.raises(experiment.RunError, match="config.json is missing"):
        evaluation.evaluate(tmp_path / "empty", options())


def test_corrupt_or_mismatched_checkpoint_errors(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    for path in (broken / "best").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"garbage")
    with pytest.raises(experiment.RunError, match="corrupt or incompatible"):
        evaluation.evaluate(broken, options())

    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    config = json.loads((other / "config.json").read_text())
    config["model_hparams"]["hidden_dim"] = 64  # a config from another model
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(experiment.RunError, match="corrupt or incompatible"):
        evaluation.evaluate(other, options())


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


def test_source_length_limits_cut_each_sentence_at_its_own_length(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    a, b = 0.2, 0
    report = evaluation.evaluate(
        workdir,
        options(
            decode="greedy",
            num_examples=16,
            max_decode_len_a=a,
            max_decode_len_b=b,
            output=str(tmp_path / "h.txt"),
            report=str(tmp_path / "r.json"),
        ),
    )
    assert (report["max_decode_len_a"], report["max_decode_len_b"]) == (a, b)
    run = evaluation.Run(workdir)
    src = input_pipeline.get_eval_data(
        run.config, "validation", run.src_tokenizer, run.tgt_tokenizer, batch_size=16
    ).batches[0]["src"]
    limits = np.ceil(a * np.sum(src != 0, axis=1)).astype(int) + b
    max_len = run.config.max_decode_len
    free = experiment.decode_fn(run.model, "greedy", 1, max_len, "none")(run.params, src, 0.0)
    cut = experiment.decode_fn(run.model, "greedy", 1, max_len, "none", None, a, b)(
        run.params, src, 0.0
    )
    # Greedy with a limit is greedy without one, truncated at the limit.
    want = np.where(np.arange(max_len) < limits[:, None], free.sequences, 0)
    np.testing.assert_array_equal(cut.sequences, want)
    np.testing.assert_array_equal(cut.lengths, np.minimum(free.lengths, limits))
    assert np.all(free.lengths > limits) and len(set(limits)) > 1, "the test needs varied cuts"
    hyps = (tmp_path / "h.txt").read_text().splitlines()
    assert hyps == [run.tgt_tokenizer.decode(row.tolist()) for row in want]
    beam = experiment.decode_fn(run.model, "beam", 4, max_len, "gnmt", None, a, b)(
        run.params, src, 0.6
    )
    assert np.all(np.asarray(beam.lengths) <= limits[:, None])
