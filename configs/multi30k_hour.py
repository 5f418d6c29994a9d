"""Multi30k in one hour on 2 CPU cores: `configs/multi30k_transformer.py` (d_model 256, 3+3 pre-LN
layers, shared SentencePiece 8k) cut to 1,200 updates of ~4,096 padded target tokens (~9 epochs),
trained and decoded on lowercased text (the Multi30k papers score lowercased, tokenized BLEU).

The argument after the colon is the language pair; nothing else changes between pairs:

  python train.py --config configs/multi30k_hour.py:en-de --workdir runs/hour_en_de \
      --config.manual_dir=../shared/data/multi30k
  python train.py --config configs/multi30k_hour.py:en-fr --workdir runs/hour_en_fr \
      --config.manual_dir=../shared/data/multi30k

Checkpoints every 100 updates, the last 5 kept (`eval.py --average_checkpoints K`).
"""

from configs import multi30k_transformer

PAIRS = ("en-de", "en-fr")


def get_config(pair: str = "en-de"):
    if pair not in PAIRS:
        raise ValueError(f"configs/multi30k_hour.py:{pair}: use one of {', '.join(PAIRS)}")
    config = multi30k_transformer.get_config()
    config.dataset = f"multi30k/{pair}"
    config.lowercase = True
    config.vocab_size = 4000
    config.model_hparams.activation_dropout_rate = 0.0
    config.num_train_steps = 1950
    config.warmup_steps = 400
    config.eval_every = 650
    config.checkpoint_every = 150
    return config
