"""A seconds-long dates run for tests and smoke checks: tiny data, tiny model.

python train.py --config configs/tiny_dates.py --workdir /tmp/tiny
python train.py --config configs/tiny_dates.py --workdir /tmp/tiny_lstm \
    --config.model_hparams.cell=lstm --config.num_train_steps=40
"""

import ml_collections

from configs import default


def get_config():
    config = default.get_config()
    config.dataset = "dates/tiny"
    config.batch_size = 16
    config.num_buckets = 1  # one batch shape: one compilation of the train step
    config.eval_batch_size = 32
    config.model_hparams = ml_collections.ConfigDict(
        {"cell": "gru", "embed_dim": 16, "hidden_dim": 32, "attention_dim": 16}
    )
    config.num_train_steps = 20
    config.warmup_steps = 5
    config.log_every = 5
    config.eval_every = 10
    config.checkpoint_every = 10
    config.num_eval_examples = 32
    config.num_samples_to_log = 1
    return config
