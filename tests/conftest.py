"""Shared session fixtures and scaffolding: a prepared TFDS data_dir, Multi30k's raw files, data
configs, toy batches and step functions. The data layer (tfds, grain) is imported only by the
fixtures that use it, so the model and decoding tests collect with jax, flax and optax alone.

- `tfds_data_dir`: a session TFDS data_dir with `dates/tiny` prepared.
- `multi30k_dir`: the raw Multi30k directory (`$SEQZOO_MULTI30K_DIR`, else
  `<repo>/../shared/data/multi30k`); skips the test without it, fails it under CI.
- `multi30k_data_dir`: `tfds_data_dir` with `multi30k/en-de` prepared too (once per session).
- `tokenizer_dir`: a session tokenizer cache, so each tokenizer is trained once per session.
- `dates_config()` / `multi30k_config()`: fresh ConfigDicts for `input_pipeline.get_datasets`.
- `dates_data` / `multi30k_data`: `get_datasets` of those configs, built once per session.
- `tiny_run`: a 20-step tiny dates run (once per session); `eval_options(**fields)`: eval.py's
  options for it; `validation_head(run, count)`: a loaded run's first validation examples.
- `damage_checkpoint(step_dir)`: flips bytes in a checkpoint's array data.
- `SRC`, `TGT_IN`, `TGT_OUT`, `SRC_MASK`: four toy sentence pairs for the model tests,
  `TINY_TRANSFORMER`: the hyperparameters of a Transformer that compiles in seconds, and
  `overfit(model, params, batch)`: Adam on one batch until the model knows it.
- `prefix_hash_step_fn(table)`, `prefix_log_probs(table, h, tokens)`, `counting_steps(step_fn,
  steps)`: a model-free step function for the decoding tests, its numpy reference, a step counter.
- `tiny_marian`: tiny transformers Marian directories (shared and separate vocabularies),
  `converted`: them imported as runs (`marian_batch`, `until_eos`, `marian_decode`: the
  Marian tests' batches and decoding, with `MARIAN_SENTENCES`, `MARIAN_MAX_NEW`, `MARIAN_NGRAM`).
"""

import json
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import pytest

REPO = Path(__file__).resolve().parents[1]

# Four examples: trailing source padding, targets of different lengths (BOS=1, EOS=2, pad=0).
# numpy, not jax arrays: importing conftest must not start a JAX backend (the multi-host workers of
# test_sharding.py import it before jax.distributed.initialize).
SRC = np.array(
    [[5, 6, 7, 8, 9, 0], [4, 10, 3, 0, 0, 0], [7, 7, 8, 0, 0, 0], [9, 4, 5, 6, 0, 0]], np.int32
)
TGT_IN = np.array(
    [[1, 4, 5, 6, 7, 0], [1, 8, 9, 0, 0, 0], [1, 10, 11, 12, 0, 0], [1, 6, 5, 4, 3, 12]], np.int32
)
TGT_OUT = np.array(
    [[4, 5, 6, 7, 2, 0], [8, 9, 2, 0, 0, 0], [10, 11, 12, 2, 0, 0], [6, 5, 4, 3, 12, 2]], np.int32
)
SRC_MASK = SRC != 0

# A Transformer small enough to compile in seconds (the model, int8 and decoding tests).
TINY_TRANSFORMER = dict(
    d_model=32,
    num_heads=4,
    num_encoder_layers=2,
    num_decoder_layers=2,
    ffn_dim=64,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    max_positions=16,
)


def overfit(model, params, batch=None, *, steps: int = 200, learning_rate: float = 1e-2):
    """`model` trained from `params` with Adam on one batch (`{"src", "tgt_in", "tgt_out"}`;
    default the four toy pairs), teacher-forced, no dropout; returns (params, losses per step)."""
    from experiment import programs

    batch = batch or {"src": SRC, "tgt_in": TGT_IN, "tgt_out": TGT_OUT}
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(params):
            logits = model.apply({"params": params}, batch["src"], batch["tgt_in"], train=False)
            loss_sum, tokens = programs.cross_entropy(logits, batch["tgt_out"])
            return loss_sum / tokens

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = optimizer.init(params), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return params, losses


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory) -> Path:
    from data import datasets

    data_dir = tmp_path_factory.mktemp("tfds")
    datasets.prepare(datasets.builder("dates/tiny", data_dir=data_dir))
    return data_dir


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    from data import multi30k

    env = os.environ.get(multi30k.ENV_VAR)
    directory = Path(env) if env else REPO.parent / "shared" / "data" / "multi30k"
    missing = multi30k.missing_files(directory, multi30k.LANGUAGES) if directory.is_dir() else []
    if directory.is_dir() and not missing:
        return directory
    reason = (
        f"Multi30k raw files not found in {directory} ({', '.join(missing) or 'no directory'}): "
        f"set {multi30k.ENV_VAR} to a directory holding {{train,val,test_2016_flickr}}."
        f"{{en,de,fr}}.gz, from {multi30k.DOWNLOAD_URL.format(file='<split>.<lang>.gz')}"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def multi30k_data_dir(tfds_data_dir, multi30k_dir) -> Path:
    from data import datasets

    builder = datasets.builder("multi30k/en-de", data_dir=tfds_data_dir, manual_dir=multi30k_dir)
    datasets.prepare(builder)
    return tfds_data_dir


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


def data_config(**fields) -> ml_collections.ConfigDict:
    """A `get_datasets` config: small defaults, overridden by `fields`."""
    config = dict(
        dataset="dates/tiny",
        data_dir=None,
        manual_dir=None,
        tokenizer="char",
        vocab_size=1000,
        sp_model_type="bpe",
        shared_vocab=False,
        tokenizer_dir=None,
        max_len=48,
        batch_size=32,
        tokens_per_batch=0,
        seed=0,
        eval_batch_size=32,
        num_buckets=4,
        lowercase=False,
    )
    config.update(fields)
    return ml_collections.ConfigDict(config)


def dates_fields(data_dir, tokenizer_dir) -> dict:
    return {"data_dir": str(data_dir), "tokenizer_dir": str(tokenizer_dir)}


def multi30k_fields(data_dir, raw_dir, tokenizer_dir) -> dict:
    """multi30k/en-de with separate 1000-piece BPE vocabularies."""
    return {
        "dataset": "multi30k/en-de",
        "data_dir": str(data_dir),
        "manual_dir": str(raw_dir),
        "tokenizer": "sentencepiece",
        "tokenizer_dir": str(tokenizer_dir),
        "max_len": 64,
    }


@pytest.fixture
def dates_config(tfds_data_dir, tokenizer_dir):
    """A factory: `dates_config(**overrides)` -> ConfigDict for dates/tiny with characters."""
    fields = dates_fields(tfds_data_dir, tokenizer_dir)
    return lambda **overrides: data_config(**{**fields, **overrides})


@pytest.fixture
def multi30k_config(multi30k_data_dir, multi30k_dir, tokenizer_dir):
    """A factory: `multi30k_config(**overrides)` -> ConfigDict for multi30k/en-de."""
    fields = multi30k_fields(multi30k_data_dir, multi30k_dir, tokenizer_dir)
    return lambda **overrides: data_config(**{**fields, **overrides})


@pytest.fixture(scope="session")
def dates_data(tfds_data_dir, tokenizer_dir):
    from data import input_pipeline

    return input_pipeline.get_datasets(data_config(**dates_fields(tfds_data_dir, tokenizer_dir)))


@pytest.fixture(scope="session")
def multi30k_data(multi30k_data_dir, multi30k_dir, tokenizer_dir):
    from data import input_pipeline

    fields = multi30k_fields(multi30k_data_dir, multi30k_dir, tokenizer_dir)
    return input_pipeline.get_datasets(data_config(**fields))


def tiny_run_config(data_dir, tokenizer_dir, **overrides) -> ml_collections.ConfigDict:
    """configs/tiny_dates.py on the session's data and tokenizer cache."""
    from configs import tiny_dates

    config = tiny_dates.get_config()
    config.data_dir = str(data_dir)
    config.tokenizer_dir = str(tokenizer_dir)
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tfds_data_dir, tokenizer_dir):
    """One uninterrupted 20-step tiny dates run: (workdir, final train state, last metrics).

    Tests must not modify its workdir (copy it first).
    """
    from experiment import training

    workdir = tmp_path_factory.mktemp("tiny_run")
    state, metrics = training.train_and_evaluate(
        tiny_run_config(tfds_data_dir, tokenizer_dir), workdir
    )
    return workdir, state, metrics


def eval_options(**fields):
    """eval.py's `Options` for the tiny run's tests, as its flags would give them: `fields` are
    `Options` and `DecodeSettings` fields (the latter go to `Options.decoding`; None: not given);
    the validation split and its first 40 examples unless they say otherwise."""
    import dataclasses

    import eval as eval_script
    from decoding import DecodeSettings

    names = {f.name for f in dataclasses.fields(DecodeSettings)}
    decoding = {k: v for k, v in fields.items() if k in names and v is not None}
    fields = {k: v for k, v in fields.items() if k not in names}
    return eval_script.Options(
        **{"split": "validation", "num_examples": 40, **fields}, decoding=decoding
    )


def validation_head(run, count: int):
    """The first `count` validation examples of a loaded run (`evaluation.loading.Run`)."""
    from data import input_pipeline

    data = input_pipeline.get_eval_data(
        run.config, "validation", run.src_tokenizer, run.tgt_tokenizer
    )
    return input_pipeline.head(data, count)


def damage_checkpoint(step_dir: Path) -> Path:
    """Flips 64 bytes in the middle of the largest file of checkpoint `step_dir` (array data), as a
    failing disk would; returns that file."""
    files = (p for p in step_dir.rglob("*") if p.is_file() and p.name != "integrity.json")
    path = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))
    return path


HASH_ROWS = 101  # rows of the decoding tests' logit tables, indexed by a hash of the prefix


def prefix_hash_step_fn(table):
    """A model-free step function: logits `table[h]` where `h` int32 `[N]` (the state) hashes the
    whole prefix, `h <- (31 h + token + 1) mod HASH_ROWS`."""

    def step_fn(tokens, h):
        h = (h * 31 + tokens + 1) % HASH_ROWS
        return table[h], h

    return step_fn


def prefix_log_probs(table, h: int, tokens, bos_id: int = 1) -> np.ndarray:
    """float64 `[len(tokens), vocab]`: `prefix_hash_step_fn(table)`'s log-probabilities before each
    of `tokens` (one sentence starting from state `h`), in plain numpy."""
    table, out, previous = np.asarray(table, np.float64), [], bos_id
    for token in tokens:
        h = (h * 31 + previous + 1) % HASH_ROWS
        out.append(table[h] - np.log(np.sum(np.exp(table[h]))))
        previous = token
    return np.array(out)


def counting_steps(step_fn, steps: list):
    """`step_fn` that appends to `steps` (on the host) each time a decoding loop runs it."""

    def counted(tokens, state):
        jax.debug.callback(lambda: steps.append(1))
        return step_fn(tokens, state)

    return counted


# ------------------------------------------------------------------ a tiny transformers Marian model

MARIAN_WORDS = (
    "a man woman dog cat sits runs on the street with red blue ball young girl boy plays in water "
    "january march may june 1 2 3 4 5 6 7 8 9 0 , . monday thursday ein eine mann frau hund auf der "
    "strasse mit rotem ball spielt im wasser junge mädchen"
).split()


def marian_corpus(seed: int, count: int = 300) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(MARIAN_WORDS, rng.integers(2, 9))) for _ in range(count)]


def make_tiny_marian(directory: Path, *, shared: bool, seed: int = 0) -> Path:
    """A transformers `MarianMTModel` (2+2 layers, d_model 16, swish, scaled embeddings, a random
    final_logits_bias) trained by torch for a few seconds to copy sentences (random weights give
    one repeated token whatever the source), saved with a tiny SentencePiece tokenizer pair as an
    opus-mt directory. Shared: vocab.json with opus-mt's layout (EOS 0, UNK 1, ..., pad last,
    decoding from pad); separate: vocab.json and target_vocab.json of different sizes, pad 2 in
    both."""
    import io

    import sentencepiece as spm
    import torch
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    pieces = {}
    for side, corpus_seed in (("source", seed), ("target", seed + 1)):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(marian_corpus(corpus_seed)),
            model_writer=model,
            vocab_size=60 if side == "source" else 52,
            model_type="unigram",
            character_coverage=1.0,
            minloglevel=2,
        )
        (directory / f"{side}.spm").write_bytes(model.getvalue())
        sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
        pieces[side] = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if i > 2]

    def vocabulary(words, pad_last):
        vocab = {"</s>": 0, "<unk>": 1} if pad_last else {"</s>": 0, "<unk>": 1, "<pad>": 2}
        for word in words:
            vocab.setdefault(word, len(vocab))
        if pad_last:
            vocab["<pad>"] = len(vocab)
        return vocab

    if shared:
        vocab = vocabulary(pieces["source"] + pieces["target"], pad_last=True)
        src_vocab = tgt_vocab = vocab
    else:
        src_vocab = vocabulary(pieces["source"], pad_last=False)
        tgt_vocab = vocabulary(pieces["target"], pad_last=False)
    (directory / "vocab.json").write_text(json.dumps(src_vocab))
    if not shared:
        (directory / "target_vocab.json").write_text(json.dumps(tgt_vocab))
    (directory / "tokenizer_config.json").write_text(json.dumps({"separate_vocabs": not shared}))
    pad = src_vocab["<pad>"]
    config = transformers.MarianConfig(
        vocab_size=len(src_vocab),
        decoder_vocab_size=len(tgt_vocab),
        share_encoder_decoder_embeddings=shared,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        activation_function="swish",
        max_position_embeddings=64,
        scale_embedding=True,
        pad_token_id=pad,
        eos_token_id=0,
        decoder_start_token_id=pad,
        forced_eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "embed_positions" not in name:
                param.normal_(0.0, 0.4)
        model.final_logits_bias.normal_(0.0, 0.5)
        model.final_logits_bias[0, 0] += 1.0  # EOS: likelier, so some sentences end early
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_marian(tmp_path_factory) -> dict:
    """{"shared": dir, "separate": dir} of `make_tiny_marian` models (skips without transformers)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("marian")
    return {
        kind: make_tiny_marian(root / kind, shared=kind == "shared", seed=i)
        for i, kind in enumerate(("shared", "separate"))
    }


MARIAN_SENTENCES = [
    "a man sits on the street",
    "the dog runs",
    "young girl plays with red ball in water , .",
    "ein mann",
]
MARIAN_MAX_NEW = 12
# Random weights repeat one token whatever the source; without repeated bigrams (here and in
# transformers alike) the hypotheses differ and their scores do not tie.
MARIAN_NGRAM = 2


@pytest.fixture(scope="session")
def converted(tiny_marian, tmp_path_factory) -> dict:
    """kind -> (hf model, hf tokenizer, seqzoo Run) of `tiny_marian`'s shared and separate models,
    imported by `experiment.pretrained.import_marian` (skips without torch)."""
    pytest.importorskip("torch")
    import transformers

    from evaluation import loading
    from experiment import pretrained

    out = {}
    root = tmp_path_factory.mktemp("converted")
    for kind, directory in tiny_marian.items():
        workdir = root / kind
        pretrained.import_marian(directory, workdir, max_len=32, max_decode_len=MARIAN_MAX_NEW)
        hf = transformers.MarianMTModel.from_pretrained(directory).eval()
        tokenizer = transformers.MarianTokenizer.from_pretrained(directory)
        out[kind] = (hf, tokenizer, loading.Run(workdir))
    return out


def marian_batch(tokenizer, sentences=MARIAN_SENTENCES):
    """transformers' padded batch (torch tensors) of `sentences`."""
    return tokenizer(sentences, return_tensors="pt", padding=True)


def until_eos(row, ids) -> list[int]:
    """`row` up to and including its first EOS (or without its trailing pad, if it has none)."""
    row = list(row)
    if ids.eos in row:
        return row[: row.index(ids.eos) + 1]
    while row and row[-1] == ids.pad:
        row.pop()
    return row


def marian_decode(run, tokenizer, decode, beam=1, alpha=0.0) -> list[list[str]]:
    """The target pieces (up to EOS) that `run` decodes for `MARIAN_SENTENCES` as transformers'
    `tokenizer` encodes them."""
    from decoding import DecodeSettings
    from experiment import decode_programs

    src = marian_batch(tokenizer)["input_ids"].numpy().astype(np.int32)
    settings = DecodeSettings(
        decode, beam, alpha, "average", MARIAN_MAX_NEW, no_repeat_ngram_size=MARIAN_NGRAM
    )
    result = decode_programs.decode_fn(run.model, settings, run.mesh)(
        run.decoding_params, src, alpha
    )
    sequences = decode_programs.best_sequences(result)
    return [run.tgt_tokenizer.pieces(until_eos(row, run.special_ids)) for row in sequences]
