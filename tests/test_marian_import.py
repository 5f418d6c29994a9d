"""interop/marian_import.py: what a Marian directory import refuses (one line, nothing written),
and the weights it reads (safetensors, a plain tensor pickle)."""

import json
import pickle
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import MARIAN_MAX_NEW

from evaluation import loading
from experiment import RunError, pretrained
from interop import marian

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


class Exploit:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def _damage(kind: str, directory: Path) -> None:
    if kind == "config":
        (directory / "config.json").unlink()
    elif kind == "bart":
        _edit_config(directory, model_type="bart")
    elif kind == "activation":
        _edit_config(directory, activation_function="tanh")
    elif kind == "pre_ln":
        _edit_config(directory, normalize_before=True)
    elif kind == "shapes":
        _edit_config(directory, encoder_ffn_dim=64, decoder_ffn_dim=64)
    elif kind == "tokenizer":
        (directory / "source.spm").unlink()
    elif kind == "pickle":
        (directory / marian.SAFETENSORS).unlink()
        (directory / marian.PICKLE).write_bytes(pickle.dumps({"w": Exploit()}))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("config", "is not a Marian model directory: it has no config.json"),
        ("bart", "has model_type 'bart', not 'marian'"),
        ("activation", "has activation_function 'tanh': supported are"),
        ("pre_ln", "sets normalize_before, which MarianMTModel does not have"),
        ("shapes", r"fc1.weight has shape \(32, 16\), which does not match config.json"),
        ("tokenizer", "has no source.spm: a Marian model directory holds its tokenizer files"),
        ("pickle", "is not a plain tensor pickle .*weights_only=True refused"),
    ],
)
def test_bad_directories_are_refused_in_one_line_and_nothing_is_written(
    tiny_marian, tmp_path, kind, message
):
    directory = tmp_path / "marian"
    shutil.copytree(tiny_marian["shared"], directory)
    _damage(kind, directory)
    with pytest.raises(RunError, match=message) as error:
        pretrained.import_marian(directory, tmp_path / "run")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists() and [p.name for p in tmp_path.iterdir()] == ["marian"]


def test_a_plain_tensor_pickle_imports_like_safetensors(tiny_marian, converted, tmp_path):
    directory = tmp_path / "marian"
    shutil.copytree(tiny_marian["shared"], directory)
    state = transformers.MarianMTModel.from_pretrained(directory).state_dict()
    torch.save(state, directory / marian.PICKLE)
    (directory / marian.SAFETENSORS).unlink()
    (directory / "tokenizer_config.json").unlink()  # optional: the vocabularies follow config.json
    pretrained.import_marian(directory, tmp_path / "run", max_len=32, max_decode_len=MARIAN_MAX_NEW)
    params = loading.Run(tmp_path / "run").params
    expected = converted["shared"][2].params
    assert jax.tree.all(jax.tree.map(np.array_equal, params, expected))
