"""A run's jitted decoding and scoring programs, one way for every caller.

train.py's validation, eval.py, the benchmarks and the tests decode and score through these, so they
compile and compute the same thing: `decoding_params` (the params as decoding reads them fastest),
`step_function` (a model as `decoding/` reads it: a step function and its state), `decode_fn` (a
`decoding.DecodeSettings`, whole, as a jitted program) and `score_fn` (teacher-forced scoring under
the same length normalization). The model, its params and the loss are `experiment.programs`'.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import decoding
import sharding
from decoding import DecodeSettings
from experiment import RunError, host_memory
from experiment.programs import special_ids
from models import registry, transformer


def decoding_params(model, params):
    """`params` as decoding reads them fastest, one copy of each weight: a float32 Transformer (or
    captioner) on the CPU gets its dense kernels and its tied table laid out in column panels in
    place of the kernels as they lie (`transformer.with_decoding_kernels`, `models.packed`), and
    on the CPU every array moves onto 2 MB pages (`host_memory.on_huge_pages`), the panels written
    there directly. Memory the allocator kept after frees goes back to the system first
    (`host_memory.return_freed_memory`). Decode and score (`score_fn` runs the decoding step) with
    these; train and save the params themselves."""
    host_memory.return_freed_memory()
    if not isinstance(model, transformer.TransformerDecoder):
        return host_memory.on_huge_pages(params)
    # Room for every weight as float32 (what is packed is): the panels are written straight onto
    # the pages, one array at a time, so the process never holds a packed copy beside its place.
    pages = host_memory.HugePages.fitting(jax.tree.leaves(params), jnp.float32)
    prepared = transformer.with_decoding_kernels(model, params, pages.empty if pages else np.empty)
    return host_memory.on_huge_pages(prepared, pages)


def step_function(model, params, src: jax.Array, max_decode_len: int, alignment_layer=None):
    """`(step_fn, init_state)` for `decoding/`: the source encoded once, the decoder state for it.

    `step_fn(tokens [N], state) -> (logits [N, vocab], state)` closes over the encoder memory, which
    keeps the sentence batch of `src [batch, src_len]`; `init_state` leaves have `batch` first.
    With an `alignment_layer` (an int, Python indexing over the decoder's cross-attention layers;
    -1 the last) it returns a third output, int32 `[N]`: the source position with the most
    attention (averaged over heads) when predicting the token (`decoding`'s `with_alignment`).
    """
    variables = {"params": params}
    memory = model.apply(variables, src, method=model.encode)
    state = model.apply(variables, memory, max_decode_len, method=model.init_decode_state)

    def step_fn(tokens, state):
        return model.apply(variables, memory, tokens, state, method=model.decode_step)

    def aligned_step_fn(tokens, state):
        (logits, state), sown = model.apply(
            variables, memory, tokens, state, method=model.decode_step, mutable=["intermediates"]
        )
        weights = cross_attention(sown.get("intermediates", {}), alignment_layer, model)
        return logits, state, jnp.argmax(weights, axis=-1).astype(jnp.int32)

    return (step_fn if alignment_layer is None else aligned_step_fn), state


def cross_attention(intermediates, layer: int, model) -> jax.Array:
    """float `[N, src_len]`: decoder cross-attention layer `layer` of a decode step's sown
    `intermediates` (`cross_attention_<i>` `[N, heads, src_len]`, averaged over heads, or an RNN's
    single `attention` `[N, src_len]`); a `RunError` when the model has none or no such layer."""
    found = {}
    for path, value in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        names = [str(getattr(k, "key", "")) for k in path]
        name = next((n for n in reversed(names) if "attention" in n), "")
        if name.startswith("cross_attention_"):
            found[int(name.rsplit("_", 1)[1])] = jnp.mean(value.astype(jnp.float32), axis=1)
        elif name == "attention":
            found[0] = value.astype(jnp.float32)
    if not found:
        raise RunError(
            f"{type(model).__name__} has no attention over the source: token alignments need an "
            "attention model (attention_rnn, transformer, a captioner)"
        )
    layers = [found[i] for i in sorted(found)]
    if not -len(layers) <= layer < len(layers):
        raise RunError(
            f"alignment layer {layer} does not exist: {type(model).__name__} has "
            f"{len(layers)} cross-attention layer(s), use 0 .. {len(layers) - 1} or -1 (the last)"
        )
    return layers[layer]


def has_attention(model, params) -> bool:
    """Whether `model` exposes source attention per decode step (`decode_fn`'s alignments)."""
    src = registry.example_source(model)

    def probe(params):
        step_fn, state = step_function(model, params, src, 4, alignment_layer=-1)
        return step_fn(jnp.full((src.shape[0],), special_ids(model).bos, jnp.int32), state)

    try:
        jax.eval_shape(probe, params)
    except RunError:
        return False
    return True


def decode_fn(model, settings: DecodeSettings, mesh: Mesh | None = None):
    """`settings` as a jitted `(params, src [batch, src_len], alpha, prefix=None, sampling=None) ->
    decoding result` (greedy and sampling: `decoding.DecodeResult`; beam:
    `decoding.BeamSearchResult`); a one-line ValueError for settings that `settings.check()`
    refuses.

    alpha: the length-penalty exponent, `settings.alpha` (traced: no recompiles; beam search only).
    prefix: optional int `[batch, P]` forced target prefixes, PAD after each (`decoding`'s `prefix`;
      traced, one compilation per P).
    sampling: with `decode="sample"`, `settings.sampling(draw, example_ids)`: a dict of `rng` (a
      key), `temperature`, `top_k`, `top_p` (traced scalars) and `example_ids` int `[batch]`
      (`decoding.sample`).

    Each sentence generates at most `max_decode_len` tokens (EOS included) or, with
    `max_decode_len_a > 0` and text sources, `min(max_decode_len, ceil(max_decode_len_a * source
    tokens) + max_decode_len_b)` (`settings.source_limits`): a batch of short sentences then stops
    early instead of running the search to `max_decode_len`. With an `alignment_layer` (see
    `step_function`) results carry `alignments`, the source position each token attends to most.

    One compiled program per (src shape, `settings.static()`, mesh), cached here so train and eval
    share them. With a `mesh`, the batch is split over its devices (pass `src` from
    `sharding.shard_batch`), the params are replicated (gathered once per call if they come
    FSDP-sharded) and so is the result, which every host can then read.
    """
    return _decode_program(model, settings.check().static(), mesh)


@functools.cache
def _decode_program(model, settings: DecodeSettings, mesh: Mesh | None):
    def run(params, src, alpha, prefix=None, sampling=None):
        if mesh is not None:
            params, src = replicate_params_shard_batch(mesh, params, src)
            if prefix is not None:
                prefix = jax.lax.with_sharding_constraint(prefix, sharding.batch_sharding(mesh))
        step_fn, state = step_function(
            model, params, src, settings.max_decode_len, settings.alignment_layer
        )
        ids = special_ids(model)
        common = dict(
            bos_id=ids.bos,
            eos_id=ids.eos,
            pad_id=ids.pad,
            batch_size=src.shape[0],
            max_len=settings.max_decode_len,
            max_lengths=settings.source_limits(src, ids.pad),
            no_repeat_ngram_size=settings.no_repeat_ngram_size or 0,
            prefix=prefix,
            with_alignment=settings.alignment_layer is not None,
        )
        if settings.decode == "greedy":
            return decoding.greedy(step_fn, state, **common)
        if settings.decode == "sample":
            if sampling is None:
                raise RunError(
                    "decode='sample' needs sampling={rng, temperature, top_k, top_p, example_ids}"
                )
            return decoding.sample(step_fn, state, **sampling, **common)
        return decoding.beam_search(
            step_fn,
            state,
            beam_size=settings.beam_size,
            alpha=alpha,
            length_penalty=settings.length_penalty,
            beam_policy=settings.beam_policy,
            stopping=settings.beam_stopping,
            **common,
        )

    return _jit_on(mesh, run)


@functools.cache
def score_fn(model, length_penalty: str, mesh: Mesh | None = None):
    """A jitted teacher-forced scoring `(params, src [batch, src_len], targets [batch, T], alpha) ->
    decoding.ScoreResult` of `targets` (y_1 .. y_T with EOS, pad-padded) under the same length
    normalization as beam search; with a `mesh`, the batch split over it, the params replicated."""

    def run(params, src, targets, alpha):
        if mesh is not None:
            params, src, targets = replicate_params_shard_batch(mesh, params, src, targets)
        step_fn, state = step_function(model, params, src, targets.shape[1])
        return decoding.score(
            step_fn,
            state,
            targets,
            bos_id=special_ids(model).bos,
            eos_id=special_ids(model).eos,
            pad_id=special_ids(model).pad,
            alpha=alpha,
            length_penalty=length_penalty,
        )

    return _jit_on(mesh, run)


def _jit_on(mesh: Mesh | None, run):
    """`run` jitted; with a `mesh`, its result replicated (every host can read it)."""
    if mesh is None:
        return jax.jit(run)
    return jax.jit(run, out_shardings=sharding.replicated(mesh))


def replicate_params_shard_batch(mesh: Mesh, params, *batch_arrays):
    """Inside jit: `params` replicated over `mesh`, each array's batch dimension split over it."""
    params = jax.lax.with_sharding_constraint(params, sharding.replicated(mesh))
    batch = [
        jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh)) for x in batch_arrays
    ]
    return params, *batch


def best_sequences(result) -> np.ndarray:
    """`[batch, max_decode_len]` int token ids of the best hypothesis (greedy or beam result)."""
    sequences = np.asarray(result.sequences)
    return sequences[:, 0] if sequences.ndim == 3 else sequences
