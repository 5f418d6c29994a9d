"""What every decoder shares: argument checks, probing the step function, the search's token mask.

A step function is `step_fn(tokens [N] int32, state) -> (logits [N, vocab], new_state)`; every leaf of
`state` has the `N` rows first and `new_state` has exactly the structure, shapes and dtypes of `state`.
"""

from typing import Any

import jax
import jax.numpy as jnp

from contracts import PAD_ID, BeamShared, check_positive, is_int  # noqa: F401 (re-exported)


def check_batch(state: Any, batch_size: int, what: str = "init_state") -> None:
    """Raises a one-line ValueError unless every leaf of `state` has `batch_size` rows first."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        shape = jnp.shape(leaf)
        if not shape or shape[0] != batch_size:
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)} has shape {shape}: every leaf must have "
                f"the batch ({batch_size}) as its leading dimension"
            )


def probe_step_fn(step_fn, state: Any, rows: int, with_alignment: bool = False) -> int:
    """Checks `step_fn` on `rows` rows without running it; returns the vocabulary size.

    With `with_alignment` the step function returns a third output, int `[rows]`: the source position
    that the token being predicted is aligned with (e.g. the argmax of its attention).

    `state` gives the structure, trailing shapes and dtypes of the state (its leading dimension is
    replaced by `rows`). Raises a one-line ValueError when the logits are not `[rows, vocab]` floats or
    the new state differs from the state in structure, shape or dtype (a `lax.while_loop` carry must
    keep its type).
    """
    state_in = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((rows, *jnp.shape(x)[1:]), jnp.result_type(x)), state
    )
    tokens = jax.ShapeDtypeStruct((rows,), jnp.int32)
    out = jax.eval_shape(step_fn, tokens, state_in)
    arity = 3 if with_alignment else 2
    if not isinstance(out, tuple) or len(out) != arity:
        expected = (
            "a triple (logits, new_state, alignment)"
            if with_alignment
            else "a pair (logits, new_state)"
        )
        got = f"{len(out)} outputs" if isinstance(out, tuple) else type(out).__name__
        raise ValueError(f"step_fn must return {expected}, got {got}")
    logits, state_out = out[:2]
    if with_alignment and (
        out[2].shape != (rows,) or not jnp.issubdtype(out[2].dtype, jnp.integer)
    ):
        raise ValueError(
            f"step_fn's alignment must be int [{rows}] source positions, got "
            f"{out[2].dtype}{list(out[2].shape)}"
        )
    if (
        not hasattr(logits, "shape")
        or len(logits.shape) != 2
        or logits.shape[0] != rows
        or not jnp.issubdtype(logits.dtype, jnp.floating)
    ):
        got = getattr(logits, "shape", type(logits).__name__)
        raise ValueError(f"step_fn must return float logits [{rows}, vocab] first, got {got}")
    if jax.tree.structure(state_out) != jax.tree.structure(state_in):
        raise ValueError(
            "step_fn must return a new state with the same pytree structure as its input state, "
            f"got {jax.tree.structure(state_out)} for {jax.tree.structure(state_in)}"
        )
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(state_in), jax.tree.leaves(state_out), strict=True
    ):
        if (x.shape, x.dtype) != (y.shape, y.dtype):
            raise ValueError(
                f"step_fn changed state{jax.tree_util.keystr(path)} from {x.dtype}{list(x.shape)} "
                f"to {y.dtype}{list(y.shape)}: the new state must keep every shape and dtype"
            )
    return logits.shape[1]


def sentence_limits(max_lengths: Any, batch_size: int, max_len: int, min_len: int = 0) -> jax.Array:
    """int32 `[batch]`: the most tokens each sentence may generate, EOS included.

    `max_lengths` (int `[batch]`, or None for `max_len` everywhere) is clipped to
    `[min_len + 1, max_len]`: a limit never exceeds the static `max_len`, nor blocks EOS for good.
    """
    if max_lengths is None:
        return jnp.full((batch_size,), max_len, jnp.int32)
    if jnp.shape(max_lengths) != (batch_size,) or not jnp.issubdtype(
        jnp.result_type(max_lengths), jnp.integer
    ):
        raise ValueError(
            f"max_lengths has shape {jnp.shape(max_lengths)} and dtype {jnp.result_type(max_lengths)}: "
            f"give one int limit per sentence, shape ({batch_size},)"
        )
    return jnp.clip(jnp.asarray(max_lengths, jnp.int32), min_len + 1, max_len)


def check_token_ids(vocab_size: int, *, pad_id: int, bos_id: int, eos_id: int) -> None:
    """Raises a one-line ValueError unless each id is an int in [0, vocab_size) and EOS differs from
    pad and BOS (BOS may be pad: Marian models start decoding from their pad token)."""
    ids = {"pad_id": pad_id, "bos_id": bos_id, "eos_id": eos_id}
    for name, value in ids.items():
        if not is_int(value):
            raise ValueError(f"{name}={value!r} must be an int token id")
        if not 0 <= value < vocab_size:
            raise ValueError(
                f"{name}={value} is outside the vocabulary: use an id in [0, {vocab_size}) "
                f"(the step function's logits have {vocab_size} entries)"
            )
    if eos_id in (pad_id, bos_id):
        raise ValueError(f"eos_id must differ from pad_id and bos_id, got {ids}")


def log_probs(logits: jax.Array) -> jax.Array:
    """The model's float32 log-probabilities `log_softmax(logits)`, same shape `[..., vocab]`."""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def search_mask(
    log_probs: jax.Array,
    *,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    block_eos: jax.Array | bool = False,
) -> jax.Array:
    """`log_probs [..., vocab]` with pad and BOS (and EOS where `block_eos`) set to -inf.

    The search never picks a -inf token. The mask is not renormalized: a hypothesis' log-probability
    stays the model's own, so it equals what `decoding.score` computes for the same tokens.
    """
    ids = jnp.arange(log_probs.shape[-1])
    banned = (ids == pad_id) | (ids == bos_id) | ((ids == eos_id) & block_eos)
    return jnp.where(banned, -jnp.inf, log_probs)


def repeat_rows(state: Any, times: int) -> Any:
    """Every leaf `[batch, ...]` repeated to `[batch * times, ...]`; row n comes from row n // times."""
    if times == 1:
        return state
    return jax.tree.map(lambda x: jnp.repeat(x, times, axis=0), state)


def argmax(x: jax.Array) -> jax.Array:
    """int32 `[...]`: the index of the largest entry of `x [..., n]`, the lowest one among ties.

    `jnp.argmax` is one reduction over (value, index) pairs, which XLA:CPU does not vectorize (about
    10x slower at `[32, 8000]`); a max, then the least index holding it, are two plain reductions.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    first = jnp.min(jnp.where(x == top, ids, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)  # a NaN row matches nothing; any index will do


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x, k)` over the last axis of `x [..., n]`, with the kernel chosen for the
    backend at trace time: XLA's own TopK on GPU and TPU (a fast native kernel there), the
    blockwise top-k on CPU, where XLA's is slow. Both are exact, ties to the lower index."""
    if jax.default_backend() == "cpu":
        return blockwise_top_k(x, k)
    return jax.lax.top_k(x, k)


def blockwise_top_k(x: jax.Array, k: int, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x, k)` over the last axis of `x [..., n]`, exactly, ties to the lower index.

    XLA:CPU's TopK scans every entry with a comparison sort network; over a beam x vocabulary row that
    dominates a beam-search step. Here the row is cut into blocks of `block` entries: one max per
    block (a plain vectorized reduction), the k blocks with the largest maxima, then `lax.top_k` over
    those k x block entries only. Exact: the block of any of the k largest entries has a maximum at
    least that large, so it is among the k best blocks (ties resolved by index, like the entries).
    """
    n = x.shape[-1]
    if n <= k * block:
        return jax.lax.top_k(x, k)
    num_blocks = -(-n // block)
    padded = jnp.pad(
        x, [(0, 0)] * (x.ndim - 1) + [(0, num_blocks * block - n)], constant_values=-jnp.inf
    )
    blocks = padded.reshape(*x.shape[:-1], num_blocks, block)
    # The k best blocks, in index order so that equal entries keep their relative (index) order.
    best_blocks = jnp.sort(jax.lax.top_k(jnp.max(blocks, axis=-1), k)[1], axis=-1)
    candidates = jnp.take_along_axis(blocks, best_blocks[..., None], axis=-2)
    values, within = jax.lax.top_k(candidates.reshape(*x.shape[:-1], k * block), k)
    block_of = jnp.take_along_axis(best_blocks, within // block, axis=-1)
    return values, block_of * block + within % block


def check_ngram_size(no_repeat_ngram_size: Any) -> None:
    """Raises a one-line ValueError unless `no_repeat_ngram_size` is 0 (off) or a positive int."""
    if not is_int(no_repeat_ngram_size) or no_repeat_ngram_size < 0:
        raise ValueError(
            f"no_repeat_ngram_size={no_repeat_ngram_size!r} must be an int >= 1 (0 turns blocking off)"
        )


def repeated_ngrams(tokens: jax.Array, step: jax.Array, n: int, vocab: int) -> jax.Array:
    """bool `[rows, vocab]`: the tokens that would complete, at position `step`, an n-gram that the
    prefix `tokens [rows, max_len]` (positions < `step` hold y_1 .. y_step) already contains.

    The (n-1) last tokens of each prefix are compared with every earlier window of n-1 tokens; the
    token that followed each match is blocked (fairseq's and CTranslate2's `no_repeat_ngram_size`).
    n = 1 blocks every token already generated. One scatter per step, inside the decoding loop.
    """
    rows, max_len = tokens.shape
    starts = max_len - n + 1  # windows tokens[s : s + n], s < starts
    if starts <= 0:
        return jnp.zeros((rows, vocab), bool)
    context = n - 1
    tail = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(step - context, 0), context, axis=1)
    s = jnp.arange(starts)
    matches = (s + context < step)[None, :]  # the window ends before the current position
    for j in range(context):
        matches = matches & (tokens[:, j : j + starts] == tail[:, j : j + 1])
    following = tokens[:, context : context + starts]  # [rows, starts]
    hits = jnp.zeros((rows, vocab), jnp.int32)
    hits = hits.at[jnp.arange(rows)[:, None], following].add(matches.astype(jnp.int32))
    return hits > 0


def check_prefix(
    prefix: Any,
    prefix_lengths: Any,
    *,
    batch_size: int,
    max_len: int,
    vocab: int,
    pad_id: int,
    bos_id: int,
    eos_id: int,
) -> tuple[jax.Array, jax.Array] | None:
    """A forced target prefix as (int32 `[batch, P]`, int32 `[batch]` lengths), or None for none.

    `prefix [batch, P]` holds each sentence's first tokens, PAD after its length; `prefix_lengths`
    (int `[batch]`, default: the tokens before the first PAD) says how many are forced. P is static
    (one compilation per P), the values traced. P must leave room for EOS (P < max_len); the forced
    tokens (checked when not traced) must be content ids of the vocabulary, never pad, BOS or EOS.
    """
    if prefix is None:
        if prefix_lengths is not None:
            raise ValueError("prefix_lengths given without a prefix: pass prefix [batch, P] too")
        return None
    shape, dtype = jnp.shape(prefix), jnp.result_type(prefix)
    if len(shape) != 2 or shape[0] != batch_size or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"prefix has shape {shape} and dtype {dtype}: give int token ids [batch={batch_size}, P]"
        )
    if shape[1] >= max_len:
        raise ValueError(
            f"a prefix of {shape[1]} tokens leaves no room under max_len={max_len}: cut it to at "
            f"most {max_len - 1} tokens or raise max_len"
        )
    if shape[1] == 0:
        return None
    prefix = jnp.asarray(prefix, jnp.int32)
    if prefix_lengths is None:  # the index of the first PAD (P when there is none)
        ends = jnp.concatenate([prefix != pad_id, jnp.zeros((batch_size, 1), bool)], axis=1)
        prefix_lengths = jnp.argmin(ends, axis=1)
    if jnp.shape(prefix_lengths) != (batch_size,):
        raise ValueError(
            f"prefix_lengths has shape {jnp.shape(prefix_lengths)}: give one length per sentence, "
            f"shape ({batch_size},)"
        )
    lengths = jnp.asarray(prefix_lengths, jnp.int32)
    if not isinstance(prefix, jax.core.Tracer) and not isinstance(lengths, jax.core.Tracer):
        values, counts = jax.device_get(prefix), jax.device_get(lengths)
        if counts.min(initial=0) < 0 or counts.max(initial=0) > shape[1]:
            raise ValueError(f"prefix_lengths must lie in [0, P={shape[1]}], got {counts.tolist()}")
        forced = values[jnp.arange(shape[1])[None, :] < counts[:, None]]
        outside = forced[(forced < 0) | (forced >= vocab)]
        if outside.size:
            raise ValueError(
                f"the prefix holds id {int(outside[0])}, outside the vocabulary [0, {vocab}): give "
                "ids the step function's logits cover"
            )
        for name, special in (("pad", pad_id), ("BOS", bos_id), ("EOS", eos_id)):
            if (forced == special).any():
                raise ValueError(
                    f"the prefix forces {name} (id {special}): a prefix holds content tokens only "
                    "(the search adds EOS itself)"
                )
    return prefix, lengths


def force_prefix(
    allowed: jax.Array, log_probs: jax.Array, step: jax.Array, prefix: tuple[jax.Array, jax.Array]
) -> jax.Array:
    """`allowed [batch, ..., vocab]` where sentence b still follows its prefix at `step`: every token
    -inf but `prefix[b, step]`, which keeps its model log-probability from `log_probs` (same shape),
    whatever else masks it (n-gram blocking, min_len). Elsewhere `allowed` unchanged."""
    tokens, lengths = prefix
    forced = jax.lax.dynamic_index_in_dim(tokens, jnp.minimum(step, tokens.shape[1] - 1), 1, False)
    expand = (slice(None),) + (None,) * (allowed.ndim - 1)
    only = jnp.where(jnp.arange(allowed.shape[-1]) == forced[expand], log_probs, -jnp.inf)
    return jnp.where((step < lengths)[expand], only, allowed)


def prefix_limits(limits: jax.Array, prefix: tuple[jax.Array, jax.Array] | None, max_len: int):
    """int32 `[batch]` sentence limits raised to at least each prefix length + 1 (room for EOS)."""
    if prefix is None:
        return limits
    return jnp.minimum(jnp.maximum(limits, prefix[1] + 1), max_len)
