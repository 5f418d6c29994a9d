"""eval.py's decoding options on a split of the session's tiny dates run: per-sentence length limits,
n-gram blocking, n-best lists, sampling and jsonl output with token log-probabilities and alignments."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import eval_options, validation_head

import eval as eval_script
from data import input_pipeline
from decoding import DecodeSettings
from evaluation import loading
from experiment import RunError, decode_programs


def test_source_length_limits_cut_each_sentence_at_its_own_length(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    a, b = 0.2, 0
    report = eval_script.evaluate(
        workdir,
        eval_options(
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
            eval_options(
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
        eval_script.evaluate(workdir, eval_options(no_repeat_ngram_size=0))


def test_nbest_writes_each_sentences_k_best_with_their_scores(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    output = tmp_path / "h.txt"
    eval_script.evaluate(
        workdir,
        eval_options(nbest=3, num_examples=12, output=str(output), report=str(tmp_path / "r.json")),
    )
    best = output.read_text().split("\n")[:12]
    records = [json.loads(line) for line in (tmp_path / "h.nbest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(12))
    run = loading.Run(workdir)
    data = validation_head(run, 12)
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


def test_sampling_from_the_command_line_is_reproducible_per_sentence(tiny_run, tmp_path):
    workdir, _, _ = tiny_run

    def draws(name, **fields):
        output = tmp_path / f"{name}.txt"
        settings = dict(decode="sample", num_samples=3, top_p=0.95, temperature=1.5, seed=1)
        report = eval_script.evaluate(
            workdir,
            eval_options(
                output=str(output), report=str(tmp_path / f"{name}.json"), **settings | fields
            ),
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
    data = validation_head(run, 4)
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
            eval_script.evaluate(workdir, eval_options(**bad))


def test_jsonl_output_has_token_log_probs_and_alignments(tiny_run, tmp_path, capsys):
    workdir, _, _ = tiny_run
    eval_script.evaluate(
        workdir,
        eval_options(
            num_examples=12, output=str(tmp_path / "h.txt"), report=str(tmp_path / "a.json")
        ),
    )
    output = tmp_path / "h.jsonl"
    report = eval_script.evaluate(
        workdir,
        eval_options(
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
    eval_script.evaluate(workdir, eval_options(input=str(source), output_format="jsonl"))
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["index"] == 0 and len(line["alignment"]) == len(line["tokens"])
