"""decoding.beam_search's policies against the peers' own beam search: transformers' `generate` and
CTranslate2's `translate_batch` on an imported random Marian model whose outputs end with EOS at many
lengths (the toy-step and brute-force checks are in test_beam_policies.py)."""

import numpy as np
import pytest

import decoding
from decoding.beam_search import STOPPING

MAX_NEW = 16  # generated tokens at most, EOS included
# No repeated bigrams, here and in the peers alike: random weights otherwise loop on a token.
NGRAM = 2
PENALTIES = (0.6, 1.0, 2.0)
# seqzoo's beam_stopping and the transformers early_stopping it reproduces (docs/design.md).
EARLY_STOPPING = {"exact": "never", "heuristic": False, "nbest": True}


def eos_competing_marian(directory, *, seed: int, std: float, eos_bias: float):
    """A tiny Marian directory in opus-mt's layout (conftest's `make_tiny_marian`, shared vocabulary,
    pad last) re-drawn so that its outputs depend on the source and end with EOS at many lengths: weights N(0, std^2), LayerNorms at identity, the
    decoder-start (pad) embedding zero as in opus-mt (CTranslate2 starts from a zero vector), a logit
    bias of `eos_bias` on EOS and of -1e4 on pad."""
    import torch
    import transformers
    from conftest import make_tiny_marian

    make_tiny_marian(directory, shared=True, seed=seed)
    model = transformers.MarianMTModel.from_pretrained(directory)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "embed_positions" in name:  # sinusoidal, not learned
                continue
            if "layer_norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))
        for embeddings in (model.get_input_embeddings(), model.get_decoder().embed_tokens):
            embeddings.weight[model.config.pad_token_id] = 0.0
        model.final_logits_bias.zero_()
        model.final_logits_bias[0, model.config.eos_token_id] = eos_bias
        # Pad never has probability: seqzoo and transformers mask it after the softmax, CTranslate2
        # drops it from the vocabulary before (which would renormalize the others).
        model.final_logits_bias[0, model.config.pad_token_id] = -1e4
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    """The `eos_competing_marian` model in transformers and imported into seqzoo, and 64 source
    sentences: a namespace of `directory`, `hf`, `tokenizer`, `run`, `batch` (transformers' padded
    batch, torch) and `src` (its ids, int32 `[64, src_len]`)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from types import SimpleNamespace

    from conftest import marian_corpus

    from evaluation import loading
    from experiment import pretrained

    root = tmp_path_factory.mktemp("eos_marian")
    directory = eos_competing_marian(root / "hf", seed=1, std=0.8, eos_bias=4.0)
    pretrained.import_marian(directory, root / "run", max_len=32, max_decode_len=MAX_NEW)
    tokenizer = transformers.MarianTokenizer.from_pretrained(directory)
    batch = tokenizer(marian_corpus(7, 64), return_tensors="pt", padding=True)
    return SimpleNamespace(
        directory=directory,
        hf=transformers.MarianMTModel.from_pretrained(directory).eval(),
        tokenizer=tokenizer,
        run=loading.Run(root / "run"),
        batch=batch,
        src=batch["input_ids"].numpy().astype(np.int32),
    )


def seqzoo_beam(
    marian, beam: int, alpha: float, policy: str, stopping: str, ngram: int = NGRAM
) -> list[list[int]]:
    """Each sentence's best hypothesis (ids up to EOS) from `decode_programs.decode_fn`."""
    from conftest import until_eos

    from experiment import decode_programs

    settings = decoding.DecodeSettings(
        decode="beam",
        beam_size=beam,
        alpha=alpha,
        length_penalty="average",
        max_decode_len=MAX_NEW,
        no_repeat_ngram_size=ngram or None,
        beam_policy=policy,
        beam_stopping=stopping,
    )
    run = marian.run
    result = decode_programs.decode_fn(run.model, settings, run.mesh)(
        run.decoding_params, marian.src, alpha
    )
    sequences = decode_programs.best_sequences(result)
    return [until_eos(row, run.special_ids) for row in sequences]


def generate(marian, beam: int, alpha: float, early_stopping) -> list[list[int]]:
    """transformers' `generate` with `length_penalty=alpha`: each output's ids up to EOS. Pad is a
    bad word (seqzoo never generates it) and no EOS is forced at the limit (seqzoo forces none)."""
    import torch
    from conftest import until_eos

    with torch.no_grad():
        out = marian.hf.generate(
            **marian.batch,
            num_beams=beam,
            length_penalty=alpha,
            early_stopping=early_stopping,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            bad_words_ids=[[marian.run.special_ids.pad]],
            forced_eos_token_id=None,
            no_repeat_ngram_size=NGRAM,
        )
    return [until_eos(row, marian.run.special_ids) for row in out[:, 1:].tolist()]


def ended_by_eos(outputs, eos: int) -> float:
    """The fraction of `outputs` that end with EOS before the limit of `MAX_NEW` tokens."""
    return float(np.mean([len(row) < MAX_NEW and row[-1] == eos for row in outputs]))


@pytest.mark.parametrize("stopping", STOPPING)
@pytest.mark.parametrize("beam", [4, 5])
def test_the_full_policy_gives_generates_tokens_when_eos_competes(marian, beam, stopping):
    outputs = []
    for alpha in PENALTIES:
        theirs = generate(marian, beam, alpha, EARLY_STOPPING[stopping])
        mine = seqzoo_beam(marian, beam, alpha, "full", stopping)
        differ = [i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b]
        assert not differ, f"alpha {alpha}: sentences {differ} differ from generate's"
        outputs += theirs
    # EOS competes: most outputs end before the limit (with alpha 2 and the exact rule most run to
    # it: a T^2 normalization favours length, and that search finds the long ones).
    assert ended_by_eos(outputs, marian.run.special_ids.eos) >= 0.5


def test_the_classic_policy_does_not_give_generates_tokens(marian):
    # The finding, and what makes the test above discriminating: once EOS competes for beam
    # places, the classic policy returns other outputs than transformers' for some sentences.
    theirs = generate(marian, 4, 2.0, "never")
    mine = seqzoo_beam(marian, 4, 2.0, "classic", "exact")
    assert sum(a != b for a, b in zip(mine, theirs, strict=True)) >= len(theirs) // 4


@pytest.mark.parametrize("beam", [4, 5])
def test_full_nbest_gives_ctranslate2s_tokens(marian, tmp_path, beam):
    # Without n-gram blocking: CTranslate2 masks blocked tokens before its log-softmax, which
    # renormalizes the others; seqzoo and transformers mask after it (docs/design.md).
    ctranslate2 = pytest.importorskip("ctranslate2")  # benchmarks/requirements.txt
    ctranslate2.converters.TransformersConverter(str(marian.directory)).convert(
        str(tmp_path / "ct2")
    )
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu")
    sources = [marian.tokenizer.convert_ids_to_tokens(row) for row in marian.batch["input_ids"]]
    sources = [[piece for piece in row if piece != "<pad>"] for row in sources]
    outputs = []
    for alpha in PENALTIES:
        results = translator.translate_batch(
            sources,
            beam_size=beam,
            length_penalty=alpha,
            max_decoding_length=MAX_NEW,
            min_decoding_length=0,  # its default, 1, is seqzoo's min_len=1
            return_end_token=True,
        )
        theirs = [marian.tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in results]
        mine = seqzoo_beam(marian, beam, alpha, "full", "nbest", ngram=0)
        differ = [i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b]
        assert not differ, f"alpha {alpha}: sentences {differ} differ from translate_batch's"
        outputs += theirs
    assert ended_by_eos(outputs, marian.run.special_ids.eos) >= 0.5
