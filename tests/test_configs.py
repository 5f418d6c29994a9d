"""configs/: every field the code reads is in configs/default.py, and every config takes overrides."""

import ast
import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from configs import default
from decoding import DecodeSettings
from experiment import RunError, metrics, training
from experiment import config as run_config

REPO = Path(__file__).resolve().parents[1]
# The modules that read a run's config (named `config` there).
READERS = [
    "train.py",
    "eval.py",
    "sharding.py",
    "data/input_pipeline.py",
    *(str(p.relative_to(REPO)) for p in sorted((REPO / "experiment").glob("*.py"))),
    *(str(p.relative_to(REPO)) for p in sorted((REPO / "evaluation").glob("*.py"))),
]
CONFIGDICT_METHODS = {"get", "keys", "items", "update", "to_dict", "to_json_best_effort", "lock"}
CONFIGS = [
    *(f"configs/{p.name}" for p in sorted((REPO / "configs").glob("*.py")) if p.stem != "__init__"),
    "configs/dates_lists.py:attention_rnn",
    "configs/multi30k_hour.py:en-fr",
]


def fields_read(path: Path) -> set[str]:
    """Names `x` of every `config.x` and `config.get("x")` in the code of `path`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "config"
        ):
            names.add(node.attr)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "config"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(node.args[0].value)
    return names - CONFIGDICT_METHODS


def test_every_field_the_code_reads_is_in_the_default_config():
    known = set(default.get_config().keys())
    read = {name: path for path in READERS for name in fields_read(REPO / path)}
    assert len(read) > 30, "the scan found too few fields: is READERS right?"
    missing = sorted(set(read) - known)
    assert not missing, f"read but not in configs/default.py: {[(m, read[m]) for m in missing]}"


@pytest.mark.parametrize("config_file", CONFIGS)
def test_every_config_takes_command_line_overrides_of_its_fields(config_file, monkeypatch):
    argv = ["train.py", f"--config={config_file}", "--config.num_buckets=8"]
    argv += ["--config.decoding.max_decode_len_b=3", "--config.decoding.no_repeat_ngram_size=2"]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", "configs/default.py", flag_values=values)
    values(argv)
    assert values.config.num_buckets == 8 and values.config.decoding.max_decode_len_b == 3
    assert set(default.get_config().keys()) <= set(values.config.keys())
    settings = DecodeSettings(**values.config.decoding)
    assert (settings.max_decode_len_b, settings.no_repeat_ngram_size) == (3, 2)


def test_the_hour_recipe_changes_only_the_pair_between_pairs():
    from configs import multi30k_hour

    de, fr = multi30k_hour.get_config("en-de"), multi30k_hour.get_config("en-fr")
    assert (de.dataset, fr.dataset) == ("multi30k/en-de", "multi30k/en-fr")
    fr.dataset = de.dataset
    assert fr.to_dict() == de.to_dict()
    with pytest.raises(ValueError, match="en-de, en-fr"):
        multi30k_hour.get_config("de-fr")


def test_the_decoding_sub_config_is_decode_settings_whole():
    config = default.get_config()
    assert set(config.decoding.keys()) == {f.name for f in dataclasses.fields(DecodeSettings)}
    assert DecodeSettings(**config.decoding) == DecodeSettings(decode="greedy", max_decode_len=16)


def test_a_run_written_before_the_decoding_sub_config_loads_its_settings(tmp_path):
    saved = json.loads(default.get_config().to_json_best_effort())
    del saved["decoding"]
    saved.update(decode="beam", beam_size=6, alpha=1.0, max_decode_len=40, max_decode_len_a=1.5)
    (tmp_path / run_config.CONFIG_FILE).write_text(json.dumps(saved))
    config = run_config.load_config(tmp_path)
    assert "beam_size" not in config and "decode" not in config
    settings = DecodeSettings(**config.decoding)
    assert settings == DecodeSettings(
        decode="beam", beam_size=6, alpha=1.0, max_decode_len=40, max_decode_len_a=1.5
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("beam_size", 0, r"--config.decoding.beam_size=0: use a beam of 1 or more"),
        ("decode", "sample", r"--config.decoding.decode=sample: validation decodes with greedy"),
    ],
)
def test_a_bad_validation_setting_stops_the_run_before_it_trains(tmp_path, field, value, message):
    config = default.get_config()
    config.decoding[field] = value
    with pytest.raises((ValueError, RunError), match=message):
        training.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def load_config(config_file: str):
    """The config that `--config=config_file` gives (`configs/x.py` or `configs/x.py:argument`)."""
    path, _, argument = config_file.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return module.get_config(argument) if argument else module.get_config()


@pytest.mark.parametrize("config_file", CONFIGS)
def test_every_config_is_judged_by_a_metric_validation_computes(config_file):
    """eval_metric selects the best checkpoint and leads the validation line and the curves: a
    metric that validation reports, and for a model that writes lowercase, lowercased BLEU."""
    config = load_config(config_file)
    exact_match = config.eval_metric == "exact_match"
    reported = metrics.text_metrics(["a b"], ["a b"], exact_match=exact_match)
    assert isinstance(reported.get(config.eval_metric), float)
    if config.lowercase:
        assert config.eval_metric == "bleu_lc_tok"
