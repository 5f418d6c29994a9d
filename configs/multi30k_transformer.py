"""Multi30k En->De with a Transformer on a shared SentencePiece vocabulary."""

import ml_collections

from configs import default


def get_config():
    config = default.get_config()
    config.dataset = "multi30k/en-de"
    config.tokenizer = "sentencepiece"
    config.vocab_size = 8000
    config.shared_vocab = True
    config.max_len = 64
    config.tokens_per_batch = 4096
    config.eval_batch_size = 64
    config.model = "transformer"
    config.model_hparams = ml_collections.ConfigDict(
        {
            "d_model": 256,
            "num_heads": 4,
            "num_encoder_layers": 3,
            "num_decoder_layers": 3,
            "ffn_dim": 1024,
            "dropout_rate": 0.3,
            "share_embeddings": True,
            "tie_output": True,
        }
    )
    config.num_train_steps = 20000
    config.learning_rate = 1e-3
    config.warmup_steps = 4000
    config.schedule = "rsqrt"
    config.weight_decay = 1e-4
    config.label_smoothing = 0.1
    config.eval_every = 2000
    config.checkpoint_every = 1000
    config.num_eval_examples = 0
    config.eval_metric = "bleu"
    config.max_decode_len = 80
    return config
