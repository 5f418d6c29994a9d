"""models/transformer.py and its layers (models/transformer_layers.py): positions, embeddings,
attention weights, KV cache and options (the common interface is checked for every model in
test_registry.py)."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SRC, SRC_MASK, TGT_IN, TINY_TRANSFORMER, overfit

import decoding
from experiment import decode_programs
from models import int8, packed
from models.transformer import TIED_OUTPUT_KERNEL, Transformer, sinusoidal_positions

TINY = TINY_TRANSFORMER
BEAM = 2


@functools.cache
def tiny():
    """(model, variables, jitted forward returning the sown intermediates) of a tiny Transformer."""
    model = Transformer(11, 13, **TINY)
    variables = jax.jit(model.init)(jax.random.key(0), SRC, TGT_IN)
    forward = jax.jit(functools.partial(model.apply, variables, mutable=["intermediates"]))
    return model, variables, forward


def param_tree(**overrides):
    model = Transformer(13, 13, **{**TINY, **overrides})
    return jax.eval_shape(model.init, jax.random.key(0), SRC, TGT_IN)["params"]


def test_positional_encoding_is_the_sin_cos_formula():
    max_len, d_model = 50, 16
    table = sinusoidal_positions(max_len, d_model)
    assert table.shape == (max_len, d_model) and table.dtype == np.float32
    for pos in range(max_len):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert table[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def target_embedding(model, variables, tokens, positions):
    """The decoder's input embedding `[batch, len, d_model]` of `tokens` at `positions`."""
    return model.apply(
        variables,
        tokens,
        positions,
        method=lambda m, t, p: m._embed(m.tgt_embed, t, p, train=False),
    )


def test_embeddings_are_scaled_by_sqrt_d_model_plus_positions():
    model, variables, _ = tiny()
    tokens, positions = jnp.array([[4, 7, 2]]), jnp.array([0, 5, 9])
    embedded = target_embedding(model, variables, tokens, positions)
    table = np.asarray(variables["params"]["tgt_embed"]["embedding"])
    expected = (
        table[[4, 7, 2]] * math.sqrt(TINY["d_model"]) + sinusoidal_positions(16, 32)[[0, 5, 9]]
    )
    np.testing.assert_allclose(embedded[0], expected, atol=1e-5)


def test_marian_options_positions_in_halves_unscaled_embeddings_and_a_logits_bias():
    # The options an imported opus-mt model needs (tests/test_pretrained.py checks them against
    # transformers itself): here each one's own definition.
    halves = sinusoidal_positions(16, 32, "halves")
    interleaved = sinusoidal_positions(16, 32)
    np.testing.assert_array_equal(halves[:, :16], interleaved[:, 0::2])  # sines first
    np.testing.assert_array_equal(halves[:, 16:], interleaved[:, 1::2])  # then cosines
    options = dict(scale_embeddings=False, position_layout="halves", final_logits_bias=True)
    model = Transformer(11, 13, **{**TINY, **options, "activation": "silu"})
    variables = jax.jit(model.init)(jax.random.key(0), SRC, TGT_IN)
    tokens, positions = jnp.array([[4, 7, 2]]), jnp.array([0, 5, 9])
    embedded = target_embedding(model, variables, tokens, positions)
    table = np.asarray(variables["params"]["tgt_embed"]["embedding"])
    np.testing.assert_allclose(embedded[0], table[[4, 7, 2]] + halves[[0, 5, 9]], atol=1e-6)
    bias = jnp.arange(13.0)  # the logits move by exactly the bias
    params = variables["params"]
    shifted = {**params, "logits_bias": params["logits_bias"] + bias}
    delta = model.apply({"params": shifted}, SRC, TGT_IN) - model.apply(variables, SRC, TGT_IN)
    np.testing.assert_allclose(delta, np.broadcast_to(bias, delta.shape), atol=1e-4)
    with pytest.raises(ValueError, match="position_layout"):
        Transformer(11, 13, **{**TINY, "position_layout": "rotary"})


def test_cross_attention_weights_per_layer_are_distributions_over_real_source_positions():
    model, _, forward = tiny()
    _, sown = forward(SRC, TGT_IN)
    for layer in range(TINY["num_decoder_layers"]):
        weights = np.asarray(sown["intermediates"][f"cross_attention_{layer}"][0])
        assert weights.shape == (4, TINY["num_heads"], 6, 6)
        assert np.all(weights >= 0)
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
        padded = np.broadcast_to(~SRC_MASK[:, None, None, :], weights.shape)
        assert np.all(weights[padded] == 0)


def test_kv_cache_is_preallocated_and_filled_in_place_with_beams_sharing_the_memory():
    model, variables, forward = tiny()
    _, sown = forward(SRC, TGT_IN)
    memory = model.apply(variables, SRC, method=model.encode)
    max_len, head_dim = 8, TINY["d_model"] // TINY["num_heads"]
    state = model.apply(variables, memory, max_len, method=model.init_decode_state)
    assert state["pos"].dtype == jnp.int32 and state["pos"].shape == (4,)
    assert state["slots"].dtype == jnp.int32 and state["slots"].shape == (4, max_len)
    assert isinstance(state["cache"], decoding.BeamShared)
    for keys, values in state["cache"].value:
        assert keys.shape == (4, TINY["num_heads"], head_dim, max_len)
        assert values.shape == (4, TINY["num_heads"], max_len, head_dim)
    # Cross-attention keys/values are computed once, per sentence, not per beam.
    for keys, values in memory["cross_kv"]:
        assert keys.shape == values.shape == (4, 6, TINY["num_heads"], head_dim)

    state = jax.tree.map(lambda x: jnp.repeat(x, BEAM, axis=0), state)
    step = jax.jit(
        functools.partial(model.apply, method=model.decode_step, mutable=["intermediates"])
    )
    for t in range(3):
        (_, state), step_sown = step(variables, memory, jnp.repeat(TGT_IN[:, t], BEAM), state)
        for layer in range(TINY["num_decoder_layers"]):
            weights = np.asarray(step_sown["intermediates"][f"cross_attention_{layer}"][0])
            assert weights.shape == (4 * BEAM, TINY["num_heads"], 6)
            expected = np.asarray(sown["intermediates"][f"cross_attention_{layer}"][0])[:, :, t]
            np.testing.assert_allclose(weights[::BEAM], expected, atol=1e-5)
            np.testing.assert_allclose(weights[1::BEAM], expected, atol=1e-5)
    np.testing.assert_array_equal(state["pos"], 3)
    # Each row wrote its own cache row and slot (a beam search reorders `slots`, not the cache).
    own_slot = np.broadcast_to(np.arange(4 * BEAM)[:, None] % BEAM, (4 * BEAM, 3))
    np.testing.assert_array_equal(state["slots"][:, :3], own_slot)
    for keys, values in state["cache"].value:
        assert np.all(np.abs(keys[..., :3]).sum(axis=(1, 2)) > 0)
        assert np.all(keys[..., 3:] == 0) and np.all(values[:, :, 3:] == 0)


BEAM_SEARCH = dict(bos_id=1, eos_id=2, batch_size=SRC.shape[0], beam_size=3, max_len=7, alpha=0.6)


def cached_beam_search(params, src):
    """The tiny Transformer's beam search over its KV cache, as train.py and eval.py run it."""
    model, _, _ = tiny()
    step_fn, state = decode_programs.step_function(model, params, src, BEAM_SEARCH["max_len"])
    return decoding.beam_search(step_fn, state, **{**BEAM_SEARCH, "batch_size": src.shape[0]})


def test_beam_search_with_the_kv_cache_matches_recomputing_every_prefix():
    """The beam-shared cache, read through `slots` while the search reorders hypotheses, gives the
    search exactly what the teacher-forced model gives for each hypothesis' whole prefix."""
    model, variables, _ = tiny()
    # Sharper than at init, so that hypotheses differ from the first tokens on and beams reorder.
    params = jax.tree.map(lambda p: 2.0 * p, variables["params"])
    batch, max_len = BEAM_SEARCH["batch_size"], BEAM_SEARCH["max_len"]

    @jax.jit
    def recomputed():
        def step_fn(tokens, state):
            t = state["t"][0]
            prefix = state["prefix"].at[:, t].set(tokens)
            logits = model.apply({"params": params}, state["src"], prefix)[:, t]
            return logits, {**state, "prefix": prefix, "t": state["t"] + 1}

        zeros = jnp.zeros((batch,), jnp.int32)
        state = {"src": SRC, "prefix": jnp.zeros((batch, max_len), jnp.int32), "t": zeros}
        return decoding.beam_search(step_fn, state, **BEAM_SEARCH)

    got, want = jax.jit(cached_beam_search)(params, SRC), recomputed()
    np.testing.assert_array_equal(got.sequences, want.sequences)
    np.testing.assert_allclose(got.log_probs, want.log_probs, rtol=1e-4)
    prefixes = {tuple(row[:3]) for row in np.asarray(got.sequences).reshape(-1, max_len)}
    assert len(prefixes) > batch + BEAM_SEARCH["beam_size"], (
        "the test needs hypotheses that part early"
    )


CAPTIONER = dict(
    num_stages=1, channels=8, d_model=32, num_heads=4, num_decoder_layers=1, ffn_dim=64
)


GREEDY = dict(bos_id=1, eos_id=2, max_len=7)


def cached_greedy(params, src, model=None):
    """The tiny Transformer's (or `model`'s) greedy search over its KV cache."""
    model = model or tiny()[0]
    step_fn, state = decode_programs.step_function(model, params, src, GREEDY["max_len"])
    return decoding.greedy(step_fn, state, batch_size=src.shape[0], **GREEDY)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_row_reads_its_cache_before_writing_it_and_decodes_as_many_rows_do(dtype):
    """At one row the cache is read, then written (`kv_cache.read_then_write`); each sentence decodes
    alone as it does in a batch of four, where the cache is written, then read."""
    _, variables, _ = tiny()
    model = Transformer(11, 13, **TINY, dtype=dtype)
    params = jax.tree.map(lambda p: 2.0 * p, variables["params"])
    run = jax.jit(functools.partial(cached_greedy, model=model))
    batched = run(params, SRC)
    for i in range(SRC.shape[0]):
        alone = run(params, SRC[i : i + 1])
        np.testing.assert_array_equal(alone.sequences[0], batched.sequences[i])
        np.testing.assert_allclose(alone.log_probs[0], batched.log_probs[i], rtol=1e-5)


def packed_paths(params) -> set:
    """The params paths ("decoder_layers_0/ffn/inner", ...) whose kernel is a `PackedKernel`."""
    leaves = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, packed.PackedKernel)
    )
    return {
        "/".join(str(k.key) for k in path).removesuffix("/kernel")
        for path, leaf in leaves
        if isinstance(leaf, packed.PackedKernel)
    }


def test_decoding_steps_multiply_by_the_packed_kernels_and_decode_as_before():
    """`decode_programs.decoding_params` packs every dense kernel of a float32 Transformer and the tied
    table's copy; greedy and beam search at batch 1 and 4 find what the kernels as they lie give;
    steps read the panels (zeroed panels change one row's logits); int8 and bfloat16 params are not
    packed."""
    model, variables, _ = tiny()
    params = jax.tree.map(lambda p: 2.0 * p, variables["params"])
    prepared = decode_programs.decoding_params(model, params)
    kernels = {
        "/".join(str(k.key) for k in path[:-1])
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key == "kernel"
    }
    assert len(kernels) > 20 and packed_paths(prepared) == kernels | {TIED_OUTPUT_KERNEL}
    layers = [name for name in params if name.startswith("decoder_layers_")]
    for search in (cached_greedy, cached_beam_search):
        run = jax.jit(search)
        for src in (SRC[:1], SRC):
            got, want = run(prepared, src), run(params, src)
            np.testing.assert_array_equal(got.sequences, want.sequences)
            np.testing.assert_allclose(got.log_probs, want.log_probs, rtol=1e-5)

    def first_logits(p):
        step_fn, state = decode_programs.step_function(model, p, SRC[:1], 4)
        return np.asarray(step_fn(jnp.ones((1,), jnp.int32), state)[0])

    inner = prepared[layers[0]]["ffn"]["inner"]
    zeroed = {
        **inner,
        "kernel": inner["kernel"].replace(panels=jnp.zeros_like(inner["kernel"].panels)),
    }
    ffn = {**prepared[layers[0]]["ffn"], "inner": zeroed}
    changed = {**prepared, layers[0]: {**prepared[layers[0]], "ffn": ffn}}
    assert not np.allclose(first_logits(changed), first_logits(prepared))
    quantized = decode_programs.decoding_params(
        model, int8.quantize_params(params, tied_output=True)
    )
    assert packed_paths(quantized) == set()
    half = Transformer(11, 13, **TINY, dtype=jnp.bfloat16)
    assert packed_paths(decode_programs.decoding_params(half, params)) == set()


@pytest.mark.parametrize("search, src", [("beam", SRC), ("greedy", SRC), ("greedy", SRC[:1])])
def test_the_decoding_loop_updates_the_kv_cache_in_place(search, src):
    """No cache-sized copy inside the compiled decoding loop (with the cache reordered between
    beams, read before it is written, or at one row written before it is read, XLA copied every
    layer's cache at every step)."""
    model, variables, _ = tiny()
    params = variables["params"]
    state = jax.eval_shape(
        lambda p: decode_programs.step_function(model, p, src, BEAM_SEARCH["max_len"])[1], params
    )
    rows = src.shape[0] * (BEAM_SEARCH["beam_size"] if search == "beam" else 1)
    cache_shapes = {
        f"f32[{','.join(str(n) for n in (rows, *x.shape[1:]))}]"
        for x in jax.tree.leaves(state["cache"].value)
    }
    run = cached_beam_search if search == "beam" else cached_greedy
    hlo = jax.jit(run).lower(params, src).compile().as_text()
    bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
    assert bodies, "no while loop found in the compiled search"
    for body in bodies:
        text = re.search(rf"^%?{re.escape(body)} .*?^}}", hlo, re.S | re.M).group(0)
        copied = set(re.findall(r"= (f32\[[\d,]+\])\S* copy\(", text))
        assert not copied & cache_shapes, (
            f"the loop copies cache-sized arrays {copied & cache_shapes}"
        )


def test_output_and_embedding_sharing_options_change_the_parameters():
    tied = param_tree()
    assert "output" not in tied and "src_embed" in tied and "tgt_embed" in tied
    assert "output" in param_tree(tie_output=False)
    assert "src_embed" not in param_tree(share_embeddings=True)


def test_pre_ln_adds_a_final_norm_per_stack_post_ln_does_not():
    assert {"encoder_norm", "decoder_norm"} <= set(param_tree(pre_ln=True))
    assert not {"encoder_norm", "decoder_norm"} & set(param_tree(pre_ln=False))


def test_pre_ln_and_post_ln_compute_different_functions_of_the_same_parameters():
    model, variables, forward = tiny()
    post_ln = Transformer(11, 13, **{**TINY, "pre_ln": False})
    params = {k: v for k, v in variables["params"].items() if not k.endswith("_norm")}
    logits_post = jax.jit(post_ln.apply)({"params": params}, SRC, TGT_IN)
    assert not np.allclose(logits_post, forward(SRC, TGT_IN)[0], atol=1e-3)


@pytest.mark.parametrize(
    "src, tgt_in, message",
    [
        (jnp.ones((1, 17), jnp.int32), TGT_IN[:1], "source length 17"),
        (SRC[:1], jnp.ones((1, 17), jnp.int32), "target length 17"),
    ],
)
def test_sequences_longer_than_max_len_raise(src, tgt_in, message):
    model, variables, _ = tiny()
    with pytest.raises(
        ValueError, match=f"{message} exceeds max_positions=16: raise the model.s max_positions"
    ):
        jax.eval_shape(model.apply, variables, src, tgt_in)


def test_decoding_longer_than_max_len_raises():
    model, variables, _ = tiny()
    memory = jax.eval_shape(functools.partial(model.apply, method=model.encode), variables, SRC)
    with pytest.raises(ValueError, match="decode length 17 exceeds max_positions=16"):
        model.apply(variables, memory, 17, method=model.init_decode_state)


def test_decode_step_rejects_rows_that_are_not_sentences_times_beams():
    model, variables, _ = tiny()
    memory = jax.eval_shape(functools.partial(model.apply, method=model.encode), variables, SRC)
    state = model.apply(variables, memory, 4, method=model.init_decode_state)
    state = jax.tree.map(lambda x: x[:3], state)
    with pytest.raises(ValueError, match="decode_step got 3 rows for a memory of 4 sentences"):
        jax.eval_shape(
            functools.partial(model.apply, method=model.decode_step),
            variables,
            memory,
            jnp.ones((3,), jnp.int32),
            state,
        )


def test_overfits_four_examples():
    model, variables, _ = tiny()
    _, losses = overfit(model, variables["params"], learning_rate=3e-3)
    assert losses[-1] < 0.05


def test_fused_attention_kernel_computes_the_einsum_path(monkeypatch, pre_ln=False):
    # On GPU in bfloat16 teacher-forced attention is jax.nn.dot_product_attention (cuDNN); elsewhere
    # the einsum path. Forced here, the fused entry point (XLA's kernel, which CPUs have) gives the
    # same logits and gradients. The choice itself: cuDNN on GPU for half precision only.
    from models import common

    model = Transformer(11, 13, **{**TINY, "pre_ln": pre_ln, "dropout_rate": 0.1})
    variables = jax.jit(model.init)(jax.random.key(0), SRC, TGT_IN)

    def loss(params, rng, model=model):
        logits = model.apply({"params": params}, SRC, TGT_IN, train=True, rngs={"dropout": rng})
        return jnp.sum(logits * jnp.sin(jnp.arange(13.0)))

    def run():  # a new function, so traced anew: the kernel is chosen at trace time
        def both(params):
            logits = model.apply({"params": params}, SRC, TGT_IN, train=False)
            return logits, jax.grad(loss)(params, jax.random.key(1))

        return jax.jit(both)(variables["params"])

    calls = []
    fused_kernel = jax.nn.dot_product_attention
    monkeypatch.setattr(
        jax.nn, "dot_product_attention", lambda *a, **k: calls.append(1) or fused_kernel(*a, **k)
    )
    monkeypatch.setattr(common, "fused_attention", lambda dtype, head_dim: None)
    einsum_logits, einsum_grads = run()
    assert not calls
    monkeypatch.setattr(common, "fused_attention", lambda dtype, head_dim: "xla")
    fused_logits, fused_grads = run()
    assert len(calls) == 2 * 6  # forward and training: 2 encoder + 2 x 2 decoder attentions each
    real = TGT_IN != 0
    np.testing.assert_allclose(fused_logits[real], einsum_logits[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(einsum_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # Attention weights asked for (sown) or dropped out: the einsum path, whatever the backend.
    calls.clear()
    model.apply(variables, SRC, TGT_IN, train=False, mutable=["intermediates"])
    dropping = Transformer(11, 13, **{**TINY, "pre_ln": pre_ln, "attention_dropout_rate": 0.1})
    jax.grad(loss)(variables["params"], jax.random.key(1), dropping)
    assert not calls
    monkeypatch.undo()
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert common.fused_attention(jnp.bfloat16, 64) is None  # cuDNN only on GPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert common.fused_attention(jnp.bfloat16, 64) == "cudnn"
    assert common.fused_attention(jnp.float32, 64) is None  # XLA's kernel = the einsum path
    assert common.fused_attention(jnp.bfloat16, 12) is None  # head_dim cuDNN cannot take
