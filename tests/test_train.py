"""train.py: a tiny dates run end to end, bit-identical reruns, exact resume, divergence, bad runs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import damage_checkpoint, tiny_run_config

from experiment import RunError, checkpoints, metrics, training

REPO = Path(__file__).resolve().parents[1]


def leaves_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def losses(workdir: Path) -> list[tuple[int, str, float]]:
    return [(r["step"], r["split"], r["loss"]) for r in metrics.read_metrics(workdir)]


def test_run_writes_checkpoints_metrics_and_plot(tiny_run):
    workdir, state, last = tiny_run
    assert int(state.step) == 20
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]
    for step_dir in (workdir / "checkpoints" / "10", *(workdir / "best").iterdir()):
        assert (step_dir / "integrity.json").is_file() and checkpoints.verify(step_dir) is None
    assert len(list((workdir / "best").iterdir())) == 1  # only the best is kept
    records = metrics.read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert all(r["tokens"] > 0 for r in train)  # real target tokens per window: tokens seen
    elapsed = [r["elapsed_s"] for r in records if r["split"] in ("train", "validation")]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    validation = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [10, 20]
    assert {"loss", "bleu", "chrf", "exact_match"} <= set(validation[-1])
    assert last["loss"] == validation[-1]["loss"]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert (workdir / "learning_curves.png").stat().st_size > 1000
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"] == "attention_rnn" and saved["seed"] == 0
    assert (workdir / "tokenizer" / "src").is_dir() and (workdir / "tokenizer" / "tgt").is_dir()


def test_training_lowers_the_loss(tiny_run):
    workdir, _, _ = tiny_run
    train_losses = [loss for _, split, loss in losses(workdir) if split == "train"]
    assert train_losses[-1] < train_losses[0] - 0.3


def test_same_seed_is_bit_identical_other_seed_differs(
    tiny_run, tmp_path, tfds_data_dir, tokenizer_dir
):
    workdir, state, _ = tiny_run
    again, again_metrics = training.train_and_evaluate(
        tiny_run_config(tfds_data_dir, tokenizer_dir), tmp_path / "again"
    )
    assert losses(tmp_path / "again") == losses(workdir)
    assert leaves_equal(again.params, state.params)

    other, _ = training.train_and_evaluate(
        tiny_run_config(tfds_data_dir, tokenizer_dir, seed=1), tmp_path / "other"
    )
    assert losses(tmp_path / "other") != losses(workdir)
    assert not leaves_equal(other.params, state.params)


def test_interrupted_and_resumed_run_equals_uninterrupted(
    tiny_run, tmp_path, tfds_data_dir, tokenizer_dir
):
    workdir, state, _ = tiny_run
    config = tiny_run_config(tfds_data_dir, tokenizer_dir)
    resumed = tmp_path / "resumed"
    # "Crash" at step 14: the checkpoint of step 10 survives, steps 11-14 are lost.
    crashed, _ = training.train_and_evaluate(config, resumed, stop_after_steps=14)
    assert int(crashed.step) == 14
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["10"]
    final, _ = training.train_and_evaluate(config, resumed)
    assert int(final.step) == 20
    assert leaves_equal(final.params, state.params)
    assert leaves_equal(final.opt_state, state.opt_state)


def test_bfloat16_run_trains_like_float32_and_resumes_exactly(
    tiny_run, tmp_path, tfds_data_dir, tokenizer_dir
):
    import eval as eval_script

    workdir, _, _ = tiny_run
    config = tiny_run_config(tfds_data_dir, tokenizer_dir, dtype="bfloat16")
    whole, _ = training.train_and_evaluate(config, tmp_path / "whole")
    training.train_and_evaluate(config, tmp_path / "resumed", stop_after_steps=14)
    resumed, _ = training.train_and_evaluate(config, tmp_path / "resumed")
    assert leaves_equal(resumed.params, whole.params)
    assert leaves_equal(resumed.opt_state, whole.opt_state)
    # float32 parameters and optimizer state; the training loss follows float32's within 0.05.
    assert {x.dtype for x in jax.tree.leaves((whole.params, whole.opt_state))} <= {
        np.dtype("float32"),
        np.dtype("int32"),
    }
    bf16 = [(s, loss) for s, split, loss in losses(tmp_path / "whole") if split == "train"]
    f32 = [(s, loss) for s, split, loss in losses(workdir) if split == "train"]
    assert [s for s, _ in bf16] == [s for s, _ in f32]
    np.testing.assert_allclose([x for _, x in bf16], [x for _, x in f32], atol=0.05)
    assert bf16[-1][1] < bf16[0][1] - 0.3
    assert bf16 != f32, "the run must really compute in bfloat16"
    report = eval_script.evaluate(
        tmp_path / "whole",
        eval_script.Options(split="validation", num_examples=16, decoding={"beam_size": 4}),
    )
    assert report["decode"] == "beam" and report["num_examples"] == 16


def test_divergence_stops_and_keeps_last_good_checkpoint(
    tiny_run, tmp_path, tfds_data_dir, tokenizer_dir
):
    workdir, _, _ = tiny_run
    diverging = tmp_path / "diverging"
    shutil.copytree(workdir, diverging)
    shutil.rmtree(diverging / "checkpoints" / "20")
    config = tiny_run_config(tfds_data_dir, tokenizer_dir, learning_rate=float("nan"))
    with pytest.raises(training.TrainingDiverged, match=r"loss is nan at step 15.*step 10"):
        training.train_and_evaluate(config, diverging)
    assert sorted(p.name for p in (diverging / "checkpoints").iterdir()) == ["10"]


def test_damaged_checkpoint_is_set_aside_and_resume_falls_back(
    tiny_run, tmp_path, tfds_data_dir, tokenizer_dir, capsys
):
    workdir, state, _ = tiny_run
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    damage_checkpoint(broken / "checkpoints" / "20")
    config = tiny_run_config(tfds_data_dir, tokenizer_dir)
    final, _ = training.train_and_evaluate(config, broken)
    err = capsys.readouterr().err
    assert f"checkpoint {broken.absolute()}/checkpoints/20 is damaged (state/" in err
    assert "SHA-256 differs from its record): moved to 20.damaged, not loaded" in err
    # Resumed from step 10, not from the damaged 20: the uninterrupted run's params exactly.
    assert leaves_equal(final.params, state.params)
    names = sorted(p.name for p in (broken / "checkpoints").iterdir())
    assert names == ["10", "20", "20.damaged"]


def test_resume_refuses_when_every_checkpoint_is_damaged(
    tiny_run, tmp_path, tfds_data_dir, tokenizer_dir
):
    workdir, _, _ = tiny_run
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    for step in ("10", "20"):
        damage_checkpoint(broken / "checkpoints" / step)
    config = tiny_run_config(tfds_data_dir, tokenizer_dir, num_train_steps=30)
    for _ in range(2):  # the damaged ones are set aside the first time; refused again the next
        with pytest.raises(RunError, match=r"no intact checkpoint in .*/checkpoints: the damaged"):
            training.train_and_evaluate(config, broken)


def test_a_worse_validation_score_saves_no_best_checkpoint_and_no_record(tmp_path):
    import orbax.checkpoint as ocp

    best = checkpoints.best_manager(tmp_path, "bleu")
    params = {"w": np.arange(4.0, dtype=np.float32)}
    checkpoints.save(best, 1, ocp.args.StandardSave(params), metrics={"bleu": 2.0})
    checkpoints.save(best, 2, ocp.args.StandardSave(params), metrics={"bleu": 1.0})  # worse
    checkpoints.save(best, 1, ocp.args.StandardSave(params), metrics={"bleu": 3.0})  # skipped
    best.close()
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["1"]
    assert checkpoints.verify(tmp_path / "best" / "1") is None


def test_intact_checkpoint_of_another_config_is_told_from_damage(
    tiny_run, tmp_path, tfds_data_dir, tokenizer_dir
):
    workdir, _, _ = tiny_run
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    saved = json.loads((other / "config.json").read_text())
    saved["model_hparams"]["hidden_dim"] = 24  # config.json edited by hand
    (other / "config.json").write_text(json.dumps(saved))
    config = tiny_run_config(tfds_data_dir, tokenizer_dir, num_train_steps=30)
    config.model_hparams.hidden_dim = 24
    with pytest.raises(RunError, match=r"checkpoints/20 is intact but does not match this config"):
        training.train_and_evaluate(config, other)


@pytest.mark.parametrize(
    "field, value", [("batch_size", 8), ("seed", 1), ("max_len", 40), ("num_buckets", 2)]
)
def test_resume_refuses_a_changed_data_plan(tiny_run, tfds_data_dir, tokenizer_dir, field, value):
    workdir, _, _ = tiny_run
    config = tiny_run_config(tfds_data_dir, tokenizer_dir, **{field: value})
    old = json.loads((workdir / "config.json").read_text())[field]
    with pytest.raises(RunError, match=rf"trained with {field}={old!r}.*--config.{field}={old!r}"):
        training.train_and_evaluate(config, workdir)


def test_resume_refuses_other_batch_shapes(tmp_path):
    from experiment import config as run_config

    run_config.check_data_plan(tmp_path, [(682, 12, 12), (512, 16, 16)])  # the first start
    run_config.check_data_plan(tmp_path, [(682, 12, 12), (512, 16, 16)])
    with pytest.raises(
        RunError, match=r"trained on batches of shapes .*resume on the device count"
    ):
        run_config.check_data_plan(tmp_path, [(680, 12, 12), (512, 16, 16)])  # 4 devices, say


def test_a_config_json_older_than_a_field_gets_its_default(tiny_run, tmp_path):
    from experiment import config as run_config

    old = tmp_path / "old"
    shutil.copytree(tiny_run[0], old)
    saved = json.loads((old / "config.json").read_text())
    del saved["num_buckets"], saved["decoding"]["max_decode_len_a"]
    (old / "config.json").write_text(json.dumps(saved))
    loaded = run_config.load_config(old)
    assert loaded.num_buckets == 4 and loaded.decoding.max_decode_len_a == 0.0
    assert loaded.model_hparams.hidden_dim == saved["model_hparams"]["hidden_dim"]


def test_resume_keeps_the_original_config_and_records_what_changed(
    tiny_run, tmp_path, tfds_data_dir, tokenizer_dir
):
    workdir, _, _ = tiny_run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    original = (resumed / "config.json").read_text()
    config = tiny_run_config(tfds_data_dir, tokenizer_dir, num_train_steps=25, eval_every=5)
    training.train_and_evaluate(config, resumed)
    assert (resumed / "config.json").read_text() == original
    [record] = [json.loads(line) for line in (resumed / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 20
    assert record["changed"] == {
        "eval_every": {"was": 10, "now": 5},
        "num_train_steps": {"was": 20, "now": 25},
    }


def test_workdir_of_another_experiment_is_refused(tiny_run, tfds_data_dir, tokenizer_dir):
    workdir, _, _ = tiny_run
    config = tiny_run_config(tfds_data_dir, tokenizer_dir, model="seq2seq_rnn")
    with pytest.raises(RunError, match="holds a run with model='attention_rnn'"):
        training.train_and_evaluate(config, workdir)


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--config.no_such_field=1"], "the config has no field 'no_such_field'"),
        (
            ["--config", "configs/no_such_file.py"],
            "config file configs/no_such_file.py did not load",
        ),
        (["--config.seed=abc"], "flag --config.seed=abc: invalid literal"),
    ],
)
def test_command_line_reports_bad_flag_in_one_line(tmp_path, args, problem):
    result = subprocess.run(
        [sys.executable, "train.py", "--workdir", str(tmp_path), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {problem}")
    assert not (tmp_path / "config.json").exists()  # nothing written


def test_early_stopping_on_validation_loss_stops_saves_and_stays_stopped(
    tmp_path, tfds_data_dir, tokenizer_dir
):
    # A learning rate of 0: the validation loss never falls below its first value, so with patience
    # 2 the run stops at its third validation (step 6), saves there, and a rerun does not train on.
    config = tiny_run_config(
        tfds_data_dir,
        tokenizer_dir,
        learning_rate=0.0,
        eval_every=2,
        log_every=2,
        checkpoint_every=4,
        early_stopping_patience=2,
    )
    state, _ = training.train_and_evaluate(config, tmp_path / "run")
    assert int(state.step) == 6
    records = metrics.read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if r["split"] == "validation"] == [2, 4, 6]
    assert [r["step"] for r in records if r["split"] == "early_stop"] == [6]
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [4, 6]
    again, _ = training.train_and_evaluate(config, tmp_path / "run")
    assert int(again.step) == 6 and len(metrics.read_metrics(tmp_path / "run")) == len(records)
    # Resumed before the stop (from step 4), the run counts the validations before it.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
    # (The validation of step 4 recorded twice, as a crash after it and a resume before it leave
    # it: it counts once.)
    kept = [r for r in records if r["step"] <= 4]
    kept += [r for r in kept if r["split"] == "validation" and r["step"] == 4]
    (tmp_path / "run" / metrics.METRICS_FILE).write_text(
        "".join(json.dumps(r) + "\n" for r in kept)
    )
    resumed, _ = training.train_and_evaluate(config, tmp_path / "run")
    assert int(resumed.step) == 6


def test_the_last_checkpoints_are_averaged_and_validated_when_training_ends(
    tiny_run, tmp_path, tfds_data_dir, tokenizer_dir
):
    workdir, _, _ = tiny_run
    config = tiny_run_config(
        tfds_data_dir,
        tokenizer_dir,
        checkpoint_every=5,
        keep_checkpoints=3,
        average_last_checkpoints=3,
    )
    training.train_and_evaluate(config, tmp_path / "run")
    records = metrics.read_metrics(tmp_path / "run")
    (averaged,) = [r for r in records if r["split"] == "validation_averaged"]
    assert averaged["step"] == 20 and averaged["checkpoints"] == "average of checkpoints 10-20 (3)"
    last = [r for r in records if r["split"] == "validation"][-1]
    assert np.isfinite(averaged["loss"]) and averaged["loss"] != last["loss"]
    # Training itself is unchanged by it: the session run's losses, step for step.
    assert [x for x in losses(tmp_path / "run") if x[1] != "validation_averaged"] == losses(workdir)
    # Fewer checkpoints than asked for (here one): those there are, with a notice.
    config = tiny_run_config(
        tfds_data_dir, tokenizer_dir, checkpoint_every=20, average_last_checkpoints=3
    )
    training.train_and_evaluate(config, tmp_path / "one")
    (one,) = [
        r for r in metrics.read_metrics(tmp_path / "one") if r["split"] == "validation_averaged"
    ]
    assert one["checkpoints"].endswith("(1)")
    with pytest.raises(RunError, match="average_last_checkpoints=5 needs keep_checkpoints >= 5"):
        training.train_and_evaluate(
            tiny_run_config(tfds_data_dir, tokenizer_dir, average_last_checkpoints=5),
            tmp_path / "x",
        )


def test_epoch_intervals_set_validation_and_checkpoints(tmp_path, tfds_data_dir, tokenizer_dir):
    # dates/tiny: 2,000 pairs in batches of 16 = 125 updates per epoch; 0.04 epochs = 5 updates.
    config = tiny_run_config(
        tfds_data_dir, tokenizer_dir, eval_every_epochs=0.04, checkpoint_every_epochs=0.04
    )
    training.train_and_evaluate(config, tmp_path / "run")
    records = metrics.read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if r["split"] == "validation"] == [5, 10, 15, 20]
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [10, 15, 20]
    assert training.interval(7, 0.0, 125) == 7 and training.interval(7, 0.001, 125) == 1
