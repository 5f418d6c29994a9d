"""Multi30k En->De with the Bahdanau attention RNN on a shared SentencePiece vocabulary."""

import ml_collections

from configs import multi30k_transformer


def get_config():
    config = multi30k_transformer.get_config()
    config.model = "attention_rnn"
    config.model_hparams = ml_collections.ConfigDict(
        {
            "cell": "gru",
            "embed_dim": 256,
            "hidden_dim": 512,
            "attention_dim": 256,
            "dropout_rate": 0.3,
        }
    )
    config.tokens_per_batch = 2048
    config.learning_rate = 1e-3
    config.warmup_steps = 1000
    config.schedule = "cosine"
    return config
