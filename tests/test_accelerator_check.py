"""benchmarks/accelerator_check.py --smoke: every step of the GPU check runs, at toy sizes, here."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_smoke_run_fills_every_section(tmp_path):
    command = [sys.executable, "benchmarks/accelerator_check.py", "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "accelerator_check.json").read_text())
    steps = report["steps"]
    assert {name: step["status"] for name, step in steps.items()} == {
        "environment": "ok",
        "tests": "ok",
        "decode": "ok",
        "train": "ok",
        "decode_loop": "ok",
    }
    assert steps["tests"]["counts"]["passed"] >= 2 and "failed" not in steps["tests"]["counts"]
    for dtype in ("bfloat16",):  # the smoke run's; float32's paths run in the other tests
        cells = steps["decode"]["dtypes"][dtype]["cells"]["seqzoo"]
        assert set(cells) == {"greedy b1", "greedy b2", "beam2 b1", "beam2 b2"}
        assert all(c["tokens_per_s"] > 0 for c in cells.values())
        assert steps["decode"]["dtypes"][dtype]["recompiles"]["seqzoo"] == 0
        train = steps["train"]["dtypes"][dtype]
        assert train["steps_per_sec"] > 0 and train["flops_per_step"] > 0
    for loop in ("greedy", "beam4"):
        assert steps["decode_loop"][loop] == {
            "host_ops": [],
            "recompiles": 0,
            "transfer_guard": "passed",
        }
    log = (tmp_path / "accelerator_check.log").read_text()
    assert "benchmarks/decode.py" in log and "train_throughput.py" in log
