"""benchmarks/decode_profile.py: the HLO parsing, the model-part names, and a `--quick` profile;
benchmarks/decode_pair.py: a `--quick` pair."""

import json

import pytest

from benchmarks import decode_pair, decode_profile

HLO = """
ENTRY %main.1 (p: f32[4,8]) -> f32[4,16] {
  %p = f32[4,8]{1,0} parameter(0)
  %ynn_fusion.3 = f32[4,16]{1,0} fusion(%p), kind=kCustom, metadata={op_name="jit(run)/while/body/x"}
  ROOT %copy.2 = f32[4,16]{1,0} copy(%ynn_fusion.3)
}
"""


def test_instructions_map_names_to_shapes_and_sources():
    ops = decode_profile.instructions(HLO)
    assert ops["ynn_fusion.3"] == ("f32[4,16]{1,0}", "jit(run)/while/body/x")
    assert ops["copy.2"] == ("f32[4,16]{1,0}", "")


def test_parts_fold_layers_and_drop_wrappers():
    layer = "jit(run)/while/body/Transformer.decode_step/decoder_layers_2/decoder_layers_2.residual"
    assert decode_profile.part(f"{layer}/ffn/inner/dot_general") == (
        "decode_step/decoder_layers_*/ffn/inner"
    )
    assert decode_profile.part("jit(run)/while/body/top_k") == "top_k"
    assert decode_profile.part("jit(run)/while/body/jit(log_softmax)/exp") == "log_softmax"


def test_quick_profile_splits_each_step_by_model_part(tmp_path, capsys):
    out = tmp_path / "profile.json"
    decode_profile.main(
        ["--quick", "--beam", "1", "--beam", "2", "--runs", "2", "--json", str(out)]
    )
    report = json.loads(out.read_text())
    assert [r["cell"] for r in report["results"]] == ["greedy b1", "beam2 b1"]
    for result in report["results"]:
        parts = result["step_ms_by_part"]
        # the decoder layers' attention runs in the loop, the encoder outside it
        for name in ("decoder_layers_*/self_attention", "decoder_layers_*/cross_attention"):
            assert any(name in p for p in parts), (name, parts)
        assert any(p.startswith("encode/") for p in result["outside_loop_ms_by_part"])
        assert abs(result["ops_ms_per_step"] - sum(parts.values())) < 1e-3
        # the ops of one profiled decode cannot take longer than two threads could run them
        per_step_profiled = result["ms_per_decode_profiled"] / report["config"]["gen_len"]
        assert 0 < result["ops_ms_per_step"] <= 2 * per_step_profiled
        steps = [op["ms"] for op in result["top_ops"] if op["per"] == "step"]
        assert steps and steps == sorted(steps, reverse=True)
        assert result["top_ops"][-1]["per"] == "decode"
    assert "| part (all layers) | ms/step | share |" in capsys.readouterr().out


def test_quick_pair_compares_two_param_sets_on_the_same_tokens(tmp_path, capsys):
    out = tmp_path / "pair.json"
    decode_pair.main(
        ["--quick", "--beam", "2", "--a", "raw", "--b", "decoding", "--pairs", "2"]
        + ["--json", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["cell"] == "beam2 b1" and result["same_tokens"] == 1.0
    assert result["a_over_b"] > 0 and set(result["ms"]) == {"a", "b"}
    assert "A (raw)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "main, args, message",
    [
        (decode_pair.main, ["--quick", "--shape", "opus-mt-en-de"], "is a real size: drop --quick"),
        (decode_profile.main, ["--quick", "--shape", "opus-mt-en-de"], "is a real size"),
        (decode_pair.main, ["--quick"], "--a and --b decode the same way"),
        (decode_pair.main, ["--quick", "--b_option", "fast"], "write it as NAME=VALUE"),
    ],
)
def test_bad_arguments_exit_with_one_line_errors(main, args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
