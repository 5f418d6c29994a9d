"""Length normalization: the score that ranks hypotheses is `log P(y|x) / penalty(T)`.

`T` is the number of generated tokens counting the EOS token (y_1 .. y_T with y_T = EOS, the course's
T_y), or `max_len` for a hypothesis that reached `max_len` without EOS. Beam search, the returned scores,
`score` and the error analysis all use this same `T`.

Kinds (`alpha` is a traced scalar, so changing it never recompiles):
- "none": no normalization (`penalty = 1`), the plain log-probability;
- "average": `T ** alpha`, the course's form (alpha = 1 is the mean log-probability per token);
- "gnmt": `((5 + T) / 6) ** alpha` (Wu et al., 2016, "Google's Neural Machine Translation System").
`alpha = 0` makes every kind equal to "none".
"""

import jax
import jax.numpy as jnp

KINDS = ("none", "average", "gnmt")


def check_kind(kind: str) -> None:
    """Raises a one-line ValueError unless `kind` is one of `KINDS`."""
    if kind not in KINDS:
        raise ValueError(f"length_penalty={kind!r} is not supported: use one of {', '.join(KINDS)}")


def penalty(lengths: jax.Array, alpha: jax.Array, kind: str) -> jax.Array:
    """The divisor for hypotheses of `lengths` tokens (any shape, int); float32, same shape, > 0.

    Lengths below 1 count as 1, so an empty (invalid) slot never divides by zero.
    """
    lengths = jnp.maximum(jnp.asarray(lengths), 1).astype(jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    if kind == "none":
        return jnp.ones_like(lengths)
    if kind == "average":
        return lengths**alpha
    if kind == "gnmt":
        return ((5.0 + lengths) / 6.0) ** alpha
    check_kind(kind)
    raise AssertionError("unreachable")


def normalize(log_probs: jax.Array, lengths: jax.Array, alpha: jax.Array, kind: str) -> jax.Array:
    """`log_probs / penalty(lengths)`: float32, the shape of `log_probs` (-inf stays -inf)."""
    return log_probs / penalty(lengths, alpha, kind)
