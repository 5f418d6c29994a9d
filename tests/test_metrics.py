import pytest

from experiment import metrics


def test_a_resumed_runs_rows_read_as_one_uninterrupted_history():
    first = [
        {"step": 10, "split": "train", "tokens": 100, "elapsed_s": 10.0},
        {"step": 20, "split": "train", "tokens": 100, "elapsed_s": 20.0},
        {"step": 20, "split": "validation", "bleu": 5.0, "elapsed_s": 25.0},
        {"step": 30, "split": "train", "tokens": 100, "elapsed_s": 35.0},  # after the checkpoint
    ]
    resumed = [  # resumed from the step-20 checkpoint by a new process
        {"step": 30, "split": "train", "tokens": 100, "elapsed_s": 12.0},
        {"step": 40, "split": "validation", "bleu": 7.0, "elapsed_s": 20.0},
    ]
    history = metrics.one_history(first + resumed)
    assert [(r["step"], r["split"], r["elapsed_s"]) for r in history] == [
        (10, "train", 10.0),
        (20, "train", 20.0),
        (20, "validation", 25.0),
        (30, "train", 37.0),
        (40, "validation", 45.0),
    ]
    assert metrics.one_history(first) == first


def test_the_validation_line_leads_with_the_metric_the_run_is_judged_by():
    # The one-hour model writes lowercase: it is judged by bleu_lc_tok, not by its cased BLEU.
    scores = {"loss": 1.931, "bleu": 9.069, "bleu_signature": "nrefs:1", "bleu_lc_tok": 42.51}
    scores["chrf"] = 61.23
    line = metrics.summary(scores, "bleu_lc_tok")
    assert line == "bleu_lc_tok 42.51; loss 1.931, bleu 9.069, chrf 61.23"
    assert metrics.summary({"loss": 0.5, "exact_match": 0.25}, "exact_match").startswith(
        "exact_match 0.25; loss 0.5"
    )
    with pytest.raises(ValueError, match="eval_metric='bleu_lc' is not among") as error:
        metrics.summary(scores, "bleu_lc")
    assert "loss, bleu, bleu_lc_tok, chrf" in str(error.value) and "\n" not in str(error.value)


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
