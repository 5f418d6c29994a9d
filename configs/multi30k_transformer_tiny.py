"""Multi30k En->De with fairseq's Transformer-tiny recipe (the text-only baseline of the Multi30k
literature, e.g. Wu et al. 2021: 41.02 lc-tok BLEU on test_2016).

4+4 post-LN layers, d_model 128, FFN 256, 4 heads, all embeddings shared (~2.6M parameters);
dropout 0.3 on embeddings and sublayer outputs only (attention and activation dropout 0), label
smoothing 0.1, Adam (0.9, 0.98) without weight decay or gradient clipping, peak learning rate 5e-3
on the inverse-sqrt schedule after 2,000 warmup updates, ~8k target tokens per update.
"""

import ml_collections

from configs import multi30k_transformer


def get_config():
    config = multi30k_transformer.get_config()
    config.tokens_per_batch = 8192
    config.model_hparams = ml_collections.ConfigDict(
        {
            "d_model": 128,
            "num_heads": 4,
            "num_encoder_layers": 4,
            "num_decoder_layers": 4,
            "ffn_dim": 256,
            "dropout_rate": 0.3,
            "attention_dropout_rate": 0.0,
            "activation_dropout_rate": 0.0,
            "pre_ln": False,
            "share_embeddings": True,
            "tie_output": True,
        }
    )
    config.learning_rate = 5e-3
    config.warmup_steps = 2000
    config.schedule = "rsqrt"
    config.weight_decay = 0.0
    config.grad_clip_norm = 0.0
    config.num_train_steps = 3300
    config.eval_every = 500
    config.checkpoint_every = 250
    config.keep_checkpoints = 10
    return config
