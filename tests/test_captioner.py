"""models/captioner.py: shapes, overfitting a tiny batch, decoding through the shared interface, errors,
and a tiny digit_captions run through train.py and eval.py (attention PNGs over the image).

The interface contract (decode_step equals teacher forcing over beams, batch-first state, dropout,
bfloat16) is checked with every other model in tests/test_registry.py.
"""

import functools
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import overfit as train_on

import eval as eval_script
from configs import tiny_digits_captioner
from data import batching, digit_captions, tokenizers
from data.examples import ImageCaptions
from decoding import DecodeSettings
from experiment import RunError, decode_programs, metrics, programs, training
from models import registry
from models.captioner import RNNCaptioner

ENCODER = {"channels": 8, "d_model": 32}
TINY = {
    "rnn": {**ENCODER, "embed_dim": 16, "hidden_dim": 32, "attention_dim": 16},
    "transformer": {
        **ENCODER,
        "num_heads": 2,
        "num_decoder_layers": 1,
        "ffn_dim": 64,
        "max_positions": 64,
    },
}


def build(vocab: int, decoder: str = "rnn", **overrides):
    return registry.create_model(
        f"captioner_{decoder}",
        src_vocab_size=vocab,
        tgt_vocab_size=vocab,
        **{**TINY[decoder], **overrides},
    )


@pytest.fixture(scope="module")
def tiny_batch():
    """8 real digit_captions training examples as one batch, and their char tokenizer."""
    examples = digit_captions.generate({"train": 8})["train"]
    captions = [ex["caption"] for ex in examples]
    tokenizer = tokenizers.CharTokenizer.train(captions)
    data = ImageCaptions.from_lists(
        np.stack([ex["image"] for ex in examples]), [tokenizer.encode(c) for c in captions]
    )
    batch = batching.make_batch(data, np.arange(8), 0, 48)
    return batch, captions, tokenizer


def shapes(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@pytest.mark.parametrize("decoder", ["rnn", "transformer"])
def test_shapes_and_attention_over_the_grid(decoder):
    """Shapes only (`jax.eval_shape`: nothing compiled); values are checked by the other tests and
    by the interface contract in tests/test_registry.py."""
    model = build(20, decoder)
    images = jax.ShapeDtypeStruct((3, 20, 28, 1), jnp.float32)  # 20x28 -> a 5x7 grid
    tgt_in = jax.ShapeDtypeStruct((3, 4), jnp.int32)
    params = jax.eval_shape(programs.init_params_from_seed, model, 0)
    variables = {"params": params}
    logits, state = jax.eval_shape(
        functools.partial(model.apply, mutable=["intermediates"]), variables, images, tgt_in
    )
    assert shapes(logits) == ((3, 4, 20), jnp.float32)
    assert model.grid_shape(20, 28) == (5, 7)
    memory = jax.eval_shape(functools.partial(model.apply, method=model.encode), variables, images)
    grid = 5 * 7
    if decoder == "rnn":
        assert memory["annotations"].shape == (3, grid, 32)
        assert shapes(memory["mask"]) == ((3, grid), jnp.bool_)
        assert shapes(state["intermediates"]) == {"attention": (((3, 4, grid), jnp.float32),)}
    else:
        assert memory["cross_kv"][0][0].shape == (3, grid, 2, 16)
        assert memory["mask"].shape == (3, 1, 1, grid)
        assert shapes(state["intermediates"]) == {
            "cross_attention_0": (((3, 2, 4, grid), jnp.float32),)
        }


def test_grid_features_know_where_they_are():
    """Moving a digit one grid cell (4 pixels) to the right moves the CNN's features exactly one cell
    (convolutions are translation-equivariant), but the memory the decoder attends over changes:
    its position code says where each feature is, which "left of" and "above" need."""
    model = build(20)
    # Random weights (no compilation, unlike init) and zero biases, as init has them: the blank
    # background then gives the same features as the convolutions' zero padding.
    shapes = jax.eval_shape(programs.init_params_from_seed, model, 0)
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            np.zeros(x.shape, np.float32)
            if path[-1].key == "bias"
            else 0.3 * rng.standard_normal(x.shape, np.float32)
        ),
        shapes,
    )
    digit = np.random.default_rng(0).uniform(size=(6, 6)).astype(np.float32)
    here, there = np.zeros((2, 1, 32, 32, 1), np.float32)
    here[0, 12:18, 8:14, 0] = digit
    there[0, 12:18, 12:18, 0] = digit
    cnn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.cnn(x)))
    np.testing.assert_allclose(
        cnn(params, there)[:, :, 1:], cnn(params, here)[:, :, :-1], atol=1e-6
    )
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    memory_here, memory_there = (
        np.asarray(encode(params, x)["annotations"]).reshape(1, 8, 8, -1) for x in (here, there)
    )
    moved = np.abs(memory_there[:, :, 1:] - memory_here[:, :, :-1]).max(axis=-1)
    assert moved.min() > 1e-2  # float noise is ~1e-6


class Overfit(NamedTuple):
    model: RNNCaptioner
    initial: dict  # params from seed 0
    params: dict  # after training
    losses: list[float]


@pytest.fixture(scope="module")
def overfit(tiny_batch) -> Overfit:
    """The rnn captioner trained from seed 0 on the 8-example batch until it knows it."""
    batch, _, tokenizer = tiny_batch
    model = build(tokenizer.vocab_size, d_model=64, hidden_dim=64, dropout_rate=0.0)
    initial = programs.init_params_from_seed(model, 0)
    params, losses = train_on(model, initial, batch, steps=150)
    return Overfit(model, initial, params, losses)


def test_init_is_determined_by_the_seed(overfit):
    again, other = (programs.init_params_from_seed(overfit.model, s) for s in (0, 1))
    leaves = jax.tree.leaves(overfit.initial)
    assert all(np.array_equal(x, y) for x, y in zip(leaves, jax.tree.leaves(again), strict=True))
    assert not any(
        np.allclose(x, y) and np.std(x) > 0 for x, y in zip(leaves, jax.tree.leaves(other))
    )


def test_overfits_a_tiny_batch(overfit, tiny_batch):
    model, _, params, losses = overfit
    batch, captions, tokenizer = tiny_batch
    assert losses[0] > 2.0 and losses[-1] < 0.01, losses[::25]
    greedy = DecodeSettings(decode="greedy", length_penalty="none", max_decode_len=48)
    result = decode_programs.decode_fn(model, greedy)(params, batch["src"], 0.0)
    assert [tokenizer.decode(row) for row in decode_programs.best_sequences(result)] == captions


def test_beam_search_through_the_shared_interface(overfit, tiny_batch):
    """`decode_programs.decode_fn` (decoding.beam_search over its step_function, i.e. the model's
    encode / init_decode_state / decode_step) returns the captions, with the scores decoding.score
    gives them; images of a batch do not leak into each other's beams."""
    model, _, params, _ = overfit
    batch, captions, tokenizer = tiny_batch
    src = jnp.asarray(batch["src"])
    settings = DecodeSettings(beam_size=3, length_penalty="none", max_decode_len=48)
    beam = decode_programs.decode_fn(model, settings)
    result = beam(params, src, 0.0)
    best = decode_programs.best_sequences(result)
    assert [tokenizer.decode(row) for row in best] == captions

    score = decode_programs.score_fn(model, "none")
    scored = score(params, src, jnp.asarray(best), 0.0)
    np.testing.assert_allclose(scored.scores, np.asarray(result.scores)[:, 0], atol=1e-4)
    # The same images in another order give the same captions in that order.
    order = np.array([3, 1, 7, 0, 5, 2, 6, 4])
    again = decode_programs.best_sequences(beam(params, src[order], 0.0))
    assert [tokenizer.decode(r) for r in again] == [captions[i] for i in order]


@pytest.mark.parametrize(
    "src, message",
    [
        (
            jnp.ones((2, 5), jnp.int32),
            "captioner reads float images [batch, height, width, 1], got int32 [2, 5]",
        ),
        (jnp.ones((2, 8, 8, 3)), "got float32 [2, 8, 8, 3]"),
    ],
)
def test_a_source_that_is_not_an_image_is_refused_in_one_line(src, message):
    model = build(10)
    with pytest.raises(ValueError) as error:
        jax.eval_shape(model.init, jax.random.key(0), src, jnp.ones((2, 3), jnp.int32))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_transformer_refuses_captions_longer_than_max_positions():
    model = build(10, "transformer", max_positions=8)
    with pytest.raises(ValueError, match="target length 9 exceeds max_positions=8"):
        jax.eval_shape(
            model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.ones((1, 9), jnp.int32)
        )


# ------------------------------------------------------------------------ train.py and eval.py


@pytest.fixture(scope="module")
def tiny_captioner_run(tmp_path_factory):
    """configs/tiny_digits_captioner.py trained for 20 steps: (workdir, last metrics)."""
    root = tmp_path_factory.mktemp("tiny_captioner")
    config = tiny_digits_captioner.get_config()
    config.data_dir = str(root / "tfds")
    config.tokenizer_dir = str(root / "tokenizers")
    workdir = root / "run"
    state, last = training.train_and_evaluate(config, workdir)
    assert int(state.step) == 20
    return workdir, last


def test_train_and_eval_run_unchanged_on_images(tiny_captioner_run, tmp_path):
    workdir, last = tiny_captioner_run
    assert {"loss", "bleu", "exact_match"} <= set(last)
    records = metrics.read_metrics(workdir)
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert train_losses[-1] < train_losses[0]
    # Greedy as in validation: eval.py reuses the decoder train.py compiled (beam is tested above).
    report = eval_script.evaluate(
        workdir,
        eval_script.Options(
            split="test",
            decoding={"decode": "greedy"},
            num_examples=24,
            plot_attention=2,
            report=str(tmp_path / "report.json"),
            output=str(tmp_path / "hyps.txt"),
        ),
    )
    assert report["num_examples"] == 24 and report["decode"] == "greedy"
    assert 0.0 <= report["exact_match"] <= 1.0 and report["bleu"] >= 0.0
    assert (
        json.loads((tmp_path / "report.json").read_text())["exact_match"] == report["exact_match"]
    )
    assert len((tmp_path / "hyps.txt").read_text().splitlines()) == 24
    paths = [p for p in map(str, report["attention_plots"])]
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    import matplotlib.image

    picture = matplotlib.image.imread(paths[0])
    assert picture.shape[0] > 100 and picture.shape[1] > picture.shape[0]  # a row of panels
    with pytest.raises(RunError, match="reads images: evaluate a split instead"):
        eval_script.evaluate(workdir, eval_script.Options(input="-"))
