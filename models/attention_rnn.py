"""RNN encoder-decoder with attention (Bahdanau et al., 2015; Luong et al., 2015 scoring as options).

A bidirectional encoder annotates every source position; at each decoder step the previous decoder state
scores every annotation, the scores are softmax-normalised over the real (unpadded) source positions, and
the resulting context vector feeds both the decoder RNN and the output layer:

    e_tj = score(s_{t-1}, h_j)         a_t = softmax_j(e_t) over real positions    c_t = sum_j a_tj h_j
    s_t  = RNN(s_{t-1}, [E y_{t-1}; c_t])          p(y_t) = softmax(W_o tanh(W_r [s_t; c_t; E y_{t-1}]))

with score "bahdanau" `v^T tanh(W s + U h)` (an MLP), "luong_dot" `s^T h`, or "luong_general" `s^T W h`.
Each direction of the encoder has `hidden_dim // 2` units, so annotations have `hidden_dim` features like
the decoder state (as in OpenNMT) and the dot score is defined. The decoder starts from
`tanh(W_l mean_j h_j)` per layer (mean over real positions, as in Nematus). Everything that depends on
the source alone (annotations, their key projection `U h`/`W h`) is computed once in `encode`.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from models import common

ATTENTIONS = ("bahdanau", "luong_dot", "luong_general")


class AttentionDecoderStep(nn.Module):
    """One decoder time step: attend with the previous state, run the stacked cells, read out.

    The teacher-forced path scans this module over time and `decode_step` calls it once, so both use the
    very same parameters.
    """

    cell: str
    hidden_dim: int
    num_layers: int
    attention: str
    attention_dim: int
    dropout_rate: float
    dtype: Any
    param_dtype: Any

    def setup(self):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.attention == "bahdanau":
            self.query = nn.Dense(self.attention_dim, use_bias=False, **dtypes)
            self.energy = nn.Dense(1, use_bias=False, **dtypes)
        self.cells = [
            common.rnn_cell(self.cell, self.hidden_dim, **dtypes) for _ in range(self.num_layers)
        ]
        self.readout = nn.Dense(self.hidden_dim, **dtypes)
        self.dropout = common.Dropout(self.dropout_rate)

    def attend(self, query: jax.Array, memory: dict) -> tuple[jax.Array, jax.Array]:
        """Attention of each row over its own sentence's annotations, broadcast over the beams.

        Args:
          query: `[N, hidden_dim]` previous top-layer decoder state, N = batch x beam.
          memory: from `encode`; leaves have the sentence batch first.

        Returns:
          (context `[N, hidden_dim]`, float32 weights `[N, src_len]`).
        """
        batch, src_len = memory["mask"].shape
        beam = common.beams_per_sentence(batch, query.shape[0])
        query = query.reshape(batch, beam, -1)
        keys = memory["keys"]  # [batch, src_len, key_dim]
        if self.attention == "bahdanau":
            hidden = jnp.tanh(self.query(query)[:, :, None, :] + keys[:, None, :, :])
            scores = self.energy(hidden)[..., 0]  # [batch, beam, src_len]
        else:
            scores = jnp.einsum("bkd,bsd->bks", query, keys)
        weights = common.masked_softmax(scores, memory["mask"][:, None, :])
        context = jnp.einsum("bks,bsd->bkd", weights.astype(self.dtype), memory["annotations"])
        return context.reshape(batch * beam, -1), weights.reshape(batch * beam, src_len)

    def __call__(
        self, carries: tuple, embedded: jax.Array, memory: dict, train: bool
    ) -> tuple[tuple, tuple[jax.Array, jax.Array]]:
        """Args: carries (one per layer, leaves `[N, hidden_dim]`), embedded `[N, embed_dim]` (y_{t-1}).

        Returns: (new carries, (readout features `[N, hidden_dim]`, attention weights `[N, src_len]`)).
        """
        context, weights = self.attend(common.cell_hidden(self.cell, carries[-1]), memory)
        x = jnp.concatenate([embedded, context.astype(embedded.dtype)], axis=-1)
        new_carries = []
        for cell, carry in zip(self.cells, carries, strict=True):
            carry, x = cell(carry, x)
            new_carries.append(carry)
            x = self.dropout(x, deterministic=not train)
        features = jnp.tanh(self.readout(jnp.concatenate([x, context, embedded], axis=-1)))
        return tuple(new_carries), (self.dropout(features, deterministic=not train), weights)


class AttentionRNNDecoder(nn.Module):
    """The attention RNN's decoder over a memory of annotations, shared by the text `AttentionRNN`
    and `models.captioner.RNNCaptioner` (a field-less base: the model declares `tgt_vocab_size`,
    `cell`, `embed_dim`, `hidden_dim`, `num_layers`, `attention`, `attention_dim`, `dropout_rate`,
    `dtype`, `param_dtype`, and calls `setup_decoder` in its `setup`).

    Target embeddings, the source-side key projection of the attention (`attention_keys`), the
    bridge to the initial carries `tanh(W_l mean_j h_j)`, one `AttentionDecoderStep` scanned over
    time (teacher forcing) or called once per step (decoding), and the output projection.
    """

    def setup_decoder(self):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.tgt_embed = nn.Embed(self.tgt_vocab_size, self.embed_dim, **dtypes)
        if self.attention == "bahdanau":
            self.key = nn.Dense(self.attention_dim, **dtypes)
        elif self.attention == "luong_general":
            self.key = nn.Dense(self.hidden_dim, use_bias=False, **dtypes)
        self.bridge = [nn.Dense(self.hidden_dim, **dtypes) for _ in range(self.num_layers)]
        self.decoder = AttentionDecoderStep(
            self.cell,
            self.hidden_dim,
            self.num_layers,
            self.attention,
            self.attention_dim,
            self.dropout_rate,
            **dtypes,
        )
        self.dropout = common.Dropout(self.dropout_rate)
        self.output = nn.Dense(
            self.tgt_vocab_size, dot_general=common.float32_dot_general, **dtypes
        )

    def check_decoder_fields(self) -> None:
        """One-line ValueErrors for the decoder's fields (call in `__post_init__`)."""
        common.check_choice("cell", self.cell, common.CELLS)
        common.check_choice("attention", self.attention, ATTENTIONS)
        common.check_positive(
            tgt_vocab_size=self.tgt_vocab_size,
            embed_dim=self.embed_dim,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            attention_dim=self.attention_dim,
        )
        common.check_rate(dropout_rate=self.dropout_rate)

    def attention_keys(self, annotations: jax.Array) -> jax.Array:
        """The source side of the attention score, `[batch, src_len, key_dim]`, once per source:
        `U h` (bahdanau), `W h` (luong_general) or the annotations themselves (luong_dot)."""
        return annotations if self.attention == "luong_dot" else self.key(annotations)

    def initial_carries(self, memory: dict) -> tuple:
        """Per-layer decoder carries `tanh(W_l mean_j h_j)` (mean over real positions), leaves
        `[batch, hidden_dim]`."""
        mask = memory["mask"][..., None]
        total = jnp.sum(jnp.where(mask, memory["annotations"], 0), axis=1)
        mean = total / jnp.maximum(jnp.sum(mask, axis=1), 1).astype(total.dtype)
        return tuple(common.carry_from_hidden(self.cell, jnp.tanh(b(mean))) for b in self.bridge)

    def teacher_forced(self, memory: dict, tgt_in: jax.Array, train: bool) -> jax.Array:
        """float32 logits `[batch, tgt_len, tgt_vocab_size]` of `tgt_in` (int32 `[batch, tgt_len]`,
        BOS y1 .. y_{T-1}); sows the attention weights `[batch, tgt_len, src_len]` as
        `intermediates/attention`."""
        embedded = self.dropout(self.tgt_embed(tgt_in), deterministic=not train)
        scan = nn.scan(
            lambda decoder, carries, x_t, memory: decoder(carries, x_t, memory, train),
            variable_broadcast="params",
            split_rngs={"params": False, "dropout": True},
            in_axes=(1, nn.broadcast),
            out_axes=1,
        )
        _, (features, weights) = scan(self.decoder, self.initial_carries(memory), embedded, memory)
        self.sow("intermediates", "attention", weights)
        return self.output(features)

    def init_decode_state(self, memory: dict, max_len: int) -> dict:
        """Decoder state before BOS: per-layer carries, leaves `[batch, hidden_dim]`.

        `max_len` is unused: an RNN's state does not grow with the output.
        """
        del max_len
        return {"carries": self.initial_carries(memory)}

    def decode_step(self, memory: dict, tokens: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        """One incremental decoder step; sows the attention weights `[N, src_len]`.

        Args:
          memory: from `encode`, sentence batch first; broadcast over the beams of each sentence.
          tokens: int32 `[N]`, the previous token of each row (N = batch x beam, row n in sentence
            n // beam).
          state: carries with leaves `[N, hidden_dim]`.

        Returns:
          (float32 logits `[N, tgt_vocab_size]`, new state).
        """
        carries, (features, weights) = self.decoder(
            state["carries"], self.tgt_embed(tokens), memory, train=False
        )
        self.sow("intermediates", "attention", weights)
        return self.output(features), {"carries": carries}


class AttentionRNN(AttentionRNNDecoder):
    """Bidirectional-encoder RNN with Bahdanau (MLP) or Luong (dot/general) attention.

    Attributes:
      src_vocab_size, tgt_vocab_size: vocabulary sizes (id 0 is padding).
      cell: "gru" or "lstm".
      embed_dim: token embedding size.
      hidden_dim: decoder state and annotation size (each encoder direction has hidden_dim // 2).
      num_layers: stacked layers in the encoder and in the decoder.
      attention: "bahdanau", "luong_dot" or "luong_general".
      attention_dim: hidden size of the Bahdanau scoring MLP (unused by the Luong scores).
      dropout_rate: dropout on embeddings, between layers and before the output projection.
      dtype: computation dtype (e.g. jnp.bfloat16 on accelerators); logits are always float32.
      param_dtype: parameter dtype.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    cell: str = "gru"
    embed_dim: int = 128
    hidden_dim: int = 256
    num_layers: int = 1
    attention: str = "bahdanau"
    attention_dim: int = 256
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        self.check_decoder_fields()
        common.check_positive(src_vocab_size=self.src_vocab_size)
        if self.hidden_dim % 2:
            raise ValueError(
                f"hidden_dim={self.hidden_dim} must be even: each encoder direction has hidden_dim // 2"
            )
        super().__post_init__()

    def setup(self):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.setup_decoder()
        self.src_embed = nn.Embed(self.src_vocab_size, self.embed_dim, **dtypes)
        half = self.hidden_dim // 2
        self.encoder = [
            nn.Bidirectional(
                nn.RNN(common.rnn_cell(self.cell, half, **dtypes)),
                nn.RNN(common.rnn_cell(self.cell, half, **dtypes)),
            )
            for _ in range(self.num_layers)
        ]

    def __call__(self, src: jax.Array, tgt_in: jax.Array, train: bool = False) -> jax.Array:
        """Teacher-forced logits; sows the attention weights `[batch, tgt_len, src_len]` as
        `intermediates/attention`.

        Args:
          src: int32 `[batch, src_len]`, 0-padded.
          tgt_in: int32 `[batch, tgt_len]` (BOS y1 .. y_{T-1}).
          train: enables dropout (needs the 'dropout' rng).

        Returns:
          float32 logits `[batch, tgt_len, tgt_vocab_size]`.
        """
        return self.teacher_forced(self.encode(src, train=train), tgt_in, train)

    def encode(self, src: jax.Array, train: bool = False) -> dict:
        """Runs the bidirectional encoder and the source-side half of the attention.

        Args:
          src: int32 `[batch, src_len]`, 0-padded at the end.

        Returns:
          dict of `annotations [batch, src_len, hidden_dim]`, attention `keys [batch, src_len, key_dim]`
          and `mask [batch, src_len]` (bool, True at real tokens).
        """
        mask = common.padding_mask(src)
        lengths = jnp.sum(mask, axis=-1)
        x = self.dropout(self.src_embed(src), deterministic=not train)
        for layer in self.encoder:
            x = self.dropout(layer(x, seq_lengths=lengths), deterministic=not train)
        return {"annotations": x, "keys": self.attention_keys(x), "mask": mask}
