"""Image captioning: handwritten digits on a canvas (`digit_captions`) -> "seven left of two at the top".

A CNN encoder and a Show-Attend-and-Tell attention RNN over its 8x8 feature grid (models/captioner.py),
character-level captions. `--config.model_hparams.decoder=transformer` swaps in a Transformer decoder
with cross-attention over the grid (then num_heads, num_decoder_layers, ffn_dim apply).

    python train.py --config configs/digits_captioner.py --workdir runs/digits_captioner
    python eval.py --workdir runs/digits_captioner --plot_attention 4
"""

import ml_collections

from configs import default


def get_config():
    config = default.get_config()
    config.dataset = "digit_captions"
    config.tokenizer = "char"
    config.shared_vocab = True  # image datasets have one (caption) tokenizer anyway
    config.max_len = 48  # captions are 26-45 characters (+ EOS)
    config.batch_size = 64
    config.eval_batch_size = 128
    config.model = "captioner"
    config.model_hparams = ml_collections.ConfigDict(
        {
            "decoder": "rnn",
            "num_stages": 2,  # 32x32 canvas -> 8x8 grid: 64 positions to attend over
            "channels": 32,
            "d_model": 128,
            "cell": "gru",
            "embed_dim": 32,
            "hidden_dim": 128,
            "attention_dim": 64,
            "num_heads": 4,
            "num_decoder_layers": 2,
            "ffn_dim": 256,
            "dropout_rate": 0.1,
        }
    )
    config.num_train_steps = 1500
    config.learning_rate = 3e-3
    config.warmup_steps = 200
    config.eval_every = 500
    config.checkpoint_every = 500
    config.num_eval_examples = 500
    config.max_decode_len = 48  # the longest caption (45 characters) and EOS fit
    config.eval_metric = "exact_match"
    return config
