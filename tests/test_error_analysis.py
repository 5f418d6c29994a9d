"""decoding/error_analysis.py: constructed search and model errors, with arrays and with a real search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decoding

BOS, EOS, A, B, C, D = 1, 2, 3, 4, 5, 6

# A garden-path model: the state is the previous token, NEXT[previous] the next-token probabilities.
# Greedy takes A (0.55), then C (0.35, tied with D: the lower id wins), then EOS: P = 0.1925. The
# best sequence is B EOS (0.45), which a beam of 2 finds.
NEXT = np.full((7, 7), 1e-9)
NEXT[BOS, [A, B]] = [0.55, 0.45]
NEXT[A, [C, D, EOS]] = [0.35, 0.35, 0.30]
NEXT[[B, C, D], EOS] = 1.0
LOGITS = jnp.log(jnp.asarray(NEXT, jnp.float32))


def step_fn(tokens, previous):
    del previous
    return LOGITS[tokens], tokens


@jax.jit
def decode_and_score(references):
    """Beam outputs (beam 1 and 2) and reference scores, all under the same (no) length penalty."""
    state = jnp.zeros(references.shape[0], jnp.int32)
    common = dict(bos_id=BOS, eos_id=EOS, alpha=0.0, length_penalty="none")
    beams = [
        decoding.beam_search(
            step_fn, state, batch_size=references.shape[0], beam_size=k, max_len=4, **common
        )
        for k in (1, 2)
    ]
    return beams, decoding.score(step_fn, state, references, **common)


def analyse(beam, reference_scores, references):
    return decoding.error_analysis(
        references, reference_scores, beam.sequences[:, 0], beam.scores[:, 0], eos_id=EOS
    )


def test_a_narrow_beam_makes_search_errors_that_a_wider_beam_fixes():
    references = jnp.array([[B, EOS, 0, 0], [B, EOS, 0, 0], [A, EOS, 0, 0], [A, C, EOS, 0]])
    (greedy_beam, wide_beam), scored = decode_and_score(references)
    np.testing.assert_array_equal(greedy_beam.sequences[:, 0], [[A, C, EOS, 0]] * 4)
    np.testing.assert_array_equal(wide_beam.sequences[:, 0], [[B, EOS, 0, 0]] * 4)

    narrow = analyse(greedy_beam, scored.scores, references)
    assert [r["kind"] for r in narrow["records"]] == ["search", "search", "model", "correct"]
    assert (narrow["num_search_errors"], narrow["num_model_errors"]) == (2, 1)
    assert narrow["search_error_fraction"] == pytest.approx(2 / 3)
    assert narrow["verdict"] == "search" and "widen the beam" in narrow["suggested_fix"]
    record = narrow["records"][0]
    assert record["reference_score"] == pytest.approx(np.log(0.45), abs=1e-5)
    assert record["hypothesis_score"] == pytest.approx(np.log(0.1925), abs=1e-5)

    wide = analyse(wide_beam, scored.scores, references)
    assert [r["kind"] for r in wide["records"]] == ["correct", "correct", "model", "model"]
    assert wide["verdict"] == "model" and "a wider beam will not help" in wide["suggested_fix"]


def test_categories_ties_padding_and_references_longer_than_max_len():
    references = np.array(
        [
            [3, 4, EOS, 0, 0],  # equal to its hypothesis up to EOS: correct
            [3, EOS, 0, 0, 0],  # scores higher than its hypothesis: search error
            [4, EOS, 0, 0, 0],  # scores lower: model error
            [5, EOS, 0, 0, 0],  # scores the same: the model cannot prefer it, model error
            [3, 3, 3, 3, EOS],  # higher, but longer than max_len = 3: search error, too long
        ]
    )
    hypotheses = np.array([[3, 4, EOS], [4, 4, EOS], [3, EOS, 0], [4, EOS, 0], [4, EOS, 0]])
    report = decoding.error_analysis(
        references,
        [-1.0, -0.5, -3.0, -2.0, -0.1],
        hypotheses,
        [-1.0, -2.5, -1.0, -2.0, -4.0],
        eos_id=EOS,
        num_examples=1,
    )
    kinds = [r["kind"] for r in report["records"]]
    assert kinds == ["correct", "search", "model", "model", "search"]
    assert report["num_sentences"] == 5 and report["num_correct"] == 1
    assert report["search_error_fraction"] == report["model_error_fraction"] == 0.5
    assert report["num_reference_too_long"] == 1
    assert report["verdict"] == "tie" and "raise the length limit" in report["suggested_fix"]
    # One example of each kind, the largest score gap first, with its tokens cut after EOS.
    (search,) = report["examples"]["search"]
    assert search["index"] == 4 and search["reference"] == [3, 3, 3, 3, EOS]
    assert search["hypothesis"] == [4, EOS]
    assert report["examples"]["model"][0]["index"] == 2

    text = decoding.format_error_analysis(report, detokenize=lambda ids: "-".join(map(str, ids)))
    assert "5 sentences: 1 correct, 4 errors" in text
    assert "search errors (score(y*) > score(ŷ)):       2 (50.0% of errors)" in text
    assert "search error, sentence 4:" in text and "3-3-3-3-2" in text


def test_no_errors():
    tokens = np.array([[3, EOS], [4, EOS]])
    report = decoding.error_analysis(tokens, [-1.0, -2.0], tokens, [-1.0, -2.0], eos_id=EOS)
    assert report["num_correct"] == 2 and report["verdict"] == "none"
    assert report["search_error_fraction"] == report["model_error_fraction"] == 0.0
    assert "No errors" in decoding.format_error_analysis(report)


def test_mismatched_shapes_raise_a_one_line_value_error():
    tokens = np.array([[3, EOS], [4, EOS]])
    with pytest.raises(ValueError, match=r"error_analysis needs references \[n, T\]") as error:
        decoding.error_analysis(tokens, [-1.0], tokens, [-1.0, -2.0], eos_id=EOS)
    assert "\n" not in str(error.value)


def test_references_past_their_own_length_limit_are_not_blamed_on_the_beam():
    # Two search errors with 5-token references; the decoder could generate 8 tokens (array width)
    # but sentence 0's own limit (e.g. ceil(a * source) + b) was 4.
    references = np.array([[A, C, D, C, EOS], [A, C, D, C, EOS]])
    hypotheses = np.array([[B, EOS, 0, 0, 0, 0, 0, 0]] * 2)
    report = decoding.error_analysis(
        references,
        np.array([-1.0, -1.0]),
        hypotheses,
        np.array([-2.0, -2.0]),
        eos_id=EOS,
        max_lengths=np.array([4, 8]),
    )
    assert report["num_search_errors"] == 2 and report["num_reference_too_long"] == 1
    assert "raise the length limit" in report["suggested_fix"]
    only_cut = decoding.error_analysis(
        references[:1],
        np.array([-1.0]),
        hypotheses[:1],
        np.array([-2.0]),
        eos_id=EOS,
        max_lengths=np.array([4]),
    )
    assert only_cut["num_reference_too_long"] == 1
    assert "widen the beam" not in only_cut["suggested_fix"]
    assert "no beam can reach" in only_cut["suggested_fix"]
