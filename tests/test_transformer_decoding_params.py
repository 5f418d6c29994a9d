"""Decoding params of the Transformer (`decode_programs.decoding_params`): one float32 copy of each
weight packed in column panels, the tied table packed once and read by the lookups, on 2 MB pages;
a captioner packs its decoder only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SRC, TGT_IN, TINY_TRANSFORMER
from test_host_memory import mapping_flags
from test_transformer import (
    CAPTIONER,
    cached_beam_search,
    cached_greedy,
    packed_paths,
    target_embedding,
    tiny,
)

from experiment import decode_programs, host_memory
from models import int8, packed
from models.transformer import TIED_OUTPUT_KERNEL, Transformer

TINY = TINY_TRANSFORMER


def test_decoding_params_hold_the_tied_table_once_packed_and_decode_as_the_table_does():
    """`decode_programs.decoding_params` packs the tied table as `[d_model, vocab]` in place of
    `tgt_embed`: the output product multiplies by it, the lookups read its columns, and the
    search finds what the table gives; untied, int8 and already-prepared params are left so."""
    model, variables, _ = tiny()
    params = jax.tree.map(lambda p: 2.0 * p, variables["params"])
    prepared = decode_programs.decoding_params(model, params)
    kernel = prepared[TIED_OUTPUT_KERNEL]
    assert isinstance(kernel, packed.PackedKernel) and "tgt_embed" not in prepared
    table = np.asarray(params["tgt_embed"]["embedding"])
    np.testing.assert_array_equal(packed.unpack(kernel), table.T)
    got, want = jax.jit(cached_beam_search)(prepared, SRC), jax.jit(cached_beam_search)(params, SRC)
    np.testing.assert_array_equal(got.sequences, want.sequences)
    np.testing.assert_allclose(got.log_probs, want.log_probs, rtol=1e-5)
    # The lookups read the packed table: the same embeddings, and a change there shows in them.
    tokens, positions = SRC[:, :3], jnp.arange(3)
    embedded = target_embedding(model, {"params": prepared}, tokens, positions)
    np.testing.assert_array_equal(
        embedded, target_embedding(model, {"params": params}, tokens, positions)
    )
    zero = jax.tree.map(jnp.zeros_like, kernel)
    zeroed = {**prepared, TIED_OUTPUT_KERNEL: zero}
    assert not np.allclose(target_embedding(model, {"params": zeroed}, tokens, positions), embedded)
    # The step multiplies by it: a zero table gives zero logits.
    step_fn, state = decode_programs.step_function(model, zeroed, SRC, 4)
    logits, _ = step_fn(jnp.ones((SRC.shape[0],), jnp.int32), state)
    np.testing.assert_array_equal(logits, 0.0)
    assert set(decode_programs.decoding_params(model, prepared)) == set(prepared)
    untied = Transformer(11, 13, **TINY, tie_output=False)
    assert set(decode_programs.decoding_params(untied, params)) == set(params)
    quantized = int8.quantize_params(params, tied_output=True)
    assert set(decode_programs.decoding_params(model, quantized)) == set(quantized)


def test_a_shared_table_packed_serves_the_source_lookups_too():
    """With `share_embeddings` the encoder looks its tokens up in the one tied table, packed."""
    model = Transformer(13, 13, **TINY, share_embeddings=True)
    params = jax.jit(model.init)(jax.random.key(1), SRC, TGT_IN)["params"]
    prepared = decode_programs.decoding_params(model, params)
    assert "tgt_embed" not in prepared and "src_embed" not in prepared
    run = jax.jit(functools.partial(cached_greedy, model=model))
    got, want = run(prepared, SRC), run(params, SRC)
    np.testing.assert_array_equal(got.sequences, want.sequences)
    np.testing.assert_allclose(got.log_probs, want.log_probs, rtol=1e-5)


def nbytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def test_decoding_params_hold_one_float32_copy_of_each_weight():
    """The packed params are as large as the params themselves: no kernel kept beside its panels,
    no transposed table beside the table, no padding."""
    model, variables, _ = tiny()
    params = variables["params"]
    prepared = decode_programs.decoding_params(model, params)
    assert packed_paths(prepared) and nbytes(prepared) == nbytes(params)
    untied = Transformer(11, 13, **TINY, tie_output=False)
    params = jax.jit(untied.init)(jax.random.key(0), SRC, TGT_IN)["params"]
    assert nbytes(decode_programs.decoding_params(untied, params)) == nbytes(params)


@pytest.mark.skipif(not host_memory.huge_pages_available(), reason="needs transparent huge pages")
def test_decoding_params_are_written_straight_onto_one_mapping_of_2mb_pages():
    """The panels are written onto the pages where they stay (aliased, not copied there), beside
    the other arrays: one mapping, asking for 2 MB pages, no larger than the params in float32."""
    model, variables, _ = tiny()
    prepared = decode_programs.decoding_params(model, variables["params"])
    arrays = sorted(jax.tree.leaves(prepared), key=lambda x: x.unsafe_buffer_pointer())
    first, last = arrays[0].unsafe_buffer_pointer(), arrays[-1].unsafe_buffer_pointer()
    room = sum(-(-x.nbytes // 4096) * 4096 for x in jax.tree.leaves(variables["params"]))
    assert first % host_memory.HUGE_PAGE == 0 and last + arrays[-1].nbytes - first <= room
    panels = prepared[TIED_OUTPUT_KERNEL].panels
    assert "hg" in mapping_flags(panels.unsafe_buffer_pointer())


def test_a_captioner_packs_its_decoder_and_leaves_its_image_encoder_as_it_is():
    """Only the layers that multiply through `packed.dot_general` are packed: the captioner's
    convolutions and grid projection keep their kernels, and it encodes and decodes as before."""
    from models import registry

    model = registry.create_model(
        "captioner_transformer", src_vocab_size=1, tgt_vocab_size=13, **CAPTIONER
    )
    images = registry.example_source(model)
    tgt_in = jnp.ones((images.shape[0], 3), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), images, tgt_in)["params"]
    prepared = decode_programs.decoding_params(model, params)
    assert not model.tie_output and {"cnn", "project"} <= set(params)
    assert {path.split("/")[0] for path in packed_paths(prepared)} == {
        name for name in params if name.startswith("decoder_layers_")
    } | {"output"}
    run = jax.jit(functools.partial(cached_greedy, model=model))
    got, want = run(prepared, images), run(params, images)
    np.testing.assert_array_equal(got.sequences, want.sequences)
    np.testing.assert_allclose(got.log_probs, want.log_probs, rtol=1e-5)
