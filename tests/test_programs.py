"""experiment/programs.py: the loss and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contracts import PAD_ID
from experiment import programs


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
