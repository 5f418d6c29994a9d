"""decoding/settings.py: DecodeSettings' checks, static part, length limits, sampling keys, report."""

import dataclasses

import jax
import numpy as np
import pytest

from decoding import DecodeSettings
from decoding.settings import TRACED

SRC = np.array([[5, 6, 7, 8, 9, 0], [4, 0, 0, 0, 0, 0], [7, 7, 8, 0, 0, 0]], np.int32)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(decode="nucleus"), r"decode=nucleus: use one of greedy, beam, sample"),
        (dict(length_penalty="wu"), r"length_penalty=wu: use one of none, average, gnmt"),
        (dict(beam_size=0), r"beam_size=0: use a beam of 1 or more"),
        (dict(max_decode_len=0), r"max_decode_len=0: use a limit of 1 token or more"),
        (dict(no_repeat_ngram_size=0), r"no_repeat_ngram_size=0: use n >= 1 \(e.g. 3\), or leave"),
        (dict(temperature=0.0), r"temperature=0.0: use a value > 0"),
        (dict(top_k=-1), r"top_k=-1: use k >= 1, or 0 to keep every token"),
        (dict(top_p=1.5), r"top_p=1.5: use a value in \(0, 1\]"),
        (dict(top_p=0.0), r"top_p=0.0: use a value in \(0, 1\]"),
        (dict(num_samples=0), r"num_samples=0: use N >= 1"),
    ],
)
def test_check_names_the_bad_field_with_the_callers_prefix(fields, message):
    settings = DecodeSettings(**fields)
    with pytest.raises(ValueError, match=f"^{message}"):
        settings.check()
    with pytest.raises(ValueError, match=f"^--config.decoding.{message}"):
        settings.check("--config.decoding.")


def test_the_defaults_pass_and_every_field_has_its_help():
    settings = DecodeSettings()
    assert settings.check() is settings
    for field in dataclasses.fields(DecodeSettings):
        assert field.metadata["help"].endswith("."), field.name
    assert set(TRACED) < {f.name for f in dataclasses.fields(DecodeSettings)}


def test_static_resets_only_the_traced_fields():
    settings = DecodeSettings(decode="sample", beam_size=2, alpha=1.4, top_p=0.5, seed=9)
    static = settings.static()
    assert static == DecodeSettings(decode="sample", beam_size=2)
    assert static == dataclasses.replace(settings, alpha=0.0, top_p=0.3).static()
    assert hash(static) == hash(DecodeSettings(decode="sample", beam_size=2))


def test_length_limits_are_ceil_a_times_the_source_plus_b_under_max_decode_len():
    settings = DecodeSettings(max_decode_len=7, max_decode_len_a=1.5, max_decode_len_b=1)
    # Source tokens 5, 1, 3 -> ceil(7.5) + 1 = 9 (capped at 7), ceil(1.5) + 1 = 3, ceil(4.5) + 1 = 6.
    np.testing.assert_array_equal(settings.source_limits(SRC, pad_id=0), [9, 3, 6])
    np.testing.assert_array_equal(settings.length_limits(SRC, pad_id=0), [7, 3, 6])
    # Another pad id counts other tokens (5, 6, 4); a = 0 or images: max_decode_len everywhere.
    np.testing.assert_array_equal(settings.source_limits(SRC, pad_id=7), [9, 10, 7])
    off = dataclasses.replace(settings, max_decode_len_a=0.0)
    assert off.source_limits(SRC, pad_id=0) is None
    np.testing.assert_array_equal(off.length_limits(SRC, pad_id=0), [7, 7, 7])
    assert settings.source_limits(np.zeros((2, 4, 4, 3)), pad_id=0) is None


def test_sampling_keys_follow_the_seed_the_draw_and_the_sentence():
    assert DecodeSettings(decode="beam").sampling(0, np.arange(3)) is None
    settings = DecodeSettings(decode="sample", temperature=0.5, top_k=3, top_p=0.9, seed=4)
    inputs = settings.sampling(1, np.array([5, 2]))
    assert float(inputs["temperature"]) == 0.5 and int(inputs["top_k"]) == 3
    assert float(inputs["top_p"]) == pytest.approx(0.9)
    np.testing.assert_array_equal(inputs["example_ids"], [5, 2])
    expected = jax.random.fold_in(jax.random.key(4), 1)
    np.testing.assert_array_equal(jax.random.key_data(inputs["rng"]), jax.random.key_data(expected))
    other = dataclasses.replace(settings, seed=5).sampling(1, np.array([5, 2]))["rng"]
    assert not np.array_equal(jax.random.key_data(other), jax.random.key_data(expected))


def test_report_names_the_settings_and_the_sampling_ones_only_when_sampling():
    beam = DecodeSettings(beam_size=5, no_repeat_ngram_size=None).report()
    assert beam["decode"] == "beam" and beam["beam_size"] == 5
    assert beam["no_repeat_ngram_size"] == 0 and "temperature" not in beam
    greedy = DecodeSettings(decode="greedy", beam_size=5).report()
    assert greedy["beam_size"] == 1
    sample = DecodeSettings(decode="sample", num_samples=3, seed=2).report()
    assert (sample["num_samples"], sample["seed"], sample["top_p"]) == (3, 2, 1.0)
