"""Lists of 1-5 dates -> their ISO forms (`dates/lists`): long inputs, the course's case for attention.

The argument after the colon picks the model; everything else is shared, so the two runs differ only
in attention:

  python train.py --config configs/dates_lists.py:seq2seq_rnn --workdir runs/dates_lists_seq2seq_rnn
  python train.py --config configs/dates_lists.py:attention_rnn --workdir runs/dates_lists_attention_rnn
  python eval.py --workdir runs/dates_lists_seq2seq_rnn   # exact match by source length
"""

from configs import dates_seq2seq_rnn, default

MODELS = {"attention_rnn": default, "seq2seq_rnn": dates_seq2seq_rnn}


def get_config(model: str = "attention_rnn"):
    if model not in MODELS:
        raise ValueError(f"configs/dates_lists.py:{model}: use one of {', '.join(MODELS)}")
    config = MODELS[model].get_config()  # the model of the single-date run of that name
    config.dataset = "dates/lists"
    config.max_len = 192  # sources run to ~180 characters
    config.decoding.max_decode_len = 56  # 5 ISO dates, 4 spaces and EOS
    config.num_eval_examples = 500
    return config
