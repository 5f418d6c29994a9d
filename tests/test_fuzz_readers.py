"""Fuzz the readers of a run folder: random truncations and byte flips of its config.json, tokenizer
files, integrity records and data_plan.json, each read by the code that reads it (eval's `Run`, a
resume's checks, `tokenizers.load`). Every case ends in a one-line `RunError` / `DataError` naming
the run folder (or, for a model field of config.json, the model registry's one-line ValueError), a
checkpoint set aside, or a run that still reads; never another exception, and the folder is left as
it was (set-asides apart): nothing half-written. What still reads is damage that no check sees
without a checksum of the file: a flipped key of a field that then takes its default, a flipped piece
score of a SentencePiece model.

Seeded; SEQZOO_FUZZ_CASES=<n> (default 50) and SEQZOO_FUZZ_SEED=<s> run more by hand, e.g.
`SEQZOO_FUZZ_CASES=2000 SEQZOO_FUZZ_SEED=1 python -m pytest -q tests/test_fuzz_readers.py`.
"""

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_config

from data import DataError, tokenizers
from experiment import RunError, checkpoints
from experiment import config as run_config

COUNT = int(os.environ.get("SEQZOO_FUZZ_CASES", "50"))
SEED = int(os.environ.get("SEQZOO_FUZZ_SEED", "0"))
SAMPLE = "Thursday, March 3, 2001 -> 2001-03-03 (é)"


def read_with_run(workdir: Path, target: str, config) -> None:
    """What eval.py reads: config, tokenizers, the best checkpoint (verified, restored)."""
    from evaluation import loading

    loading.Run(workdir)


def read_with_resume(workdir: Path, target: str, config) -> None:
    """What a resume reads before training: config.json against the config, data_plan.json, the
    newest intact periodic checkpoint (damaged or unfinished newer ones set aside)."""
    run_config.check_resumable(config, run_config.load_config(workdir), workdir)
    run_config.check_data_plan(workdir, [(16, 36, 12)])
    assert checkpoints.newest_intact_step(workdir) in (10, 20)


def read_tokenizer(workdir: Path, target: str, config) -> None:
    """`tokenizers.load` of the target's folder, then a round trip through what it loaded."""
    tokenizer = tokenizers.load((workdir / target).parent)
    tokenizer.decode(tokenizer.encode(SAMPLE))


# (the damaged file, relative to the run folder; who reads it)
TARGETS = (
    ("config.json", read_with_run),
    ("config.json", read_with_resume),
    ("tokenizer/src/tokenizer.json", read_with_run),
    ("tokenizer/tgt/tokenizer.json", read_tokenizer),
    ("tokenizer/sp/tokenizer.json", read_tokenizer),
    ("tokenizer/sp/spm.model", read_tokenizer),
    ("checkpoints/20/integrity.json", read_with_resume),
    ("best/20/integrity.json", read_with_run),
    ("data_plan.json", read_with_resume),
)


def damage(data: bytes, rng: np.random.Generator) -> bytes:
    """`data` cut at a random length (a third of the cases) or with 1-3 random bytes flipped."""
    if rng.random() < 1 / 3:
        return data[: int(rng.integers(0, len(data)))]
    damaged = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        damaged[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))
    return bytes(damaged)


def contents(root: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `root`, a set-aside checkpoint
    (`<step>.damaged`, `<step>.unfinished`) counted under its step."""
    return {
        re.sub(r"^(\w+/\d+)\.(damaged|unfinished)\d*/", r"\1/", str(p.relative_to(root))): (
            hashlib.sha256(p.read_bytes()).hexdigest()
        )
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run_folder(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run with a SentencePiece tokenizer beside its own (`tokenizer/sp`)."""
    folder = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(tiny_run[0], folder)
    texts = [f"{d} March {y}, {d:02d}/03/{y}" for d in range(1, 29) for y in range(1990, 2010)]
    sp = tokenizers.SentencePieceTokenizer.train(texts, vocab_size=300, model_type="unigram")
    sp.save(folder / "tokenizer" / "sp")
    return folder


@pytest.mark.parametrize("case", range(COUNT))
def test_a_damaged_run_file_is_a_one_line_error_or_a_set_aside(
    case, run_folder, tmp_path, tfds_data_dir, tokenizer_dir, capsys
):
    rng = np.random.default_rng([SEED, case])
    target, read = TARGETS[case % len(TARGETS)]
    workdir = tmp_path / "run"
    shutil.copytree(run_folder, workdir)
    path = workdir / target
    path.write_bytes(damage(path.read_bytes(), rng))
    before = contents(workdir)
    config = tiny_run_config(tfds_data_dir, tokenizer_dir)
    try:
        read(workdir, target, config)
    except (RunError, DataError) as e:
        assert "\n" not in str(e) and str(workdir) in str(e), str(e)  # one line naming where
    except ValueError as e:
        # The model registry's own one-line errors for a model field of config.json that a flip
        # changed (e.g. "unknown model 'attentiob_rnn': use one of ..."; eval.py and train.py print
        # ValueErrors as one line). A parse error (UnicodeDecodeError, JSONDecodeError) that gets
        # out is a reader's bug.
        assert type(e) is ValueError and target == "config.json", repr(e)
        assert "\n" not in str(e), str(e)
    assert contents(workdir) == before, "a reader wrote to the run folder"
    set_aside = [p.name for p in workdir.glob("*/*") if re.fullmatch(r"\d+\.\w+", p.name)]
    assert set_aside in ([], ["20.damaged"]), set_aside
    if set_aside:
        assert "checkpoints/20 is damaged (" in capsys.readouterr().err


def test_a_tokenizer_of_an_unknown_kind_is_refused(run_folder, tmp_path):
    # One flipped letter of "sentencepiece" (the fuzz cases found it loading as SentencePiece).
    folder = tmp_path / "sp"
    shutil.copytree(run_folder / "tokenizer" / "sp", folder)
    meta = folder / "tokenizer.json"
    meta.write_text(meta.read_text().replace("sentencepiece", "sentencepiecf"))
    with pytest.raises(DataError, match=r"no readable tokenizer in .*kind 'sentencepiecf' is none"):
        tokenizers.load(folder)
