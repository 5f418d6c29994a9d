"""The decode benchmark's baselines, each run in its own process by `benchmarks/decode.py`:
HuggingFace transformers' `MarianMTModel.generate` and CTranslate2's `Translator.translate_batch`,
both on seqzoo's weights (saved by the seqzoo system as `weights.npz` in the benchmark's workdir).
"""

import time
from pathlib import Path

import numpy as np

from benchmarks.decode_workload import (
    Config,
    cell_name,
    cell_result,
    log,
    sources,
    special_ids,
    time_runs,
    transformer_hparams,
)

MARIAN_PAD = "<pad>"  # CTranslate2's Marian loader drops a last vocabulary entry named so


def vocabulary(config: Config) -> list[str]:
    """Token strings by id; the last id is Marian's pad (transformers and CTranslate2 need one)."""
    ids = special_ids(config)
    special = {ids.pad: "<blank>", ids.bos: "<s>", ids.eos: "</s>", ids.unk: "<unk>"}
    if config.shape == "opus-mt-en-de":
        special = {0: "</s>", 1: "<unk>"}
    words = [special.get(i, f"w{i}") for i in range(config.vocab_size)]
    words[-1] = MARIAN_PAD
    return words


def marian_model(config: Config, workdir: Path):
    """transformers' MarianMTModel of the benchmark size holding seqzoo's weights, saved (with a
    word-level tokenizer for CTranslate2's converter) to `workdir/marian`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models

    from interop import marian as mapping

    fields = mapping.config_from_hparams(transformer_hparams(config))
    fields.update(dropout=0.0, forced_eos_token_id=None, pad_token_id=config.vocab_size - 1)
    fields.pop("model_type")
    fields.pop("architectures")
    marian = transformers.MarianConfig(**fields)
    torch.manual_seed(config.seed)
    model = transformers.MarianMTModel(marian).eval()
    weights = {k: torch.from_numpy(v) for k, v in np.load(workdir / "weights.npz").items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {  # and the positional tables, which transformers computes itself
        "lm_head.weight",
        "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight",
        "model.encoder.embed_positions.weight",
        "model.decoder.embed_positions.weight",
    }
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"weights do not fit MarianMTModel: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    out = workdir / "marian"
    model.save_pretrained(out)
    words = vocabulary(config)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token=MARIAN_PAD
    ).save_pretrained(out)
    return model


def torch_device(config: Config):
    """torch's device for `config.device`; on the GPU float32 matmuls stay float32 (no TF32), as
    seqzoo's run at "highest" precision there, so that both compute the same tokens."""
    import torch

    if config.device != "gpu":
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda")


def run_transformers(config: Config, family: str, workdir: Path) -> dict:
    import torch
    import transformers

    del family
    torch.set_num_threads(config.threads)
    device = torch_device(config)
    model = marian_model(config, workdir).to(device, getattr(torch, config.dtype))
    if config.quantize == "int8":  # int8 weights, activations quantized per row at run time
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    src_all = torch.from_numpy(sources(config).astype(np.int64)).to(device)
    ids = special_ids(config)
    suppressed = sorted({ids.pad, ids.bos})  # never generated, as in seqzoo
    cells = []
    for beam, batch in config.cells():
        src = src_all[:batch]

        def run(beam=beam, src=src):
            with torch.inference_mode():
                out = model.generate(
                    input_ids=src,
                    attention_mask=torch.ones_like(src),
                    num_beams=beam,
                    do_sample=False,
                    min_new_tokens=config.gen_len,
                    max_new_tokens=config.gen_len,
                    suppress_tokens=suppressed,
                    num_return_sequences=1,
                )
                return out.cpu()  # waits for the GPU

        start = time.perf_counter()
        run()
        first_s = time.perf_counter() - start
        seconds, out = time_runs(run, config)
        tokens = out[:, 1:].numpy()  # drop the decoder start token
        cells.append(cell_result(config, beam, batch, seconds, tokens, first_call_s=first_s))
        log(f"transformers {cell_name(beam, batch)}: {cells[-1]['tokens_per_s']:.0f} tokens/s")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    return {"cells": cells, "versions": versions, "threads": torch.get_num_threads()}


def run_ctranslate2(config: Config, family: str, workdir: Path) -> dict:
    import ctranslate2

    del family
    marian = workdir / "marian"
    if not (marian / "config.json").is_file():
        raise RuntimeError("the converted Marian model needs the transformers system to run first")
    converted = workdir / "ct2"
    start = time.perf_counter()
    ctranslate2.converters.TransformersConverter(str(marian)).convert(str(converted), force=True)
    convert_s = time.perf_counter() - start
    translator = ctranslate2.Translator(
        str(converted),
        device="cuda" if config.device == "gpu" else "cpu",
        compute_type="int8" if config.quantize == "int8" else config.dtype,
        inter_threads=1,
        intra_threads=config.threads,
    )
    words = vocabulary(config)
    ids = {w: i for i, w in enumerate(words)}
    # Pad and BOS, unless the converter dropped them (Marian's last entry, <pad>: never generated).
    pad_bos = {special_ids(config).pad, special_ids(config).bos}
    suppressed = [[words[i]] for i in sorted(pad_bos) if words[i] != MARIAN_PAD]
    src_all = [[words[i] for i in row] for row in sources(config)]
    cells = []
    for beam, batch in config.cells():

        def run(beam=beam, batch=batch):
            return translator.translate_batch(
                src_all[:batch],
                beam_size=beam,
                min_decoding_length=config.gen_len,
                max_decoding_length=config.gen_len,
                suppress_sequences=suppressed,
                num_hypotheses=1,
                max_batch_size=0,
            )

        start = time.perf_counter()
        run()
        first_s = time.perf_counter() - start
        seconds, out = time_runs(run, config)
        tokens = [[ids[w] for w in result.hypotheses[0]] for result in out]
        cells.append(cell_result(config, beam, batch, seconds, tokens, first_call_s=first_s))
        log(f"ctranslate2 {cell_name(beam, batch)}: {cells[-1]['tokens_per_s']:.0f} tokens/s")
    versions = {"ctranslate2": ctranslate2.__version__}
    return {"cells": cells, "versions": versions, "convert_s": convert_s}
