"""The Transformer decoder's KV cache for incremental decoding: its state, one cached step, and
attention over a cache that beam search never reorders.

The self-attention cache is never copied. Beam search does not reorder it (`contracts.BeamShared`):
each row writes its step's keys/values in its own cache row, and `slots` (ordinary state, which the
search reorders with the hypotheses) records which beam's row holds each position of each hypothesis;
a step multiplies every cache row of a sentence by the queries of all its beams and keeps each
hypothesis' own products (`beam_cache_scores`, `beam_cache_mix`). The cache is written before it is
read (at one row, read and then written: `read_then_write`), so XLA updates it in place, and it is
laid out for the per-head matmuls to read as it lies: keys `[N, heads, head_dim, max_len]`, values
`[N, heads, max_len, head_dim]`. The encoder-decoder attention reads the source keys/values
head-major too: `cached_decoder_layers` transposes them once per decode (teacher forcing keeps them
sequence-major, as `encode` returns them).
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from contracts import BeamShared
from models import common


def beam_cache_scores(query: jax.Array, keys: jax.Array, holds: jax.Array) -> jax.Array:
    """Dot products `[N, heads, 1, max_len]` of one query per row `[N, 1, heads, head_dim]` with the
    keys of its own hypothesis in a beam-shared key cache `[N, heads, head_dim, max_len]`.

    The cache is never reordered between beams (`contracts.BeamShared`): position t of hypothesis i is
    in the row of its sentence's beam j where `holds [batch, j, 1, i, max_len]` is True. Each cache row
    meets the queries of all `beam` hypotheses of its sentence, `beam` times the (small) multiply-adds
    of reading the cache as it lies, then each query keeps its own rows' scores; reordering instead
    copies the whole cache at every step.
    """
    rows, _, heads, head_dim = query.shape
    batch, beam, _, _, max_len = holds.shape
    queries = jnp.broadcast_to(
        jnp.transpose(query.reshape(batch, 1, beam, heads, head_dim), (0, 1, 3, 2, 4)),
        (batch, beam, heads, beam, head_dim),
    )  # [batch, j, heads, i, head_dim]
    scores = jnp.einsum("nhid,nhdk->nhik", queries.reshape(rows, heads, beam, head_dim), keys)
    scores = jnp.where(holds, scores.reshape(batch, beam, heads, beam, max_len), 0.0).sum(axis=1)
    return jnp.swapaxes(scores, 1, 2).reshape(rows, heads, 1, max_len)


def beam_cache_mix(weights: jax.Array, values: jax.Array, holds: jax.Array) -> jax.Array:
    """`[N, 1, heads, head_dim]`: the values of each row's own hypothesis in a beam-shared value cache
    `[N, heads, max_len, head_dim]` averaged under weights `[N, heads, 1, max_len]`; `holds` as in
    `beam_cache_scores` (each cache row mixes its values for every hypothesis that reads it)."""
    rows, heads, _, max_len = weights.shape
    batch, beam = holds.shape[:2]
    per_query = jnp.swapaxes(weights.reshape(batch, beam, heads, max_len), 1, 2)[:, None]
    per_row = jnp.where(holds, per_query, 0.0).reshape(rows, heads, beam, max_len)
    mixed = jnp.einsum("nhik,nhkd->nhid", per_row, values)
    mixed = mixed.reshape(batch, beam, heads, beam, -1).sum(axis=1)  # [batch, heads, i, head_dim]
    return jnp.swapaxes(mixed, 1, 2).reshape(rows, 1, heads, -1)


def read_then_write(attention, x, cache_k, cache_v, new_k, new_v, pos, mask) -> tuple:
    """Self-attention of one row (greedy or sampling of one sentence) over its cache and this step's
    key/value, then the cache written: `(output [1, 1, d_model], (keys, values))`.

    `attention` is the layer's `MultiHeadAttention` (its projections), `x` the queries' input `[1, 1,
    d_model]`, caches and `new_k [1, heads, head_dim, 1]`, `new_v [1, heads, 1, head_dim]` as in
    `DecoderLayer`, `pos` the position written, `mask [1, 1, 1, max_len]` the visible positions.

    With more rows the cache is written first and then read, and XLA updates it in place. With one
    row XLA:CPU drops the size-1 row axis for the per-head matmuls; the update is then fused twice
    (into the read's reshaped view and into the new state) and the cache copied four times a step.
    Here the step's scores against the cache as it was (position `pos` not yet written) and against
    the new key are read first, and the write depends on the read (a zero term), so XLA writes in
    place after it: no copy, 1.06-1.09x a greedy batch-1 decode of the benchmark's model.
    """
    query = attention.query(x) * (attention.d_model // attention.num_heads) ** -0.5
    at_pos = jnp.arange(cache_k.shape[-1]) == pos  # [max_len]
    scores = jnp.where(
        at_pos,
        jnp.einsum("bqhd,bhdk->bhqk", query, new_k),
        jnp.einsum("bqhd,bhdk->bhqk", query, cache_k),
    )  # [1, heads, 1, max_len]
    weights = common.masked_softmax(scores, mask).astype(attention.dtype)
    new_weight = jnp.sum(jnp.where(at_pos, weights, 0.0), axis=-1, keepdims=True)
    # Both terms accumulated in float32 and rounded once, as the one product over the written cache.
    f32 = jnp.float32
    mixed = jnp.einsum(
        "bhqk,bhkd->bhqd", jnp.where(at_pos, 0.0, weights), cache_v, preferred_element_type=f32
    )
    mixed = (mixed + new_weight.astype(f32) * new_v.astype(f32)).astype(attention.dtype)
    # The writes wait for the reads through this zero (XLA keeps a float x * 0): one finite element
    # of the read's output, never a sum that could overflow in a 16-bit dtype.
    after = 0.0 * mixed[0, 0, 0, 0]
    cache_k = jax.lax.dynamic_update_slice(cache_k, new_k + after, (0, 0, 0, pos))
    cache_v = jax.lax.dynamic_update_slice(cache_v, new_v + after, (0, 0, pos, 0))
    return attention.out(jnp.swapaxes(mixed, 1, 2)), (cache_k, cache_v)


def empty_decode_state(module: nn.Module, memory: dict, max_len: int) -> dict:
    """The state before BOS for `cached_decoder_layers` (`module` has `num_heads`, `d_model`, `dtype`
    and `decoder_layers`):
      pos: int32 `[batch]` zeros, the next position;
      slots: int32 `[batch, max_len]` zeros: for each past position, the beam (of the row's sentence)
        whose cache row holds its keys/values;
      cache: `contracts.BeamShared`, per decoder layer a zero cache in `module.dtype`, keys `[batch,
        heads, head_dim, max_len]` and values `[batch, heads, max_len, head_dim]`. Beam search does
        not reorder it: each row writes its own keys/values, and reads its hypothesis' past where
        `slots` says.
    """
    batch, heads = memory["mask"].shape[0], module.num_heads
    head_dim = module.d_model // heads
    cache = tuple(
        (
            jnp.zeros((batch, heads, head_dim, max_len), module.dtype),
            jnp.zeros((batch, heads, max_len, head_dim), module.dtype),
        )
        for _ in module.decoder_layers
    )
    return {
        "pos": jnp.zeros((batch,), jnp.int32),
        "slots": jnp.zeros((batch, max_len), jnp.int32),
        "cache": BeamShared(cache),
    }


def cached_decoder_layers(module: nn.Module, layers, x: jax.Array, memory: dict, state: dict):
    """One decoding step through `layers` (`DecoderLayer`s of `module`) with the KV cache.

    Sows each layer's encoder-decoder attention `[N, heads, src_len]` in `module`'s intermediates as
    `cross_attention_<layer>`.

    Args:
      x: `[N, 1, d_model]`, the embedded previous tokens (N = batch x beam).
      memory: `cross_kv` per layer and `mask`, from the model's `encode`.
      state: as `empty_decode_state` makes it, rows repeated to N: `pos` int32 `[N]`, `slots` int32
        `[N, max_len]`, `cache` per layer `(keys, values)`.

    Returns:
      (`[N, 1, d_model]`, the new state: `pos + 1`; each row's keys/values written at `pos` in its own
      cache row, which `slots` records as the row's beam there).
    """
    pos = state["pos"]
    rows = x.shape[0]
    batch = memory["mask"].shape[0]
    beam = common.beams_per_sentence(batch, rows)
    own_slot = (jnp.arange(rows, dtype=jnp.int32) % beam)[:, None]
    slots = jax.lax.dynamic_update_slice(state["slots"], own_slot, (0, pos[0]))
    cache_len = slots.shape[1]
    visible = (jnp.arange(cache_len)[None, :] <= pos[:, None])[:, None, None, :]
    # [batch, j, 1, i, max_len]: beam j's cache row holds hypothesis i's keys/values at that position.
    holds = None
    if beam > 1:
        holds = slots.reshape(batch, 1, 1, beam, cache_len) == jnp.arange(beam)[:, None, None, None]
    new_cache = []
    for i, (layer, (cache_k, cache_v)) in enumerate(zip(layers, state["cache"].value, strict=True)):
        keys, values = memory["cross_kv"][i]
        # Head-major, as the per-head matmuls read them. Loop-invariant behind the barrier (else XLA
        # folds the transposes into the matmuls, every step), so XLA hoists them out of the decoding
        # loop: transposed once per decode.
        cross_kv = jax.lax.optimization_barrier(
            (jnp.transpose(keys, (0, 2, 3, 1)), jnp.swapaxes(values, 1, 2))
        )
        x, kv, weights = layer(
            x,
            visible,
            cross_kv,
            memory["mask"],
            train=False,
            cache=(cache_k, cache_v, pos[0], holds),
        )
        new_cache.append(kv)
        # [batch, heads, beam, src_len] -> [N, heads, src_len]
        weights = jnp.swapaxes(weights, 1, 2).reshape(rows, weights.shape[1], -1)
        module.sow("intermediates", f"cross_attention_{i}", weights)
    return x, {"pos": pos + 1, "slots": slots, "cache": BeamShared(tuple(new_cache))}
