"""experiment/programs.py: the loss, and decode_fn on real models: forced prefixes, sampling and
alignments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SRC

import decoding
from contracts import BOS_ID, EOS_ID, PAD_ID
from experiment import RunError, programs
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
    fn = programs.decode_fn(model, decode, 3, MAX_LEN, "gnmt", None, 0.0, 0, 0, layer)
    result = jax.tree.map(np.asarray, fn(params, SRC, 0.6))
    plain = programs.decode_fn(model, decode, 3, MAX_LEN, "gnmt")(params, SRC, 0.6)
    np.testing.assert_array_equal(result.sequences, plain.sequences)
    best = programs.best_sequences(result)
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
    assert not programs.has_attention(model, params)
    with pytest.raises(RunError, match="Seq2SeqRNN has no attention over the source"):
        programs.decode_fn(model, "greedy", 1, MAX_LEN, "gnmt", None, 0.0, 0, 0, -1)(
            params, SRC, 0.6
        )
    model, params = tiny("transformer")
    assert programs.has_attention(model, params)
    with pytest.raises(RunError, match=r"alignment layer 2 does not exist: .* 2 cross-attention"):
        programs.decode_fn(model, "greedy", 1, MAX_LEN, "gnmt", None, 0.0, 0, 0, 2)(
            params, SRC, 0.6
        )


@pytest.mark.parametrize("decode", ["greedy", "beam", "sample"])
def test_a_forced_prefix_starts_every_output_and_its_score_is_the_teacher_forced_one(decode):
    model, params = tiny("transformer")
    fn = programs.decode_fn(model, decode, 3, MAX_LEN, "gnmt")
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
    scored = programs.score_fn(model, "gnmt")(params, SRC, programs.best_sequences(result), 0.6)
    log_probs = result.log_probs[:, 0] if decode == "beam" else result.log_probs
    np.testing.assert_allclose(scored.log_probs, log_probs, rtol=1e-5)


def test_sampling_needs_its_settings():
    model, params = tiny("transformer")
    with pytest.raises(RunError, match="decode='sample' needs sampling="):
        programs.decode_fn(model, "sample", 1, MAX_LEN, "gnmt")(params, SRC, 0.6)


def reference_cross_entropy(logits, targets, label_smoothing, pad_id):
    """The loss written out by autodiff's route: a materialized smoothed one-hot, log-softmax."""
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
    entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    losses = -jnp.sum(soft * jax.nn.log_softmax(logits), axis=-1) - entropy
    weights = (targets != pad_id).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_and_its_gradient_are_the_smoothed_softmax_loss(label_smoothing):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(scale=3.0, size=(3, 5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(1, 11, (3, 5)), jnp.int32).at[:, -2:].set(PAD_ID)
    ours = programs.cross_entropy(logits, targets, label_smoothing, PAD_ID)
    reference = reference_cross_entropy(logits, targets, label_smoothing, PAD_ID)
    np.testing.assert_allclose(ours, reference, rtol=1e-5)
    assert float(ours[1]) == 9.0  # the padded positions do not count

    def total(fn):
        return jax.grad(lambda z: fn(z, targets, label_smoothing, PAD_ID)[0])(logits)

    grad = total(programs.cross_entropy)
    np.testing.assert_allclose(grad, total(reference_cross_entropy), atol=1e-6)
    assert not np.any(grad[:, -2:])  # no gradient through padding
    # A (nearly) perfect prediction of the smoothed target scores 0.
    confidence, low = 1.0 - label_smoothing, label_smoothing / 10
    perfect = jnp.log(jnp.where(jax.nn.one_hot(targets, 11) > 0, confidence, low) + 1e-30)
    assert abs(float(programs.cross_entropy(perfect, targets, label_smoothing, PAD_ID)[0])) < 1e-4
