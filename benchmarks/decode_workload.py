"""What every system of the decode benchmark decodes, and how one cell is measured: the sizes
(`Config`, `--shape`), the shared source sentences, the special ids and the timing of a cell.
Imported by `benchmarks/decode.py` (seqzoo's side and the harness) and `benchmarks/baselines.py`.
"""

import dataclasses
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python benchmarks/decode.py)
    sys.path.insert(0, str(REPO))
from contracts import SpecialIds  # noqa: E402

FIRST_WORD_ID = 4  # sources are drawn from the ordinary tokens [4, vocab)


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 8000
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 3  # encoder and decoder each
    ffn_dim: int = 1024
    max_positions: int = 256  # positional table (model max_len), both frameworks
    rnn_embed_dim: int = 256
    rnn_hidden_dim: int = 256
    src_len: int = 20
    gen_len: int = 32
    batch_sizes: tuple[int, ...] = (1, 32)
    beam_sizes: tuple[int, ...] = (1, 4)  # 1 is greedy decoding
    runs: int = 5
    warmup: int = 2
    threads: int = 2
    seed: int = 0
    device: str = "cpu"  # "gpu": XLA and torch on the GPU (CTranslate2 on CUDA)
    shape: str = "seqzoo"  # or "opus-mt-en-de" (SHAPES)
    dtype: str = (
        "float32"  # "bfloat16": every system computes in bfloat16 (float32 weights in seqzoo)
    )
    # "int8": int8 weights and products in every system (seqzoo: `models.int8.quantize_params`;
    # CTranslate2: compute_type "int8"; transformers: torch's dynamic quantization of the Linears).
    quantize: str = "none"

    def cells(self) -> list[tuple[int, int]]:
        """(beam, batch) pairs, greedy first."""
        return [(beam, batch) for beam in self.beam_sizes for batch in self.batch_sizes]


CONFIG = Config()
QUICK = Config(
    vocab_size=64,
    d_model=32,
    num_heads=2,
    num_layers=1,
    ffn_dim=64,
    max_positions=16,
    rnn_embed_dim=16,
    rnn_hidden_dim=32,
    src_len=5,
    gen_len=4,
    batch_sizes=(1, 2),
    beam_sizes=(1, 2),
    runs=2,
    warmup=1,
)

# The Transformer sizes of each --shape (the rest of the config as CONFIG).
SHAPES = {
    "seqzoo": {},
    "opus-mt-en-de": dict(
        vocab_size=58101, d_model=512, num_heads=8, num_layers=6, ffn_dim=2048, max_positions=512
    ),
}


def shaped_config(shape: str, quick: bool = False, **fields) -> Config:
    """The workload at `shape`'s sizes (`SHAPES`), or `QUICK`'s tiny ones (a smoke run), with
    `fields` replaced; a one-line ValueError for `quick` with a real size."""
    if quick and shape != "seqzoo":
        raise ValueError(f"--shape {shape} is a real size: drop --quick")
    base = QUICK if quick else CONFIG
    return dataclasses.replace(base, shape=shape, **SHAPES[shape], **fields)


def cell_name(beam: int, batch: int) -> str:
    return f"{'greedy' if beam == 1 else f'beam{beam}'} b{batch}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sources(config: Config) -> np.ndarray:
    """int32 `[max batch, src_len]` source ids, the same for every system."""
    rng = np.random.default_rng(config.seed)
    shape = (max(config.batch_sizes), config.src_len)
    last = config.vocab_size - 1  # the Marian models' pad
    return rng.integers(FIRST_WORD_ID, last, size=shape).astype(np.int32)


def marian_config(config: Config) -> dict:
    """The `config.json` of opus-mt-en-de's architecture at `config`'s sizes (`--shape`)."""
    return {
        "model_type": "marian",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "encoder_layers": config.num_layers,
        "decoder_layers": config.num_layers,
        "encoder_attention_heads": config.num_heads,
        "decoder_attention_heads": config.num_heads,
        "encoder_ffn_dim": config.ffn_dim,
        "decoder_ffn_dim": config.ffn_dim,
        "activation_function": "swish",
        "max_position_embeddings": config.max_positions,
        "scale_embedding": True,
        "dropout": 0.0,
        "pad_token_id": config.vocab_size - 1,
        "eos_token_id": 0,
        "decoder_start_token_id": config.vocab_size - 1,
        "share_encoder_decoder_embeddings": True,
    }


def transformer_hparams(config: Config) -> dict:
    """The benchmark Transformer's hyperparameters, vocabulary sizes and special ids included."""
    if config.shape == "opus-mt-en-de":
        from interop import marian

        return marian.hparams_from_config(marian_config(config))
    return dict(
        src_vocab_size=config.vocab_size,
        tgt_vocab_size=config.vocab_size,
        d_model=config.d_model,
        num_heads=config.num_heads,
        num_encoder_layers=config.num_layers,
        num_decoder_layers=config.num_layers,
        ffn_dim=config.ffn_dim,
        pre_ln=False,
        share_embeddings=True,
        tie_output=True,
        activation="relu",
        max_positions=config.max_positions,
    )


def special_ids(config: Config) -> SpecialIds:
    hparams = transformer_hparams(config)
    return SpecialIds(
        hparams.get("pad_id", 0), hparams.get("bos_id", 1), hparams.get("eos_id", 2), 3
    )


def time_runs(run, config: Config) -> tuple[list[float], object]:
    """`warmup` untimed then `runs` timed calls of `run()` (which must block until done)."""
    for _ in range(config.warmup):
        run()
    seconds, out = [], None
    for _ in range(config.runs):
        start = time.perf_counter()
        out = run()
        seconds.append(time.perf_counter() - start)
    return seconds, out


def cell_result(config, beam, batch, seconds, tokens, **extra) -> dict:
    """One cell's figures; `tokens` int `[batch, gen_len]` is the best hypothesis of each sentence."""
    ms = 1e3 * np.asarray(seconds)
    tokens = np.asarray(tokens)
    if tokens.shape != (batch, config.gen_len):
        raise RuntimeError(
            f"{cell_name(beam, batch)}: got tokens {tokens.shape}, not {batch} x "
            f"{config.gen_len}: the system did not generate exactly gen_len tokens"
        )
    return {
        "cell": cell_name(beam, batch),
        "beam": beam,
        "batch": batch,
        "runs": len(seconds),
        "ms_median": float(np.median(ms)),
        "ms_min": float(ms.min()),
        "ms_max": float(ms.max()),
        "tokens_per_s": batch * config.gen_len / float(np.median(seconds)),
        "peak_rss_mb": peak_rss_mb(),
        "tokens": tokens.tolist(),
        **extra,
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def xla_options(pairs: list[str]) -> dict[str, str]:
    """`NAME=VALUE` command-line strings as XLA compile options; a one-line ValueError otherwise."""
    bad = [pair for pair in pairs if "=" not in pair]
    if bad:
        raise ValueError(f"XLA option {bad[0]!r}: write it as NAME=VALUE")
    return dict(pair.split("=", 1) for pair in pairs)
