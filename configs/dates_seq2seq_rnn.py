"""Dates -> ISO with a plain encoder-decoder GRU (no attention): the course's contrast case."""

import ml_collections

from configs import default


def get_config():
    config = default.get_config()
    config.model = "seq2seq_rnn"
    config.model_hparams = ml_collections.ConfigDict(
        {"cell": "gru", "embed_dim": 64, "hidden_dim": 256, "num_layers": 1}
    )
    return config
