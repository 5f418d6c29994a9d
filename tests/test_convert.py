"""convert.py: a Marian directory imported as a run and exported back, from the command line, in a
process where torch cannot be imported (as after `pip install -r requirements.txt`)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

import convert
from interop import marian

# convert.main on each argv of argv[1] (a JSON list) with torch unimportable, whether or not it is
# installed: `import torch` raises ImportError. Prints each exit: 0, or SystemExit's message.
WITHOUT_TORCH = """
import json, sys
sys.modules["torch"] = None
import convert
exits = []
for argv in json.loads(sys.argv[1]):
    try:
        exits.append(convert.main(argv))
    except SystemExit as e:
        exits.append(str(e.code))
print(json.dumps({"exits": exits, "torch_blocked": sys.modules["torch"] is None}))
"""


def convert_without_torch(*commands: list[str]) -> tuple[list, list[str]]:
    """(the exit of each command, the lines they printed) of `convert.main` run without torch."""
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, json.dumps(commands)],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    *printed, last = result.stdout.splitlines()
    report = json.loads(last)
    assert report["torch_blocked"]
    return report["exits"], printed


def test_safetensors_import_and_export_need_no_torch_and_give_back_the_weights(
    tiny_marian, tmp_path
):
    from safetensors.numpy import load_file

    torch = pytest.importorskip("torch")
    source = tiny_marian["shared"]
    pickled = tmp_path / "pickled"  # the same model with only pytorch_model.bin
    shutil.copytree(source, pickled)
    state = {
        k: torch.from_numpy(v) for k, v in load_file(str(pickled / marian.SAFETENSORS)).items()
    }
    torch.save(state, pickled / marian.PICKLE)
    (pickled / marian.SAFETENSORS).unlink()
    run, out = tmp_path / "run", tmp_path / "exported"

    exits, printed = convert_without_torch(
        ["import", str(source), str(run), "--max_len", "32"],
        ["export", str(run), str(out)],
        ["import", str(pickled), str(tmp_path / "pickled_run")],
    )

    assert exits[:2] == [0, 0]
    assert printed[0].startswith(f"imported {source}") and f"exported {run} to {out}" in printed
    assert exits[2] == (
        f"error: {pickled / marian.PICKLE} is a PyTorch pickle, which needs torch to read: pip "
        "install torch (the CPU build: --index-url https://download.pytorch.org/whl/cpu), or "
        f"convert the weights to {marian.SAFETENSORS} where torch is installed"
    )
    assert not (tmp_path / "pickled_run").exists()
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
