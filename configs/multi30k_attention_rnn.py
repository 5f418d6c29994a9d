"""Multi30k En->De with the Bahdanau attention RNN on a shared SentencePiece vocabulary.

Sized for a budget of 90 minutes on 2 CPU cores (see docs/results.md): a step of ~2,048 target tokens
takes ~1.05 s here, so 4,200 updates (~20 epochs) plus 4 validations fit. Peak learning rate 2e-3
with gradient clipping at 1.0, warmup 600, cosine decay to zero; label smoothing 0.1 and dropout 0.3.
"""

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
    config.num_train_steps = 4200
    config.learning_rate = 2e-3
    config.warmup_steps = 600
    config.eval_every = 1050
    config.checkpoint_every = 300
    return config
