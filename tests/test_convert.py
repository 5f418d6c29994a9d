"""convert.py: a Marian directory imported as a run and exported back, from the command line."""

import json

import numpy as np
import pytest

import convert
from interop import marian


def test_import_then_export_gives_back_the_marian_weights(tiny_marian, tmp_path, capsys):
    from safetensors.numpy import load_file

    source = tiny_marian["shared"]
    run, out = tmp_path / "run", tmp_path / "exported"
    assert convert.main(["import", str(source), str(run), "--max_len", "32"]) == 0
    assert convert.main(["export", str(run), str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"imported {source}") and printed[-1] == f"exported {run} to {out}"
    original, exported = (load_file(str(d / marian.SAFETENSORS)) for d in (source, out))
    assert set(exported) <= set(original)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    for name in ("source.spm", "target.spm"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert json.loads((out / "vocab.json").read_text()) == json.loads(
        (source / "vocab.json").read_text()
    )


def test_a_refused_directory_is_one_line_on_stderr(tmp_path):
    with pytest.raises(SystemExit) as exit:
        convert.main(["import", str(tmp_path / "absent"), str(tmp_path / "run")])
    assert str(exit.value.code) == (
        f"error: {tmp_path / 'absent'} is not a directory: point at a local Marian model directory"
    )
    assert not (tmp_path / "run").exists()
