"""A seconds-long captioning run for tests and smoke checks: digit_captions/tiny, a tiny captioner.

python train.py --config configs/tiny_digits_captioner.py --workdir /tmp/tiny_captioner
python train.py --config configs/tiny_digits_captioner.py:transformer --workdir /tmp/tiny_tf
"""

import ml_collections

from configs import digits_captioner

TINY_ENCODER = {"num_stages": 2, "channels": 8, "d_model": 16}
TINY_DECODERS = {
    "rnn": {"embed_dim": 8, "hidden_dim": 16, "attention_dim": 8},
    "transformer": {"num_heads": 2, "num_decoder_layers": 1, "ffn_dim": 32},
}


def get_config(decoder: str = "rnn"):
    config = digits_captioner.get_config(decoder)
    config.dataset = "digit_captions/tiny"
    config.batch_size = 16
    config.num_buckets = 1  # one batch shape: one compilation of the train step
    config.eval_batch_size = 32
    config.model_hparams = ml_collections.ConfigDict({**TINY_ENCODER, **TINY_DECODERS[decoder]})
    config.num_train_steps = 20
    config.warmup_steps = 5
    config.log_every = 5
    config.eval_every = 10
    config.checkpoint_every = 10
    config.num_eval_examples = 32
    config.num_samples_to_log = 1
    return config
