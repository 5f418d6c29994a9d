"""Encoder-decoder RNN (Sutskever et al., 2014; Cho et al., 2014): the encoder's final state starts the decoder.

A stack of GRU or LSTM layers reads the source; the final carry of each encoder layer (at the last real
token, padding skipped) is the initial carry of the matching decoder layer, and there is no attention: the
fixed-size state is all the decoder knows about the source.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from models import common


class StackedCell(nn.Module):
    """One time step of `num_layers` stacked cells, dropout between layers and on the output.

    The teacher-forced path scans this module over time and `decode_step` calls it once, so both use the
    very same parameters.
    """

    cell: str
    hidden_dim: int
    num_layers: int
    dropout_rate: float
    dtype: Any
    param_dtype: Any

    def setup(self):
        self.cells = [
            common.rnn_cell(self.cell, self.hidden_dim, self.dtype, self.param_dtype)
            for _ in range(self.num_layers)
        ]
        self.dropout = common.Dropout(self.dropout_rate)

    def __call__(self, carries: tuple, x: jax.Array, train: bool) -> tuple[tuple, jax.Array]:
        """Args: carries (one per layer, leaves `[N, hidden]`), x `[N, in]`.

        Returns: (new carries, top-layer output `[N, hidden_dim]`).
        """
        new_carries = []
        for cell, carry in zip(self.cells, carries, strict=True):
            carry, x = cell(carry, x)
            new_carries.append(carry)
            x = self.dropout(x, deterministic=not train)
        return tuple(new_carries), x


class Seq2SeqRNN(nn.Module):
    """Stacked GRU/LSTM encoder-decoder without attention.

    Attributes:
      src_vocab_size, tgt_vocab_size: vocabulary sizes (id 0 is padding).
      cell: "gru" or "lstm".
      embed_dim: token embedding size.
      hidden_dim: RNN state size (encoder and decoder).
      num_layers: stacked layers in the encoder and in the decoder.
      dropout_rate: dropout on embeddings, between layers and before the output projection.
      dtype: computation dtype (e.g. jnp.bfloat16 on accelerators); logits are always float32.
      param_dtype: parameter dtype.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    cell: str = "gru"
    embed_dim: int = 128
    hidden_dim: int = 256
    num_layers: int = 2
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        common.check_choice("cell", self.cell, common.CELLS)
        common.check_positive(
            src_vocab_size=self.src_vocab_size,
            tgt_vocab_size=self.tgt_vocab_size,
            embed_dim=self.embed_dim,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
        )
        common.check_rate(dropout_rate=self.dropout_rate)
        super().__post_init__()

    def setup(self):
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.src_embed = nn.Embed(self.src_vocab_size, self.embed_dim, **dtypes)
        self.tgt_embed = nn.Embed(self.tgt_vocab_size, self.embed_dim, **dtypes)
        self.encoder = [
            nn.RNN(common.rnn_cell(self.cell, self.hidden_dim, **dtypes), return_carry=True)
            for _ in range(self.num_layers)
        ]
        self.decoder = StackedCell(
            self.cell, self.hidden_dim, self.num_layers, self.dropout_rate, **dtypes
        )
        self.dropout = common.Dropout(self.dropout_rate)
        self.output = nn.Dense(
            self.tgt_vocab_size, dot_general=common.float32_dot_general, **dtypes
        )

    def __call__(self, src: jax.Array, tgt_in: jax.Array, train: bool = False) -> jax.Array:
        """Teacher-forced logits.

        Args:
          src: int32 `[batch, src_len]`, 0-padded.
          tgt_in: int32 `[batch, tgt_len]` (BOS y1 .. y_{T-1}).
          train: enables dropout (needs the 'dropout' rng).

        Returns:
          float32 logits `[batch, tgt_len, tgt_vocab_size]`.
        """
        memory = self.encode(src, train=train)
        x = self.dropout(self.tgt_embed(tgt_in), deterministic=not train)
        scan = nn.scan(
            lambda decoder, carries, x_t: decoder(carries, x_t, train),
            variable_broadcast="params",
            split_rngs={"params": False, "dropout": True},
            in_axes=1,
            out_axes=1,
        )
        _, outputs = scan(self.decoder, memory["carries"], x)
        return self.output(outputs)

    def encode(self, src: jax.Array, train: bool = False) -> dict:
        """Runs the encoder.

        Args:
          src: int32 `[batch, src_len]`, 0-padded at the end.

        Returns:
          `{"carries": per-layer final carries}`, leaves `[batch, hidden_dim]`, taken at each
          sentence's last real token, so trailing padding changes nothing.
        """
        lengths = jnp.sum(common.padding_mask(src), axis=-1)
        x = self.dropout(self.src_embed(src), deterministic=not train)
        carries = []
        for layer in self.encoder:
            carry, x = layer(x, seq_lengths=lengths)
            carries.append(carry)
            x = self.dropout(x, deterministic=not train)
        return {"carries": tuple(carries)}

    def init_decode_state(self, memory: dict, max_len: int) -> dict:
        """Decoder state before BOS: the encoder's final carries, leaves `[batch, hidden_dim]`.

        `max_len` is unused: an RNN's state does not grow with the output.
        """
        del max_len
        return {"carries": memory["carries"]}

    def decode_step(self, memory: dict, tokens: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        """One incremental decoder step.

        Args:
          memory: from `encode` (unused here: the encoder state already lives in `state`).
          tokens: int32 `[N]`, the previous token of each row (N = batch x beam).
          state: carries with leaves `[N, hidden_dim]`.

        Returns:
          (float32 logits `[N, tgt_vocab_size]`, new state).
        """
        del memory
        carries, output = self.decoder(state["carries"], self.tgt_embed(tokens), train=False)
        return self.output(output), {"carries": carries}
