"""models/common.py: the dropout every model family uses (its mask, rate, scaling and blocks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import common


def test_keep_mask_keeps_the_promised_fraction_and_blocks_agree_in_shape():
    key = jax.random.key(0)
    threshold = round(0.3 * 65536)
    mask = common.keep_mask(
        key, (64, 1001), threshold, block_words=4096
    )  # 8 blocks, the last short
    assert mask.shape == (64, 1001) and mask.dtype == jnp.bool_
    kept = float(mask.mean())
    assert abs(kept - 0.7) < 4 * np.sqrt(0.7 * 0.3 / mask.size)  # within 4 standard errors
    # Blocks come from their own keys: the same draw in one block differs from the blocked one ...
    whole = common.keep_mask(key, (64, 1001), threshold)
    assert not np.array_equal(mask, whole)
    # ... and the same key, shape and blocks give the same mask.
    np.testing.assert_array_equal(mask, common.keep_mask(key, (64, 1001), threshold, 4096))
    # No two consecutive blocks repeat each other (each has its own fold_in key).
    flat = np.asarray(mask).reshape(-1)
    assert not np.array_equal(flat[:8192], flat[8192:16384])
    # A mask of many blocks is drawn in at most DROPOUT_MAX_BLOCKS of them (larger ones).
    many = jax.make_jaxpr(lambda k: common.keep_mask(k, (64, 1001), threshold, block_words=64))(key)
    draws = sum(str(e.primitive) == "random_bits" for e in many.eqns)
    assert draws == common.DROPOUT_MAX_BLOCKS, draws


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_zeroes_at_the_rate_and_keeps_the_expectation(dtype):
    x = jnp.ones((256, 512), dtype)
    layer = common.Dropout(0.2)
    y = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert y.dtype == dtype
    values = np.asarray(y, np.float32)
    dropped = float((values == 0).mean())
    assert abs(dropped - 0.2) < 4 * np.sqrt(0.2 * 0.8 / values.size)
    kept = values[values != 0]
    keep = (65536 - round(0.2 * 65536)) / 65536
    np.testing.assert_allclose(kept, 1 / keep, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6)
    assert abs(values.mean() - 1.0) < 0.01
    # Another key, another mask; deterministic or rate 0: the input itself.
    other = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.array_equal(np.asarray(other), np.asarray(y))
    assert layer.apply({}, x, deterministic=True) is x
    assert common.Dropout(0.0).apply({}, x, deterministic=False) is x
