"""Default experiment: the dates task (human-readable dates -> ISO) with a Bahdanau attention RNN.

`python train.py` runs this. Every field can be overridden on the command line, e.g.
`python train.py --config.num_train_steps=500 --config.model_hparams.hidden_dim=64`.
"""

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from decoding import DecodeSettings


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data (see data/input_pipeline.py).
    config.dataset = "dates"
    config.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None: ~/tensorflow_datasets.
    config.manual_dir = config_dict.placeholder(str)  # Local copy of downloadable data (Multi30k).
    config.tokenizer = "char"  # "char" | "sentencepiece".
    config.vocab_size = 8000  # SentencePiece only.
    config.sp_model_type = "unigram"  # "unigram" | "bpe".
    config.shared_vocab = True  # One tokenizer for source and target.
    # Lowercase what the model reads and writes (the Multi30k papers' convention); references keep
    # their case, so cased sacreBLEU says what it costs and bleu_lc_tok compares with the papers.
    config.lowercase = False
    # Subword sampling (Kudo 2018): each epoch reads every training pair in one of its
    # `sp_sampling_nbest` best segmentations, drawn with probability ~ exp(alpha x log-probability);
    # evaluation reads the best. Unigram SentencePiece only; 0: off.
    config.sp_sampling_nbest = 0
    config.sp_sampling_alpha = 0.2
    # Where trained tokenizers are cached, by a hash of their training text and options (each run
    # also keeps a copy in <workdir>/tokenizer); None: ~/.cache/seqzoo/tokenizers.
    config.tokenizer_dir = config_dict.placeholder(str)
    # Longest training example, in tokens with EOS (source) or BOS (target): longer pairs are
    # dropped and counted; evaluation examples are truncated to it.
    config.max_len = 64
    config.batch_size = 64  # Sentences per batch (when tokens_per_batch == 0).
    config.tokens_per_batch = 0  # > 0: batch by padded tokens (batch x longer side) instead.
    config.num_buckets = 4  # Length buckets (batch shapes, so train-step compilations).
    config.eval_batch_size = 128

    # Model (see models/registry.py for the defaults these override).
    config.model = "attention_rnn"
    config.model_hparams = ml_collections.ConfigDict(
        {"cell": "gru", "embed_dim": 64, "hidden_dim": 128, "attention_dim": 64}
    )
    # Mixed precision: the computation dtype (matmuls, activations, the KV cache) and the parameters'.
    # "bfloat16" computes in bfloat16 on float32 parameters and optimizer state; LayerNorm statistics,
    # softmax, logits, the loss and decoding's scores stay float32 whatever it is.
    config.dtype = "float32"
    config.param_dtype = "float32"

    # Optimization.
    config.num_train_steps = 3000
    config.learning_rate = 3e-3
    config.warmup_steps = 200
    config.schedule = "cosine"  # "cosine" | "rsqrt" | "constant".
    config.weight_decay = 0.0
    config.grad_clip_norm = 1.0  # Global-norm gradient clipping; 0: none.
    config.label_smoothing = 0.0

    # Evaluation, logging, checkpoints.
    config.log_every = 50
    config.eval_every = 500
    config.num_eval_examples = 1000  # Validation examples decoded at each eval (0 = all).
    config.num_samples_to_log = 3
    # The metric the run is judged by: it selects the best checkpoint and leads the validation line
    # and the learning curves. "exact_match" | "bleu" | "bleu_lc_tok" | "chrf".
    config.eval_metric = "exact_match"
    # How validation decodes: a decoding.DecodeSettings (its fields' help says what each does), e.g.
    # --config.decoding.beam_size=8.
    config.decoding = decoding_config(DecodeSettings(decode="greedy", max_decode_len=16))
    # The config.decoding fields eval.py and the Translator decode with unless given (the others are
    # DecodeSettings' defaults): a trained run's length limits; an imported model adds its own
    # generation settings (beam size, length penalty, ...: convert.py import).
    config.eval_decoding = ("max_decode_len", "max_decode_len_a", "max_decode_len_b")
    config.checkpoint_every = 500
    # > 0: validate / checkpoint every this many epochs instead (the anchors' epoch checkpoints, so
    # average_last_checkpoints averages the last K epochs); updates per epoch come from the batches.
    config.eval_every_epochs = 0.0
    config.checkpoint_every_epochs = 0.0
    # > 0: stop once this many validations in a row have not lowered the lowest validation loss
    # (fairseq's --patience; counted across resumes from metrics.jsonl); 0: train num_train_steps.
    config.early_stopping_patience = 0
    # > 0: when training ends, the mean of the last K periodic checkpoints is validated too
    # (`validation_averaged` in metrics.jsonl; `eval.py --average_checkpoints K` evaluates it).
    config.average_last_checkpoints = 0
    config.keep_checkpoints = 3  # Periodic checkpoints kept (the latest); best/ keeps one more.
    # A run directory to start from (e.g. an imported opus-mt model, `convert.py import`): its model,
    # model_hparams, tokenizers and params replace this config's; the data and training are this
    # config's (fine-tuning). "": train from config.seed's initialization.
    config.init_from = ""

    # Scale-out (see sharding.py): a (data, fsdp) device mesh over every device of every host.
    # Batches are split over all devices; params and optimizer state are sharded over `fsdp` and
    # replicated over `data`. data=-1: the devices fsdp leaves. A checkpoint restores on any mesh.
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    # Multi-host: jax.distributed.initialize() before training. The address (host:port of
    # process 0), process count and id are detected on Cloud TPU pods, SLURM and Open MPI;
    # elsewhere pass them.
    config.distributed = False
    config.coordinator_address = config_dict.placeholder(str)
    config.num_processes = config_dict.placeholder(int)
    config.process_id = config_dict.placeholder(int)
    return config


def decoding_config(settings: DecodeSettings) -> ml_collections.ConfigDict:
    """`settings` as a sub-config: a field per `DecodeSettings` field (a None one a placeholder of its
    type, so `--config.decoding.<field>=value` can set it); `DecodeSettings(**config.decoding)`
    turns it back."""
    types = typing.get_type_hints(DecodeSettings)
    fields = {}
    for field in dataclasses.fields(DecodeSettings):
        value = getattr(settings, field.name)
        if value is None:
            kind = next(k for k in typing.get_args(types[field.name]) if k is not type(None))
            value = config_dict.placeholder(kind)
        fields[field.name] = value
    return ml_collections.ConfigDict(fields)
