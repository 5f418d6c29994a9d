"""interop/marian_import.py: what a Marian directory import refuses (one line, nothing written),
whatever the bytes of its config.json and safetensors header (a seeded fuzz), the weights it reads
(safetensors, a plain tensor pickle), and the run directory it writes."""

import json
import os
import pickle
import shutil
import stat
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
    elif kind == "null":
        _edit_config(directory, d_model=None)
    elif kind == "list":
        path = directory / "config.json"
        path.write_text(json.dumps([json.loads(path.read_text())]))
    elif kind == "vocab list":
        (directory / "vocab.json").write_text("[1, 2]")
    elif kind == "vocab id":
        path = directory / "vocab.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "</s>": "0"}))
    elif kind == "settings list":
        (directory / "tokenizer_config.json").write_text("[]")
    elif kind == "odd width":
        _edit_config(directory, d_model=15)
    elif kind == "positions":
        _edit_config(directory, max_position_embeddings=1)
    elif kind == "bos":
        _edit_config(directory, decoder_start_token_id=500)
    elif kind in ("nan", "integers"):
        from safetensors.numpy import load_file, save_file

        path = directory / marian.SAFETENSORS
        state = load_file(str(path))
        if kind == "nan":
            state["model.encoder.layers.1.fc1.weight"][3, 5] = np.nan
        else:
            state["model.decoder.layers.0.fc2.bias"] = np.arange(16, dtype=np.int32)
        save_file(state, str(path), metadata={"format": "pt"})


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
        ("null", "config.json has d_model null, not a positive integer"),
        ("list", "config.json holds a JSON list, not an object of settings"),
        ("vocab list", "vocab.json holds a JSON list, not an object"),
        ("vocab id", r'vocab.json has </s> "0", not a token id'),
        ("settings list", "tokenizer_config.json holds a JSON list, not an object"),
        ("odd width", r"config.json has d_model 15: .* needs it even and divisible by"),
        ("positions", "config.json has max_position_embeddings 1, not a number of positions"),
        ("bos", "config.json has decoder_start_token_id 500, beyond its decoder_vocab_size 67"),
        ("nan", "model.safetensors: model.encoder.layers.1.fc1.weight holds non-finite values"),
        ("integers", "model.safetensors: model.decoder.layers.0.fc2.bias holds int32 values"),
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


def test_an_imported_run_is_readable_by_others(tiny_marian, tmp_path):
    old = os.umask(0o022)
    try:
        pretrained.import_marian(tiny_marian["shared"], tmp_path / "run")
    finally:
        os.umask(old)
    modes = {
        p: stat.S_IMODE(p.stat().st_mode)
        for p in [tmp_path / "run", *(tmp_path / "run").rglob("*")]
    }
    assert {p: m for p, m in modes.items() if m != (0o755 if p.is_dir() else 0o644)} == {}


# ---------------------------------------------------------------------------------------- fuzz


FUZZ_CASES = int(os.environ.get("SEQZOO_FUZZ_CASES", "51"))  # more by hand: SEQZOO_FUZZ_CASES=3000
# What a field of config.json may become: other types, and sizes from 0 to far too big.
ODD_VALUES = (None, True, "16", [16], {}, -1, 0, 1, 3, 0.5, 1e300, 10**9, 2**63)


def _mutated(data: bytes, region: int, rng: np.random.Generator) -> bytes:
    """`data` cut at a random byte of its first `region`, or with one of those bytes changed."""
    at = int(rng.integers(region))
    if rng.random() < 0.25:
        return data[:at]
    return data[:at] + bytes([(data[at] + int(rng.integers(1, 256))) % 256]) + data[at + 1 :]


def _odd_field(data: bytes, rng: np.random.Generator) -> bytes:
    """config.json `data` with one field's value replaced by one of `ODD_VALUES`."""
    config = json.loads(data)
    field = sorted(config)[int(rng.integers(len(config)))]
    config[field] = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
    return json.dumps(config).encode()


@pytest.mark.parametrize("case", range(FUZZ_CASES))
def test_a_damaged_config_or_safetensors_header_is_one_line_or_imports_whole(
    tiny_marian, tmp_path, case
):
    """Case 3k damages config.json's bytes, 3k+1 the safetensors header's (its 8-byte length and
    the JSON after it), 3k+2 sets a config.json field to an odd value: the import either refuses in
    one line naming the file, writing nothing, or (where the damage hit what seqzoo does not read)
    writes the whole run directory."""
    rng = np.random.default_rng([37, case])
    directory = tmp_path / "marian"
    shutil.copytree(tiny_marian["shared"], directory)
    path = directory / (marian.SAFETENSORS if case % 3 == 1 else "config.json")
    data = path.read_bytes()
    if case % 3 == 2:
        path.write_bytes(_odd_field(data, rng))
    else:
        header = len(data) if case % 3 == 0 else 8 + int.from_bytes(data[:8], "little")
        path.write_bytes(_mutated(data, header, rng))
    run = tmp_path / "run"
    try:
        pretrained.import_marian(directory, run)
    except RunError as e:
        assert "\n" not in str(e) and path.name in str(e), str(e)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["marian"]
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["marian", "run"]
        assert sorted(p.name for p in run.iterdir()) == ["config.json", "pretrained", "tokenizer"]
        assert (run / "pretrained" / "0").is_dir()
