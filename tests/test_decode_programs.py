"""experiment/decode_programs.py: decode_fn on real models: forced prefixes, sampling and
alignments, one compilation per static setting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SRC

import decoding
from contracts import BOS_ID, EOS_ID, PAD_ID
from decoding import DecodeSettings
from experiment import RunError, decode_programs, programs
from models import registry

HPARAMS = {
    "transformer": dict(
        d_model=16,
        num_heads=2,
        num_encoder_layers=2,
        num_decoder_layers=2,
        ffn_dim=32,
        max_positions=16,
    ),
    "attention_rnn": dict(embed_dim=8, hidden_dim=16),
    "seq2seq_rnn": dict(embed_dim=8, hidden_dim=16),
}
MAX_LEN = 7
PREFIX = np.array([[5, 6, 0], [0, 0, 0], [7, 0, 0], [9, 9, 4]], np.int32)


def settings_of(decode: str, **fields) -> DecodeSettings:
    """The tests' settings: beam 3 (or `fields`), GNMT, at most `MAX_LEN` tokens."""
    return DecodeSettings(decode, **{"beam_size": 3, "max_decode_len": MAX_LEN, **fields})


def tiny(name):
    model = registry.create_model(name, src_vocab_size=14, tgt_vocab_size=14, **HPARAMS[name])
    return model, programs.init_params_from_seed(model, 3)


def teacher_forced_attention(model, params, targets, layer):
    """float `[batch, T, src_len]`: the attention of layer `layer` (heads averaged) of `model`
    teacher-forced on `targets [batch, T]` (EOS-ended, PAD after)."""
    tgt_in = np.concatenate([np.full((len(targets), 1), BOS_ID), targets[:, :-1]], axis=1)
    tgt_in = np.where(
        np.cumsum(targets == EOS_ID, axis=1) - (targets == EOS_ID) > 0, PAD_ID, tgt_in
    )
    _, state = model.apply({"params": params}, SRC, tgt_in, train=False, mutable=["intermediates"])
    found = {}
    for path, value in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        name = next(str(k.key) for k in reversed(path) if "attention" in str(getattr(k, "key", "")))
        index = int(name.rsplit("_", 1)[1]) if name.startswith("cross_attention_") else 0
        found[index] = np.asarray(value).mean(axis=1) if value.ndim == 4 else np.asarray(value)
    return [found[i] for i in sorted(found)][layer]


@pytest.mark.parametrize(
    "name, layer, decode",
    [("transformer", -1, "beam"), ("transformer", 0, "greedy"), ("attention_rnn", -1, "beam")],
)
def test_alignments_are_the_most_attended_source_position_of_each_token(name, layer, decode):
    model, params = tiny(name)
    settings = settings_of(decode)
    fn = decode_programs.decode_fn(model, dataclasses.replace(settings, alignment_layer=layer))
    result = jax.tree.map(np.asarray, fn(params, SRC, 0.6))
    plain = decode_programs.decode_fn(model, settings)(params, SRC, 0.6)
    np.testing.assert_array_equal(result.sequences, plain.sequences)
    best = decode_programs.best_sequences(result)
    alignments = result.alignments[:, 0] if decode == "beam" else result.alignments
    weights = teacher_forced_attention(model, params, best, layer)  # [batch, T, src_len]
    lengths = np.asarray(decoding.scoring.sequence_lengths(best, EOS_ID))
    for b in range(len(SRC)):
        t = np.arange(lengths[b])
        chosen = weights[b, t, alignments[b, t]]
        np.testing.assert_allclose(chosen, weights[b, t].max(axis=-1), rtol=1e-5, atol=1e-6)
        assert np.all(alignments[b, lengths[b] :] == -1)
        assert np.all(SRC[b, alignments[b, t]] != PAD_ID), "never a padded source position"


def test_models_without_attention_or_layers_out_of_range_are_refused():
    model, params = tiny("seq2seq_rnn")
    assert not decode_programs.has_attention(model, params)
    with pytest.raises(RunError, match="Seq2SeqRNN has no attention over the source"):
        settings = settings_of("greedy", beam_size=1, alignment_layer=-1)
        decode_programs.decode_fn(model, settings)(params, SRC, 0.6)
    model, params = tiny("transformer")
    assert decode_programs.has_attention(model, params)
    with pytest.raises(RunError, match=r"alignment layer 2 does not exist: .* 2 cross-attention"):
        settings = settings_of("greedy", beam_size=1, alignment_layer=2)
        decode_programs.decode_fn(model, settings)(params, SRC, 0.6)


@pytest.mark.parametrize("decode", ["greedy", "beam", "sample"])
def test_a_forced_prefix_starts_every_output_and_its_score_is_the_teacher_forced_one(decode):
    model, params = tiny("transformer")
    fn = decode_programs.decode_fn(model, settings_of(decode))
    sampling = None
    if decode == "sample":
        sampling = dict(
            rng=jax.random.key(0),
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            example_ids=jnp.arange(len(SRC)),
        )
    result = jax.tree.map(np.asarray, fn(params, SRC, 0.6, prefix=PREFIX, sampling=sampling))
    sequences = result.sequences.reshape(len(SRC), -1, MAX_LEN)
    valid = result.valid if decode == "beam" else np.ones(sequences.shape[:2], bool)
    for b, row in enumerate(PREFIX):
        forced = row[row != PAD_ID]
        assert np.all(sequences[b][valid[b]][:, : len(forced)] == forced)
    best = decode_programs.best_sequences(result)
    scored = decode_programs.score_fn(model, "gnmt")(params, SRC, best, 0.6)
    log_probs = result.log_probs[:, 0] if decode == "beam" else result.log_probs
    np.testing.assert_allclose(scored.log_probs, log_probs, rtol=1e-5)


def test_sampling_needs_its_settings():
    model, params = tiny("transformer")
    with pytest.raises(RunError, match="decode='sample' needs sampling="):
        decode_programs.decode_fn(model, settings_of("sample", beam_size=1))(params, SRC, 0.6)


def test_settings_that_differ_only_in_traced_fields_share_one_program():
    model, _ = tiny("transformer")
    settings = settings_of("beam")
    program = decode_programs.decode_fn(model, settings)
    traced = dict(alpha=1.4, temperature=0.5, top_k=3, top_p=0.9, num_samples=2, seed=7)
    assert decode_programs.decode_fn(model, dataclasses.replace(settings, **traced)) is program
    for static in (dict(beam_size=4), dict(max_decode_len_a=1.5), dict(no_repeat_ngram_size=2)):
        assert (
            decode_programs.decode_fn(model, dataclasses.replace(settings, **static)) is not program
        )
    with pytest.raises(ValueError, match=r"^beam_size=0: use a beam of 1 or more$"):
        decode_programs.decode_fn(model, dataclasses.replace(settings, beam_size=0))
