"""Dates -> ISO with a small Transformer."""

import ml_collections

from configs import default


def get_config():
    config = default.get_config()
    config.model = "transformer"
    config.model_hparams = ml_collections.ConfigDict(
        {
            "d_model": 128,
            "num_heads": 4,
            "num_encoder_layers": 2,
            "num_decoder_layers": 2,
            "ffn_dim": 512,
            "dropout_rate": 0.1,
        }
    )
    config.learning_rate = 1e-3
    config.warmup_steps = 300
    return config
