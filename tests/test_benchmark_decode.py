"""benchmarks/decode.py: a `--quick` smoke run of the JAX systems (the baselines are skipped when their
packages are missing) and its command-line errors."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import decode

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "decode.py"


def run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """(report, stdout) of `--quick` with seqzoo and the Python-loop beam search."""
    out = tmp_path_factory.mktemp("bench") / "decode.json"
    completed = run("--quick", "--systems", "seqzoo,python_loop,transformers", "--json", str(out))
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(out.read_text()), completed.stdout


def test_quick_run_times_every_cell_of_every_system(quick):
    report, _ = quick
    config = report["config"]
    cells = [(beam, batch) for beam in config["beam_sizes"] for batch in config["batch_sizes"]]
    for system in ("seqzoo", "python_loop"):
        result = report["results"][system]
        assert [(c["beam"], c["batch"]) for c in result["cells"]] == cells
        for cell in result["cells"]:
            assert cell["runs"] == config["runs"]
            assert 0 < cell["ms_min"] <= cell["ms_median"] <= cell["ms_max"]
            expected = cell["batch"] * config["gen_len"] / (cell["ms_median"] / 1e3)
            assert cell["tokens_per_s"] == pytest.approx(expected)
            assert cell["peak_rss_mb"] > 0
            # Exactly gen_len tokens per sentence, never pad, BOS or EOS.
            tokens = cell["tokens"]
            assert len(tokens) == cell["batch"] and {len(row) for row in tokens} == {
                config["gen_len"]
            }
            assert min(min(row) for row in tokens) > 2


def test_jit_decoding_compiles_once_per_cell_and_never_in_the_timed_runs(quick):
    report, _ = quick
    for cell in report["results"]["seqzoo"]["cells"]:
        assert cell["compile_s"] > 0 and cell["recompiles"] == 0
    bucketing = report["results"]["seqzoo"]["cells"][-1]["bucketing"]
    assert bucketing["batches"] == 8 and bucketing["recompiles"] == 0
    assert bucketing["source_lengths"][0] < bucketing["source_lengths"][1] <= bucketing["bucket"]


def test_the_plain_python_loop_finds_the_same_hypotheses(quick):
    report, _ = quick
    ours, plain = (report["results"][s]["cells"] for s in ("seqzoo", "python_loop"))
    for mine, theirs in zip(ours, plain, strict=True):
        assert mine["tokens"] == theirs["tokens"], mine["cell"]


def test_int8_weights_run_in_the_jit_search_and_the_plain_loop_alike(tmp_path):
    out = tmp_path / "decode.json"
    completed = run(
        "--quick", "--quantize", "int8", "--systems", "seqzoo,python_loop", "--json", str(out)
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["config"]["quantize"] == "int8"
    ours, plain = (report["results"][s]["cells"] for s in ("seqzoo", "python_loop"))
    for mine, theirs in zip(ours, plain, strict=True):
        assert mine["tokens"] == theirs["tokens"], mine["cell"]


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The Markdown tables of the report, `{first column: the other columns}`."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def test_the_table_shows_each_systems_figures_and_their_ratio(quick):
    report, stdout = quick
    rows = table_rows(stdout)
    results = report["results"]
    for system in ("seqzoo", "python_loop"):
        row = rows[decode.SYSTEMS[system][2]]
        shown = [float(c.split(" tok/s")[0].replace(",", "")) for c in row]
        want = [cell["tokens_per_s"] for cell in results[system]["cells"]]
        assert shown == pytest.approx(want, abs=0.5)
    ratio = rows[f"ratio {decode.SYSTEMS['seqzoo'][2]} / {decode.SYSTEMS['python_loop'][2]}"]
    want = [
        ours["tokens_per_s"] / loop["tokens_per_s"]
        for ours, loop in zip(results["seqzoo"]["cells"], results["python_loop"]["cells"])
    ]
    assert [float(c.rstrip("x")) for c in ratio] == pytest.approx(want, abs=0.006)
    machine = report["machine"]
    assert machine["cores"] > 0 and len(machine["load_average_after"]) == 3
    assert report["versions"]["jax"]
    if importlib.util.find_spec("torch") is None:
        assert "transformers" not in results
        assert "torch" in report["skipped"]["transformers"]
        assert "benchmarks/requirements.txt" in report["skipped"]["transformers"]
    else:  # the same weights through interop/marian.py (positions permuted): the same tokens
        pairs = zip(results["seqzoo"]["cells"], results["transformers"]["cells"], strict=True)
        assert all(mine["tokens"] == theirs["tokens"] for mine, theirs in pairs)


def test_rounds_add_the_median_of_the_per_round_ratios():
    """With rounds, each baseline gets a second ratio row: the median over rounds of its round's
    time / seqzoo's same round (tokens/s ratio, same tokens per batch)."""

    def cell(ms_rounds):
        best = min(ms_rounds)
        figures = dict(ms_median=best, ms_min=best, ms_max=best, rounds_ms_median=ms_rounds)
        return dict(
            cell="greedy b1", tokens_per_s=1000.0 / best, peak_rss_mb=1, tokens=[[1]], **figures
        )

    report = {
        "config": {"beam_sizes": [1], "batch_sizes": [1]},
        "results": {
            "seqzoo": {"cells": [cell([10.0, 20.0, 12.0])]},
            "ctranslate2": {"cells": [cell([15.0, 10.0, 12.0])]},
        },
    }
    rows = table_rows(decode.table(report))
    name = f"ratio {decode.SYSTEMS['seqzoo'][2]} / {decode.SYSTEMS['ctranslate2'][2]}"
    assert rows[name] == ["1.00x"]  # best against best: 10 ms each
    assert rows[f"{name}, median of the rounds'"] == ["1.00x"]  # median of 1.5, 0.5, 1.0
    report["results"]["ctranslate2"]["cells"] = [cell([15.0, 30.0, 10.0])]
    rows = table_rows(decode.table(report))
    assert rows[name] == ["1.00x"] and rows[f"{name}, median of the rounds'"] == ["1.50x"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--systems", "seqzoo,nope"], "unknown system(s) nope: use some of seqzoo"),
        (["--systems", "seqzoo,ctranslate2"], "add transformers to --systems"),
        (["--systems", "transformers"], "add seqzoo to --systems"),
        (["--quantize", "int8", "--dtype", "bfloat16"], "drop --dtype/--device"),
        (["--quick", "--shape", "opus-mt-en-de"], "is a real size: drop --quick"),
    ],
)
def test_bad_arguments_exit_with_one_line_errors(args, message):
    completed = run(*args)
    assert completed.returncode == 2
    error = completed.stderr.strip().splitlines()[-1]
    assert message in error
