"""benchmarks/train_throughput.py: config overrides (`--set`) and one synthetic step on the CPU."""

import json
import subprocess
import sys

import pytest

from benchmarks import train_throughput
from configs import multi30k_transformer, tiny_dates
from experiment import programs
from models import registry


def test_set_reads_literals_and_adds_model_hyperparameters():
    config = multi30k_transformer.get_config()
    train_throughput.set_field(config, "vocab_size=4000")
    train_throughput.set_field(config, "model_hparams.ffn_dim=512")
    train_throughput.set_field(config, "model_hparams.activation_dropout_rate=0.0")
    train_throughput.set_field(config, "schedule=rsqrt")
    assert config.vocab_size == 4000 and config.schedule == "rsqrt"
    assert config.model_hparams.ffn_dim == 512
    assert config.model_hparams.activation_dropout_rate == 0.0


@pytest.mark.parametrize(
    "override, message",
    [("vocab_size", "write it as field=value"), ("no_such_field=1", "has no field")],
)
def test_set_refuses_bad_overrides_in_one_line(override, message):
    with pytest.raises(SystemExit, match=message):
        train_throughput.set_field(tiny_dates.get_config(), override)


def test_a_synthetic_step_with_overrides(tmp_path):
    out = tmp_path / "throughput.json"
    command = [sys.executable, "benchmarks/train_throughput.py", "--config", "tiny_dates"]
    command += ["--devices", "1", "--synthetic", "4x6", "--steps", "1", "--warmup", "1"]
    command += ["--set", "model_hparams.hidden_dim=8", "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    (result,) = json.loads(out.read_text())["results"]
    assert result["batch_shape"] == [4, 6, 6] and result["steps"] == 1
    config = tiny_dates.get_config()
    config.model_hparams.hidden_dim = 8
    vocab = config.vocab_size
    model = programs.create_model(config, vocab, vocab)
    params = programs.init_params_from_seed(model, 0)
    assert result["params"] == registry.count_params(params)  # the override was trained
