"""eval.py --input on the session's tiny dates run: user lines in order (empty, long, not UTF-8, a
failure part-way), one compilation per shape, n-best lists of user lines, and tsv prefixes."""

import json

import numpy as np
import pytest
from conftest import eval_options

import eval as eval_script
from data import input_pipeline
from evaluation import decode_report, loading, translate
from experiment import RunError, decode_programs


def test_input_lines_skip_empty_and_truncate_long(tiny_run, tmp_path, capsys):
    workdir, _, _ = tiny_run
    source = tmp_path / "in.txt"
    source.write_text("3 May 1979\n\n" + "1" * 100 + "\nThursday, May 3, 1979\n")
    output = tmp_path / "out.txt"
    assert (
        eval_script.evaluate(workdir, eval_options(input=str(source), output=str(output))) is None
    )
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
        eval_script.evaluate(
            workdir, eval_options(input=str(source), output=str(output), batch_size=2)
        )
    assert len(output.read_text().splitlines()) == 2


def test_input_that_is_not_utf8_names_the_line_and_keeps_the_lines_before(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    source = tmp_path / "in.txt"
    source.write_bytes(b"\xef\xbb\xbf3 May 1979\n4 May 1979\nMay \xff 1979\n5 May 1979\n")
    output = tmp_path / "out.txt"
    with pytest.raises(RunError, match=r"line 3 is not valid UTF-8 \(byte 0xff at byte 5\)"):
        eval_script.evaluate(
            workdir, eval_options(input=str(source), output=str(output), batch_size=4)
        )
    assert len(output.read_text().split("\n")) == 3  # lines 1 and 2 translated and written


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
    search_options = eval_options(
        input=str(source), output=str(tmp_path / "o.txt"), batch_size=2, beam_size=3
    )
    eval_script.evaluate(workdir, search_options)
    [counting] = wrapped.values()
    assert len(calls) == 6  # each batch decoded once
    shapes = set(calls)
    assert shapes <= {(2, n) for n in input_pipeline.source_lengths(64)}
    assert counting.fn._cache_size() == len(shapes) <= 2  # one compilation per shape


def test_nbest_with_input_and_its_bad_values(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    source = tmp_path / "in.txt"
    source.write_text("3 May 1979\n\nThursday, May 3, 1979\n")
    output = tmp_path / "out.txt"
    eval_script.evaluate(workdir, eval_options(input=str(source), output=str(output), nbest=2))
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
            eval_script.evaluate(workdir, eval_options(**bad))


def test_tsv_input_forces_each_lines_prefix(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    free_in, tsv_in = tmp_path / "free.txt", tmp_path / "in.tsv"
    sources = ["3 May 1979", "Thursday, May 3, 1979", "12/24/2001"]
    free_in.write_text("\n".join(sources) + "\n")
    eval_script.evaluate(
        workdir, eval_options(input=str(free_in), output=str(tmp_path / "free.out"))
    )
    free = (tmp_path / "free.out").read_text().split("\n")[:3]
    prefixes = ["1980-", "", free[2][:3] + "9"]
    lines = [f"{s}\t{p}\n" for s, p in zip(sources, prefixes, strict=True)]
    tsv_in.write_text("".join(lines[:2]) + "\n" + lines[2])  # an empty line: skipped, as in text
    output = tmp_path / "forced.jsonl"
    eval_script.evaluate(
        workdir,
        eval_options(
            input=str(tsv_in), input_format="tsv", output=str(output), output_format="jsonl"
        ),
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
                workdir, eval_options(input=str(tsv_in), input_format="tsv", output=str(output))
            )
        assert output.read_text().split("\n")[0].startswith("1980-")
    with pytest.raises(RunError, match="--input_format tsv reads source<TAB>prefix lines from"):
        eval_script.evaluate(workdir, eval_options(input_format="tsv"))
