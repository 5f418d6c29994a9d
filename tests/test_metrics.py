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
