"""eval.py on the session's tiny dates run: reports, sweep, error analysis, plots, user input, errors."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import damage_checkpoint

import eval as eval_script
from data import input_pipeline, tokenizers
from decoding import DecodeSettings
from evaluation import decode_report, loading, translate
from experiment import RunError, checkpoints, decode_programs, metrics

REPO = Path(__file__).resolve().parents[1]


def options(**fields) -> eval_script.Options:
    """eval.py's options as its flags would give them (decoding flags in `Options.decoding`)."""
    names = {f.name for f in dataclasses.fields(DecodeSettings)}
    decoding = {k: v for k, v in fields.items() if k in names and v is not None}
    fields = {k: v for k, v in fields.items() if k not in names}
    return eval_script.Options(
        **{"split": "validation", "num_examples": 40, **fields}, decoding=decoding
    )


@pytest.fixture(scope="module")
def beam_report(tiny_run, tmp_path_factory):
    workdir, _, _ = tiny_run
    out = tmp_path_factory.mktemp("eval")
    report = eval_script.evaluate(
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


def test_quality_by_source_length_scores_each_bin_on_its_own_sentences(beam_report, tiny_run):
    report, out = beam_report
    rows = report["by_source_length"]
    assert len(rows) > 1
    run = loading.Run(tiny_run[0])
    data = input_pipeline.head(
        input_pipeline.get_eval_data(
            run.config, "validation", run.src_tokenizer, run.tgt_tokenizer
        ),
        40,
    )
    sources = data.sources[:40]
    hypotheses = (out / "hyps.txt").read_text().split("\n")[:40]
    lengths = np.array([len(run.src_tokenizer.encode(s)) for s in sources])
    for row in rows:
        members = np.flatnonzero((lengths >= row["min_len"]) & (lengths <= row["max_len"]))
        assert row["count"] == len(members)
        exact = np.mean([hypotheses[i] == data.references[i] for i in members])
        assert row["exact_match"] == pytest.approx(exact)


def test_by_source_length_groups_and_scores():
    hypotheses = ["a", "b", "x", "d", "e", "y"]
    references = ["a", "b", "c", "d", "e", "f"]
    lengths = [5, 1, 9, 1, 5, 9]
    rows = metrics.by_source_length(hypotheses, references, lengths, exact_match=True, bins=3)
    assert [(r["min_len"], r["max_len"], r["count"]) for r in rows] == [
        (1, 1, 2),
        (5, 5, 2),
        (9, 9, 2),
    ]
    assert [r["exact_match"] for r in rows] == [1.0, 1.0, 0.0]
    # Ties never split: one length, one group.
    rows = metrics.by_source_length(["a"] * 4, ["a"] * 4, [3, 3, 3, 3], exact_match=True)
    assert [(r["min_len"], r["max_len"], r["count"]) for r in rows] == [(3, 3, 4)]


def test_checkpoint_averaging_is_the_mean_of_the_last_checkpoints(tiny_run, tmp_path):
    import jax
    import numpy as np

    workdir, _, _ = tiny_run  # periodic checkpoints at steps 10 and 20
    run = loading.Run(workdir)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.params)
    restore = checkpoints._restore_params
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints") as manager:
        assert sorted(manager.all_steps()) == [10, 20]
        at_10, at_20 = (restore(manager, s, "checkpoints", template) for s in (10, 20))
    mean, step, which = checkpoints.restore_params(workdir, template, average_last=2)
    assert step == 20 and which == "average of checkpoints 10-20 (2)"
    for m, a, b in zip(*(jax.tree.leaves(t) for t in (mean, at_10, at_20)), strict=True):
        np.testing.assert_allclose(m, (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-6)
    report = eval_script.evaluate(
        workdir,
        options(
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
        workdir, options(decode="greedy", output=str(greedy), report=str(tmp_path / "g.json"))
    )
    eval_script.evaluate(
        workdir, options(beam_size=1, output=str(beam1), report=str(tmp_path / "b.json"))
    )
    assert greedy.read_text() == beam1.read_text()


def test_sweep_covers_greedy_and_beams_with_and_without_normalization(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    report = eval_script.evaluate(
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
    assert eval_script.evaluate(workdir, options(input=str(source), output=str(output))) is None
    lines = output.read_text().split("\n")
    assert len(lines) == 5 and lines[-1] == ""  # four outputs, aligned with the inputs
    assert lines[1] == ""
    err = capsys.readouterr().err
    assert "line 2 is empty: skipped" in err
    assert "line 3 has 100 tokens: truncated to 63 (max_len=64 with EOS)" in err


def test_failure_mid_file_keeps_what_was_written(tiny_run, tmp_path, monkeypatch):
    workdir, _, _ = tiny_run
    source = tmp_path / "in.txt"
    source.write_text("".join(f"{day} May 1979\n" for day in range(1, 7)))
    output = tmp_path / "out.txt"
    real = decode_report.decode_batches
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(translate, "decode_batches", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        eval_script.evaluate(workdir, options(input=str(source), output=str(output), batch_size=2))
    assert len(output.read_text().splitlines()) == 2


def test_int8_weights_are_refused_for_a_model_without_an_int8_path(tiny_run):
    workdir, _, _ = tiny_run
    with pytest.raises(RunError, match="attention_rnn has no int8 path; use a transformer run"):
        eval_script.evaluate(workdir, options(quantize="int8"))


def test_missing_run_and_checkpoint_errors(tmp_path):
    with pytest.raises(RunError, match="no run at"):
        eval_script.evaluate(tmp_path / "nope", options())
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="config.json is missing"):
        eval_script.evaluate(tmp_path / "empty", options())


def test_damaged_or_mismatched_checkpoint_errors(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    [best] = (broken / "best").iterdir()
    damage_checkpoint(best)
    with pytest.raises(RunError, match=rf"checkpoint {best.absolute()} is damaged \(.*SHA-256"):
        eval_script.evaluate(broken, options())

    averaged = tmp_path / "averaged"
    shutil.copytree(workdir, averaged)
    damage_checkpoint(averaged / "checkpoints" / "10")
    with pytest.raises(RunError, match=r"checkpoints/10 is damaged.*average the others"):
        eval_script.evaluate(averaged, options(average_checkpoints=2))

    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    config = json.loads((other / "config.json").read_text())
    config["model_hparams"]["hidden_dim"] = 64  # a config from another model
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="is intact but does not match this config"):
        eval_script.evaluate(other, options())


def test_input_that_is_not_utf8_names_the_line_and_keeps_the_lines_before(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    source = tmp_path / "in.txt"
    source.write_bytes(b"\xef\xbb\xbf3 May 1979\n4 May 1979\nMay \xff 1979\n5 May 1979\n")
    output = tmp_path / "out.txt"
    with pytest.raises(RunError, match=r"line 3 is not valid UTF-8 \(byte 0xff at byte 5\)"):
        eval_script.evaluate(workdir, options(input=str(source), output=str(output), batch_size=4))
    assert len(output.read_text().split("\n")) == 3  # lines 1 and 2 translated and written


def test_greedy_error_analysis_scores_both_sides_alike(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    reports = {}
    for decode in ("greedy", "beam"):
        reports[decode] = eval_script.evaluate(
            workdir,
            options(
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
        workdir, options(output=str(output), report=str(tmp_path / "r.json"))
    )
    assert report["num_examples"] == 40
    lines = output.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 41 and lines[-1] == ""  # one line per sentence
    assert all(line.endswith("x") for line in lines[:-1])


def test_input_compiles_each_shape_once_and_decodes_each_batch_once(
    tiny_run, tmp_path, monkeypatch
):
    workdir, _, _ = tiny_run
    calls = []
    wrapped = {}

    class Counting:
        """The jitted decode, counting executions (compilations go through `lower`)."""

        def __init__(self, fn):
            self.fn = fn

        def __call__(self, *args, **kwargs):
            calls.append(args[1].shape)
            return self.fn(*args, **kwargs)

        def lower(self, *args, **kwargs):
            return self.fn.lower(*args, **kwargs)

    real = decode_programs.decode_fn
    monkeypatch.setattr(
        decode_programs,
        "decode_fn",
        lambda model, settings, mesh: wrapped.setdefault(
            id(model), Counting(real(model, settings, mesh))
        ),
    )
    lines = ["3 May 1979", "Thursday, May 3, 1979", "1979-05-03", "May 3rd, 1979, a Thursday"]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(lines * 3) + "\n")  # 12 lines: 6 chunks of 2
    search_options = options(
        input=str(source), output=str(tmp_path / "o.txt"), batch_size=2, beam_size=3
    )
    eval_script.evaluate(workdir, search_options)
    [counting] = wrapped.values()
    assert len(calls) == 6  # each batch decoded once
    shapes = set(calls)
    assert shapes <= {(2, n) for n in input_pipeline.source_lengths(64)}
    assert counting.fn._cache_size() == len(shapes) <= 2  # one compilation per shape


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
    report = eval_script.evaluate(
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
    run = loading.Run(workdir)
    src = input_pipeline.get_eval_data(
        run.config, "validation", run.src_tokenizer, run.tgt_tokenizer, batch_size=16
    ).batches[0]["src"]
    limits = np.ceil(a * np.sum(src != 0, axis=1)).astype(int) + b
    max_len = run.config.decoding.max_decode_len
    greedy = DecodeSettings("greedy", 1, 0.0, "none", max_len)
    free = decode_programs.decode_fn(run.model, greedy)(run.decoding_params, src, 0.0)
    limited = dataclasses.replace(greedy, max_decode_len_a=a, max_decode_len_b=b)
    cut = decode_programs.decode_fn(run.model, limited)(run.decoding_params, src, 0.0)
    # Greedy with a limit is greedy without one, truncated at the limit.
    want = np.where(np.arange(max_len) < limits[:, None], free.sequences, 0)
    np.testing.assert_array_equal(cut.sequences, want)
    np.testing.assert_array_equal(cut.lengths, np.minimum(free.lengths, limits))
    assert np.all(free.lengths > limits) and len(set(limits)) > 1, "the test needs varied cuts"
    hyps = (tmp_path / "h.txt").read_text().splitlines()
    assert hyps == [run.tgt_tokenizer.decode(row.tolist()) for row in want]
    beam_settings = dataclasses.replace(limited, decode="beam", beam_size=4, length_penalty="gnmt")
    beam = decode_programs.decode_fn(run.model, beam_settings)(run.decoding_params, src, 0.6)
    assert np.all(np.asarray(beam.lengths) <= limits[:, None])


def test_no_repeat_ngram_size_blocks_repeats_in_every_output(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    outputs = {}
    for n in (None, 2):
        report = eval_script.evaluate(
            workdir,
            options(
                no_repeat_ngram_size=n,
                num_examples=16,
                output=str(tmp_path / f"h{n}.txt"),
                report=str(tmp_path / f"r{n}.json"),
            ),
        )
        assert report["no_repeat_ngram_size"] == (n or 0)
        outputs[n] = (tmp_path / f"h{n}.txt").read_text().split("\n")[:16]

    def repeats(text):  # characters are the dates run's tokens
        grams = list(zip(text, text[1:]))
        return len(grams) != len(set(grams))

    assert any(repeats(h) for h in outputs[None]), "the test needs repeating outputs"
    assert not any(repeats(h) for h in outputs[2])
    with pytest.raises(RunError, match=r"--no_repeat_ngram_size=0: use n >= 1"):
        eval_script.evaluate(workdir, options(no_repeat_ngram_size=0))


def test_nbest_writes_each_sentences_k_best_with_their_scores(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    output = tmp_path / "h.txt"
    eval_script.evaluate(
        workdir,
        options(nbest=3, num_examples=12, output=str(output), report=str(tmp_path / "r.json")),
    )
    best = output.read_text().split("\n")[:12]
    records = [json.loads(line) for line in (tmp_path / "h.nbest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(12))
    run = loading.Run(workdir)
    data = input_pipeline.head(
        input_pipeline.get_eval_data(
            run.config, "validation", run.src_tokenizer, run.tgt_tokenizer
        ),
        12,
    )
    sources, targets, hyps = [], [], []
    for record, text, source in zip(records, best, data.sources, strict=False):
        assert len(record["hypotheses"]) == 3 and record["hypotheses"][0]["text"] == text
        scores = [h["score"] for h in record["hypotheses"]]
        assert scores == sorted(scores, reverse=True)  # the plain file holds the best
        assert len({h["text"] for h in record["hypotheses"]}) == 3
        for h in record["hypotheses"]:
            ids = run.tgt_tokenizer.encode(h["text"])
            sources.append(run.src_tokenizer.encode(source) + [2])
            targets.append(ids + [2] if len(ids) < h["length"] else ids)
            hyps.append(h)

    def padded(rows):  # one batch, one shape: one compilation
        out = np.zeros((len(rows), max(map(len, rows))), np.int32)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    # Each score is the normalized teacher-forced log-probability of its own text.
    scored = decode_programs.score_fn(run.model, "gnmt")(
        run.decoding_params, padded(sources), padded(targets), 0.6
    )
    for i, h in enumerate(hyps):
        assert h["length"] == int(scored.lengths[i])
        assert h["log_prob"] == pytest.approx(float(scored.log_probs[i]), abs=1e-4)
        assert h["score"] == pytest.approx(float(scored.scores[i]), abs=1e-4)


def test_nbest_with_input_and_its_bad_values(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    source = tmp_path / "in.txt"
    source.write_text("3 May 1979\n\nThursday, May 3, 1979\n")
    output = tmp_path / "out.txt"
    eval_script.evaluate(workdir, options(input=str(source), output=str(output), nbest=2))
    records = [json.loads(line) for line in (tmp_path / "out.nbest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2] and records[1]["hypotheses"] == []
    assert [len(r["hypotheses"]) for r in records] == [2, 0, 2]
    lines = output.read_text().split("\n")
    assert records[2]["hypotheses"][0]["text"] == lines[2]
    for bad, message in [
        (dict(nbest=5), r"--nbest=5 needs --decode beam with --beam_size >= 5"),
        (dict(nbest=-1), r"--nbest=-1: use K >= 1"),
        (dict(nbest=2, decode="greedy"), r"--nbest=2 needs --decode beam"),
        (dict(nbest=2, input=str(source)), r"--nbest with --input .*give --output FILE"),
    ]:
        with pytest.raises(RunError, match=message):
            eval_script.evaluate(workdir, options(**bad))


def test_sampling_from_the_command_line_is_reproducible_per_sentence(tiny_run, tmp_path):
    workdir, _, _ = tiny_run

    def draws(name, **fields):
        output = tmp_path / f"{name}.txt"
        settings = dict(decode="sample", num_samples=3, top_p=0.95, temperature=1.5, seed=1)
        report = eval_script.evaluate(
            workdir,
            options(output=str(output), report=str(tmp_path / f"{name}.json"), **settings | fields),
        )
        records = [
            json.loads(x) for x in (tmp_path / f"{name}.samples.jsonl").read_text().splitlines()
        ]
        return report, output.read_text().split("\n")[: len(records)], records

    report, texts, records = draws("a", num_examples=12)
    assert report["decode"] == "sample" and report["num_samples"] == 3 and report["seed"] == 1
    assert [r["index"] for r in records] == list(range(12))
    assert all(len(r["samples"]) == 3 for r in records)
    assert [r["samples"][0]["text"] for r in records] == texts  # the output is the first draw
    assert any(len({s["text"] for s in r["samples"]}) > 1 for r in records), "draws must differ"
    # The same sentences in other batches draw the same; another seed draws otherwise.
    _, _, rebatched = draws("b", num_examples=6, batch_size=4)
    assert rebatched == records[:6]
    _, _, reseeded = draws("c", num_examples=12, seed=2)
    assert reseeded != records
    # Each draw's log-probability is the model's, teacher-forced.
    run = loading.Run(workdir)
    data = input_pipeline.head(
        input_pipeline.get_eval_data(
            run.config, "validation", run.src_tokenizer, run.tgt_tokenizer
        ),
        4,
    )
    score = decode_programs.score_fn(run.model, "none")
    for record, source in zip(records, data.sources, strict=False):
        src = np.array([run.src_tokenizer.encode(source) + [2]], np.int32)
        for draw in record["samples"]:
            ids = run.tgt_tokenizer.encode(draw["text"])
            targets = np.array([ids + [2]] if len(ids) < draw["length"] else [ids], np.int32)
            scored = score(run.decoding_params, src, targets, 0.0)
            assert draw["log_prob"] == pytest.approx(float(scored.log_probs[0]), abs=1e-4)
    for bad, message in [
        (dict(decode="sample", top_p=1.5), r"--top_p=1.5: use a value in \(0, 1\]"),
        (dict(decode="sample", top_p=0.0), r"--top_p=0.0: use a value in \(0, 1\]"),
        (dict(decode="sample", temperature=0.0), r"--temperature=0.0: use a value > 0"),
        (dict(decode="sample", top_k=-2), r"--top_k=-2: use k >= 1, or 0"),
        (dict(num_samples=2), r"--num_samples=2 needs --decode sample .* use --nbest"),
        (dict(decode="sample", num_samples=0), r"--num_samples=0: use N >= 1"),
    ]:
        with pytest.raises(RunError, match=message):
            eval_script.evaluate(workdir, options(**bad))


def test_tsv_input_forces_each_lines_prefix(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    free_in, tsv_in = tmp_path / "free.txt", tmp_path / "in.tsv"
    sources = ["3 May 1979", "Thursday, May 3, 1979", "12/24/2001"]
    free_in.write_text("\n".join(sources) + "\n")
    eval_script.evaluate(workdir, options(input=str(free_in), output=str(tmp_path / "free.out")))
    free = (tmp_path / "free.out").read_text().split("\n")[:3]
    prefixes = ["1980-", "", free[2][:3] + "9"]
    lines = [f"{s}\t{p}\n" for s, p in zip(sources, prefixes, strict=True)]
    tsv_in.write_text("".join(lines[:2]) + "\n" + lines[2])  # an empty line: skipped, as in text
    output = tmp_path / "forced.jsonl"
    eval_script.evaluate(
        workdir,
        options(input=str(tsv_in), input_format="tsv", output=str(output), output_format="jsonl"),
    )
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert records[2]["text"] == "" and records[2]["tokens"] == []
    records = records[:2] + records[3:]
    assert [r["text"][: len(p)] for r, p in zip(records, prefixes, strict=True)] == prefixes
    assert records[1]["text"] == free[1], "an empty prefix leaves the search free"
    assert records[0]["text"] != free[0] and records[2]["text"] != free[2]
    # The prefix's log-probabilities count: the record's equals the teacher-forced score.
    run = loading.Run(workdir)
    score = decode_programs.score_fn(run.model, "none")
    for record, source in zip(records, sources, strict=True):
        src = np.array([run.src_tokenizer.encode(source) + [2]], np.int32)
        targets = np.array([run.tgt_tokenizer.encode(record["text"]) + [2]], np.int32)
        expected = float(score(run.decoding_params, src, targets, 0.0).log_probs[0])
        assert record["log_prob"] == pytest.approx(expected, abs=1e-4)
    # A malformed line or a prefix with no room for EOS stops there; the lines before are written.
    for line, message in [
        ("3 May 1979", r"line 2 has 1 tab-separated fields: with --input_format tsv each line"),
        ("3 May\t19\t79", r"line 2 has 3 tab-separated fields"),
        ("3 May 1979\t" + "1" * 40, r"line 2: the prefix has 40 tokens, .* --max_decode_len=\d+"),
    ]:
        tsv_in.write_text(f"3 May 1979\t1980-\n{line}\n")
        with pytest.raises(RunError, match=message):
            eval_script.evaluate(
                workdir, options(input=str(tsv_in), input_format="tsv", output=str(output))
            )
        assert output.read_text().split("\n")[0].startswith("1980-")
    with pytest.raises(RunError, match="--input_format tsv reads source<TAB>prefix lines from"):
        eval_script.evaluate(workdir, options(input_format="tsv"))


def test_jsonl_output_has_token_log_probs_and_alignments(tiny_run, tmp_path, capsys):
    workdir, _, _ = tiny_run
    eval_script.evaluate(
        workdir,
        options(num_examples=12, output=str(tmp_path / "h.txt"), report=str(tmp_path / "a.json")),
    )
    output = tmp_path / "h.jsonl"
    report = eval_script.evaluate(
        workdir,
        options(
            num_examples=12,
            output=str(output),
            output_format="jsonl",
            report=str(tmp_path / "b.json"),
        ),
    )
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["text"] for r in records] == (tmp_path / "h.txt").read_text().split("\n")[:12]
    assert report["bleu"] == json.loads((tmp_path / "a.json").read_text())["bleu"]
    for record in records:
        assert len(record["tokens"]) == len(record["alignment"]) == len(record["token_log_probs"])
        # The dates run's tokens are characters: the pieces spell the text.
        assert "".join(t for t in record["tokens"] if t != "<eos>") == record["text"]
        assert sum(record["token_log_probs"]) == pytest.approx(record["log_prob"], abs=1e-4)
        assert all(0 <= a < len(record["source_tokens"]) for a in record["alignment"])
        assert record["source_tokens"][-1] == "<eos>"
    assert len({tuple(r["alignment"]) for r in records}) > 1
    # The same records for --input on stdout.
    source = tmp_path / "in.txt"
    source.write_text("3 May 1979\n")
    eval_script.evaluate(workdir, options(input=str(source), output_format="jsonl"))
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["index"] == 0 and len(line["alignment"]) == len(line["tokens"])
