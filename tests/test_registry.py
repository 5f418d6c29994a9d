"""models/registry.py, and the common interface every registered model honours (docs/design.md).

The contract tests run over every model in `registry.MODELS` (a new model without a tiny configuration
here fails `test_every_model_has_contract_coverage`), with variants for the main options. Each variant
compiles its functions once (module-scoped fixture) and reuses them across tests. Models that read
images (the captioner) get a batch of images as their source instead of token ids.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data import tokenizers
from decoding import DecodeSettings
from experiment import decode_programs
from models import registry
from models.attention_rnn import AttentionRNN
from models.captioner import RNNCaptioner, TransformerCaptioner
from models.seq2seq_rnn import Seq2SeqRNN
from models.transformer import Transformer

SRC_VOCAB, TGT_VOCAB = 11, 13
TINY = {
    "seq2seq_rnn": {"embed_dim": 8, "hidden_dim": 16, "num_layers": 2},
    "attention_rnn": {"embed_dim": 8, "hidden_dim": 16, "num_layers": 2, "attention_dim": 8},
    "transformer": {
        "d_model": 16,
        "num_heads": 2,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "ffn_dim": 32,
        "max_positions": 32,
    },
    "captioner_rnn": {
        "channels": 4,
        "d_model": 8,
        "embed_dim": 8,
        "hidden_dim": 16,
        "attention_dim": 8,
    },
    "captioner_transformer": {
        "channels": 4,
        "d_model": 8,
        "num_heads": 2,
        "num_decoder_layers": 2,
        "ffn_dim": 16,
        "max_positions": 32,
    },
}
VARIANTS = [
    ("seq2seq_rnn", {}),
    ("seq2seq_rnn", {"cell": "lstm"}),
    ("attention_rnn", {}),
    ("attention_rnn", {"cell": "lstm", "attention": "luong_dot"}),
    ("attention_rnn", {"attention": "luong_general"}),
    ("transformer", {}),
    ("transformer", {"pre_ln": False, "tie_output": False, "activation": "gelu"}),
    ("transformer", {"share_embeddings": True}),
    ("captioner_rnn", {}),
    ("captioner_transformer", {}),
    ("captioner_transformer", {"pre_ln": False}),
    ("captioner_rnn", {"cell": "lstm", "num_layers": 2, "attention": "luong_general"}),
]

# Two sentences, trailing padding; the second target is padded too.
SRC = jnp.array([[5, 6, 7, 8, 9, 0], [4, 10, 3, 0, 0, 0]], jnp.int32)
SRC_EXTRA_PAD = jnp.pad(SRC, ((0, 0), (0, 3)))
TGT_IN = jnp.array([[1, 4, 5, 6, 7], [1, 8, 9, 0, 0]], jnp.int32)
# Two grey 12x12 images (a 3x3 feature grid after the captioner's two stride-2 stages).
IMAGES = jax.random.uniform(jax.random.key(7), (2, 12, 12, 1))
BEAM = 3


def source_for(model):
    """The source batch the contract tests feed `model`: IMAGES if it reads images, else SRC."""
    return IMAGES if registry.reads_images(model) else SRC


def build(name, overrides, **extra):
    vocab = (TGT_VOCAB, TGT_VOCAB) if overrides.get("share_embeddings") else (SRC_VOCAB, TGT_VOCAB)
    return registry.create_model(
        name, src_vocab_size=vocab[0], tgt_vocab_size=vocab[1], **TINY[name], **overrides, **extra
    )


def random_params(model, seed=0):
    """Parameters of `model` drawn from N(0, 0.3^2), biases and norms included.

    The contract holds for any parameter values, and `jax.eval_shape` + numpy is far cheaper than
    compiling `model.init` for every variant; non-zero biases and norm offsets make the checks stricter.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), source_for(model), TGT_IN)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


class Compiled:
    """A tiny model, its parameters and its jitted entry points (compiled once per variant)."""

    def __init__(self, model):
        self.model = model
        self.src = source_for(model)
        self.vocab = model.tgt_vocab_size
        self.variables = {"params": random_params(model)}
        self.forward = jax.jit(functools.partial(model.apply, train=False))
        self.encode = jax.jit(functools.partial(model.apply, method=model.encode))
        self.init_state = jax.jit(
            functools.partial(model.apply, method=model.init_decode_state), static_argnums=2
        )
        self.step = jax.jit(functools.partial(model.apply, method=model.decode_step))

    def incremental(self, src, tgt_in, beam):
        """decode_step over `tgt_in` with every beam of a sentence fed its tokens: `[B, beam, T, V]`."""
        v = self.variables
        memory = self.encode(v, src)
        state = self.init_state(v, memory, tgt_in.shape[1])
        state = jax.tree.map(lambda x: jnp.repeat(x, beam, axis=0), state)
        logits = []
        for t in range(tgt_in.shape[1]):
            step_logits, state = self.step(v, memory, jnp.repeat(tgt_in[:, t], beam), state)
            logits.append(step_logits)
        return jnp.stack(logits, axis=1).reshape(src.shape[0], beam, tgt_in.shape[1], -1)


@functools.cache
def compiled_variant(index: int) -> Compiled:
    name, overrides = VARIANTS[index]
    return Compiled(build(name, overrides))


def default_variant(name: str) -> Compiled:
    return compiled_variant(VARIANTS.index((name, {})))


def variant_id(variant) -> str:
    name, overrides = variant
    return "-".join([name] + [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module", params=range(len(VARIANTS)), ids=map(variant_id, VARIANTS))
def compiled(request):
    return compiled_variant(request.param)


def test_every_model_has_contract_coverage():
    assert set(TINY) == set(registry.MODELS) == {name for name, _ in VARIANTS}


def test_forward_shape_and_dtype(compiled):
    logits = compiled.forward(compiled.variables, compiled.src, TGT_IN)
    assert logits.shape == (2, 5, compiled.vocab)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_memory_and_state_have_batch_first(compiled):
    v = compiled.variables
    memory = compiled.encode(v, compiled.src)
    state = compiled.init_state(v, memory, 7)
    for leaf in jax.tree.leaves(memory) + jax.tree.leaves(state):
        assert leaf.shape[0] == 2
    # A decode step returns a state of exactly the input's structure, shapes and dtypes (a loop carry).
    state = jax.tree.map(lambda x: jnp.repeat(x, BEAM, axis=0), state)
    logits, new_state = compiled.step(v, memory, jnp.ones((2 * BEAM,), jnp.int32), state)
    assert logits.shape == (2 * BEAM, compiled.vocab) and logits.dtype == jnp.float32
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True):
        assert (old.shape, old.dtype) == (new.shape, new.dtype)


def test_decode_step_matches_teacher_forcing_over_beams(compiled):
    forward = compiled.forward(compiled.variables, compiled.src, TGT_IN)
    incremental = compiled.incremental(compiled.src, TGT_IN, BEAM)
    for beam in range(BEAM):
        np.testing.assert_allclose(incremental[:, beam], forward, atol=1e-5, rtol=0)


def test_beam_search_scores_are_the_teacher_forced_log_probs(compiled):
    # Beam search moves hypotheses between rows at every step by reordering the state the model
    # returns (RNN carries, a KV cache): each n-best hypothesis' log-probability must still be the
    # model's teacher-forced one for its tokens.
    v, max_len = compiled.variables, 6
    settings = DecodeSettings(beam_size=BEAM, length_penalty="none", max_decode_len=max_len)
    result = decode_programs.decode_fn(compiled.model, settings)(v["params"], compiled.src, 0.0)
    assert np.all(result.valid)
    sequences = np.asarray(result.sequences).reshape(2 * BEAM, max_len)
    tgt_in = np.concatenate([np.full((2 * BEAM, 1), tokenizers.BOS_ID), sequences[:, :-1]], 1)
    logits = compiled.forward(v, jnp.repeat(compiled.src, BEAM, axis=0), jnp.asarray(tgt_in))
    log_probs = np.take_along_axis(jax.nn.log_softmax(logits), sequences[..., None], -1)[..., 0]
    within = np.arange(max_len) < np.asarray(result.lengths).reshape(-1, 1)
    np.testing.assert_allclose(
        np.sum(np.where(within, log_probs, 0), axis=1),
        np.asarray(result.log_probs).reshape(-1),
        atol=1e-4,
    )
    # Every beam starts from the one BOS hypothesis of its sentence (rows 1.. take row 0's state at
    # the first step), so hypotheses of 3+ tokens read a reordered state at later steps.
    assert np.any(np.asarray(result.lengths) >= 3)


def test_extra_source_padding_changes_nothing(compiled):
    if compiled.src is IMAGES:
        pytest.skip("image sources are never padded")
    v = compiled.variables
    np.testing.assert_allclose(
        compiled.forward(v, SRC_EXTRA_PAD, TGT_IN), compiled.forward(v, SRC, TGT_IN), atol=1e-5
    )


def test_future_target_tokens_do_not_change_earlier_logits(compiled):
    v = compiled.variables
    changed = TGT_IN.at[:, 3].set(jnp.array([11, 12]))
    src = compiled.src
    before, after = compiled.forward(v, src, TGT_IN), compiled.forward(v, src, changed)
    np.testing.assert_array_equal(before[:, :3], after[:, :3])
    assert not np.allclose(before[:, 3:], after[:, 3:])


def test_source_changes_the_output(compiled):
    v = compiled.variables
    other = compiled.src.at[0, 0].set(3)
    assert not np.allclose(
        compiled.forward(v, compiled.src, TGT_IN)[0], compiled.forward(v, other, TGT_IN)[0]
    )


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_dropout_uses_the_dropout_rng(name):
    compiled = default_variant(name)
    assert compiled.model.dropout_rate > 0
    train = jax.jit(
        lambda rng: compiled.model.apply(
            compiled.variables, compiled.src, TGT_IN, train=True, rngs={"dropout": rng}
        )
    )
    a, b, a_again = train(jax.random.key(1)), train(jax.random.key(2)), train(jax.random.key(1))
    np.testing.assert_array_equal(a, a_again)
    assert not np.allclose(a, b)
    assert not np.allclose(a, compiled.forward(compiled.variables, compiled.src, TGT_IN))


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_bfloat16_compute_gives_float32_logits_close_to_float32(name):
    compiled, model16 = default_variant(name), build(name, {}, dtype="bfloat16")
    src = compiled.src
    logits32 = compiled.forward(compiled.variables, src, TGT_IN)
    logits16 = jax.jit(model16.apply)(compiled.variables, src, TGT_IN)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(logits16, logits32, atol=0.1)
    assert not np.array_equal(logits16, logits32)  # the computation really ran in bfloat16
    # The output projection accumulates in float32: logits are not bfloat16 values cast up.
    rounded = np.asarray(jnp.asarray(logits16, jnp.bfloat16).astype(jnp.float32))
    assert np.mean(rounded != np.asarray(logits16)) > 0.5

    # A bfloat16 decode step returns float32 logits and a state of unchanged dtypes (a loop carry).
    def first_step(variables):
        memory = model16.apply(variables, src, method=model16.encode)
        state = model16.apply(variables, memory, 4, method=model16.init_decode_state)
        tokens = jnp.ones((2,), jnp.int32)
        return state, model16.apply(variables, memory, tokens, state, method=model16.decode_step)

    state, (logits, new_state) = jax.eval_shape(first_step, compiled.variables)
    assert logits.dtype == jnp.float32
    assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)


def test_nnx_bridge_wraps_a_zoo_model():
    """The README's example: an NNX user wraps a zoo model, calls it and its methods, trains it."""
    model = build("transformer", {})
    wrapped = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(0)).lazy_init(SRC, TGT_IN)
    params = nnx.to_pure_dict(nnx.state(wrapped, nnx.Param))
    np.testing.assert_allclose(
        wrapped(SRC, TGT_IN), model.apply({"params": params}, SRC, TGT_IN), atol=1e-6
    )
    # Every method of the interface is reachable through the wrapper.
    memory = wrapped.encode(SRC)
    assert memory["mask"].shape == (2, 1, 1, SRC.shape[1])

    targets = jnp.roll(TGT_IN, -1, axis=1)

    def loss_fn(module):
        logits = module(SRC, TGT_IN, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @nnx.jit
    def train_step(module, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(module)
        optimizer.update(module, grads)
        return loss

    optimizer = nnx.Optimizer(wrapped, optax.adam(1e-2), wrt=nnx.Param)
    first = train_step(wrapped, optimizer)
    assert train_step(wrapped, optimizer) < first


# ------------------------------------------------------------------------------------ registry


def test_create_model_applies_defaults_and_overrides():
    model = registry.create_model("transformer", src_vocab_size=20, tgt_vocab_size=30, num_heads=8)
    assert isinstance(model, Transformer)
    assert (model.src_vocab_size, model.tgt_vocab_size, model.num_heads) == (20, 30, 8)
    assert model.d_model == registry.default_hparams("transformer")["d_model"]
    assert isinstance(
        registry.create_model("seq2seq_rnn", src_vocab_size=5, tgt_vocab_size=5), Seq2SeqRNN
    )
    model = registry.create_model(
        "attention_rnn", src_vocab_size=5, tgt_vocab_size=5, dtype="bfloat16"
    )
    assert isinstance(model, AttentionRNN) and model.dtype == jnp.bfloat16
    model = registry.create_model("captioner_rnn", src_vocab_size=5, tgt_vocab_size=5, channels=8)
    assert isinstance(model, RNNCaptioner) and model.channels == 8
    model = registry.create_model("captioner_transformer", src_vocab_size=5, tgt_vocab_size=5)
    assert isinstance(model, TransformerCaptioner) and not hasattr(model, "cell")


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_defaults_live_in_the_model_class(name):
    """create_model without overrides builds the module exactly as its class defaults it, and
    default_hparams reports those values for every hyperparameter."""
    model = registry.create_model(name, src_vocab_size=5, tgt_vocab_size=7)
    assert model == registry.MODELS[name](src_vocab_size=5, tgt_vocab_size=7)
    names = registry.hparam_names(name)
    assert registry.default_hparams(name) == {k: getattr(model, k) for k in names}


def test_default_hparams_is_a_copy():
    registry.default_hparams("transformer")["d_model"] = 1
    assert registry.default_hparams("transformer")["d_model"] == 256


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        (
            "lstm_lm",
            {},
            "unknown model 'lstm_lm': use one of seq2seq_rnn, attention_rnn, transformer",
        ),
        ("transformer", {"hidden_dim": 8}, "unknown hyperparameter(s) hidden_dim for model"),
        ("seq2seq_rnn", {"cell": "rnn"}, "cell='rnn' is not supported: use one of gru, lstm"),
        (
            "attention_rnn",
            {"attention": "luong_concat"},
            "attention='luong_concat' is not supported",
        ),
        ("attention_rnn", {"hidden_dim": 15}, "hidden_dim=15 must be even"),
        ("transformer", {"share_embeddings": True}, "share_embeddings needs equal vocabularies"),
        ("transformer", {"num_heads": 3}, "d_model=256 must be even and divisible by num_heads=3"),
        ("transformer", {"activation": "swish"}, "activation='swish' is not supported"),
        ("transformer", {"dropout_rate": 1.0}, "dropout_rate=1.0 must be in [0, 1)"),
        ("seq2seq_rnn", {"num_layers": 0}, "num_layers=0 must be a positive integer"),
        ("seq2seq_rnn", {"dtype": "float-ish"}, "dtype='float-ish' is not a dtype"),
        ("captioner_rnn", {"num_heads": 2}, "unknown hyperparameter(s) num_heads for model"),
        ("captioner_transformer", {"cell": "gru"}, "unknown hyperparameter(s) cell for model"),
        ("captioner_rnn", {"d_model": 30}, "d_model=30 must be a multiple of 4"),
        ("captioner_transformer", {"d_model": 30}, "d_model=30 must be a multiple of 4"),
        (
            "captioner_rnn",
            {"attention": "luong_dot", "hidden_dim": 64},
            "needs d_model == hidden_dim",
        ),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(name, overrides, message):
    with pytest.raises(ValueError) as error:
        registry.create_model(name, src_vocab_size=10, tgt_vocab_size=12, **overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_hyperparameter_error_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match="use cell, embed_dim, hidden_dim, num_layers, dropout_rate"
    ):
        registry.create_model("seq2seq_rnn", src_vocab_size=5, tgt_vocab_size=5, heads=2)


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_example_source_gives_the_params_of_real_sources(name):
    """`experiment` inits every model from `registry.example_source`: the same parameter shapes as
    the (larger) sources the model then reads."""
    model = build(name, {})
    example = registry.example_source(model)
    assert example.shape[0] == 1 and example.ndim == source_for(model).ndim
    from_example = jax.eval_shape(model.init, jax.random.key(0), example, TGT_IN[:1, :2])
    from_real = jax.eval_shape(model.init, jax.random.key(0), source_for(model), TGT_IN)
    assert jax.tree.map(lambda x: x.shape, from_example) == jax.tree.map(
        lambda x: x.shape, from_real
    )


def test_count_params():
    assert registry.count_params({"a": jnp.ones((2, 3)), "b": {"c": jnp.ones(4)}}) == 10


def test_default_transformer_parameter_count_matches_the_architecture():
    """Counted from the paper's architecture: tied output layer, so no output projection."""
    vocab, d, ffn, layers = 8000, 256, 1024, 3
    model = registry.create_model("transformer", src_vocab_size=vocab, tgt_vocab_size=vocab)
    shapes = jax.eval_shape(model.init, jax.random.key(0), SRC, TGT_IN)
    attention = 4 * (d * d + d)
    feed_forward = d * ffn + ffn + ffn * d + d
    norm = 2 * d
    encoder = layers * (attention + feed_forward + 2 * norm) + norm
    decoder = layers * (2 * attention + feed_forward + 3 * norm) + norm
    assert registry.count_params(shapes["params"]) == 2 * vocab * d + encoder + decoder
