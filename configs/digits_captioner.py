"""Image captioning: handwritten digits on a canvas (`digit_captions`) -> "seven left of two at the top".

A CNN encoder and a Show-Attend-and-Tell attention RNN over its 8x8 feature grid (models/captioner.py,
model `captioner_rnn`), character-level captions. The argument `:transformer` swaps in a Transformer
decoder with cross-attention over the grid (model `captioner_transformer`); the data, encoder and
optimization stay the same.

    python train.py --config configs/digits_captioner.py --workdir runs/digits_captioner
    python train.py --config configs/digits_captioner.py:transformer --workdir runs/digits_tf
    python eval.py --workdir runs/digits_captioner --plot_attention 4
"""

import ml_collections

from configs import default

ENCODER = {
    "num_stages": 2,  # 32x32 canvas -> 8x8 grid: 64 positions to attend over
    "channels": 32,
    "d_model": 128,
    "dropout_rate": 0.1,
}
DECODERS = {
    "rnn": {"cell": "gru", "embed_dim": 32, "hidden_dim": 128, "attention_dim": 64},
    "transformer": {"num_heads": 4, "num_decoder_layers": 2, "ffn_dim": 256},
}


def get_config(decoder: str = "rnn"):
    if decoder not in DECODERS:
        raise ValueError(f"configs/digits_captioner.py:{decoder}: use one of {', '.join(DECODERS)}")
    config = default.get_config()
    config.dataset = "digit_captions"
    config.tokenizer = "char"
    config.shared_vocab = True  # image datasets have one (caption) tokenizer anyway
    config.max_len = 48  # captions are 26-45 characters (+ EOS)
    config.batch_size = 64
    config.eval_batch_size = 128
    config.model = f"captioner_{decoder}"
    config.model_hparams = ml_collections.ConfigDict({**ENCODER, **DECODERS[decoder]})
    config.num_train_steps = 1500
    config.learning_rate = 3e-3
    config.warmup_steps = 200
    config.eval_every = 500
    config.checkpoint_every = 500
    config.num_eval_examples = 500
    config.decoding.max_decode_len = 48  # the longest caption (45 characters) and EOS fit
    config.eval_metric = "exact_match"
    return config
