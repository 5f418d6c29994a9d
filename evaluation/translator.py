"""Translate text from Python: `Translator`, the layer under eval.py's `--input`.

  from evaluation.translator import Translator
  translator = Translator.from_run("runs/default")      # or Translator.from_marian("~/models/opus-mt-en-de")
  for t in translator.translate(["3 May 1979", "Thursday, May 3, 1979"], beam_size=4):
      print(t.text, t.score)

`translate`'s options are `decoding.DecodeSettings` fields; what is not given is the run's
(`settings_for`: the `config.decoding` fields its `config.eval_decoding` names, e.g. an imported
model's own generation settings) or `DecodeSettings`' default, exactly as eval.py's flags. Bad
options are the same one-line `RunError`s as eval.py's (without the flags' `--`).
"""

import dataclasses
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import sharding
from decoding import DecodeSettings
from evaluation import translate
from evaluation.loading import Run
from experiment import RunError, pretrained
from models import registry

OPTIONS = tuple(f.name for f in dataclasses.fields(DecodeSettings))


@dataclasses.dataclass(frozen=True)
class Translation:
    """One sentence's translation: its `text`, `score` (beam search: the length-normalized score it
    won by; greedy and sampling: its log-probability) and `log_prob` (the sum of its tokens'
    log-probabilities, EOS included); with `nbest`, `hypotheses`, the K best as dicts of `text`,
    `score`, `log_prob` and `length`, best first. An empty line gives text "" and scores 0."""

    text: str
    score: float
    log_prob: float
    hypotheses: list[dict] | None = None


def settings_for(config, given: dict, prefix: str = "") -> DecodeSettings:
    """The settings to decode run `config` with: `given` (DecodeSettings fields) over the run's
    `config.decoding` fields named by `config.eval_decoding`, over `DecodeSettings`' defaults. A bad
    name or value is a one-line `RunError` naming `<prefix><field>` (eval.py: prefix "--")."""
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise RunError(
            f"{prefix}{unknown[0]} is not a decoding option: use one of {', '.join(OPTIONS)}"
        )
    from_run = {name: config.decoding[name] for name in config.eval_decoding}
    try:
        return DecodeSettings(**{**from_run, **given}).check(prefix)
    except (TypeError, ValueError) as e:
        raise RunError(str(e)) from None


def check_nbest(nbest: int, settings: DecodeSettings, prefix: str = "") -> None:
    """One-line `RunError`s for an n-best list of `nbest` hypotheses that beam search under
    `settings` cannot give."""
    if nbest < 0:
        raise RunError(f"{prefix}nbest={nbest}: use K >= 1 (or 0 for no n-best file)")
    if nbest and (settings.decode != "beam" or nbest > settings.beam_size):
        raise RunError(
            f"{prefix}nbest={nbest} needs {prefix}decode beam with {prefix}beam_size >= {nbest} "
            f"(got {prefix}decode {settings.decode}, {prefix}beam_size {settings.beam_size}): beam "
            "search returns beam_size hypotheses per sentence"
        )


class Translator:
    """A text run (trained here or imported) that translates sentences, in order, in batches of
    `batch_size` (default the run's `eval_batch_size`, rounded up to a multiple of the devices;
    each batch shape compiles once and is reused by every later call)."""

    def __init__(self, run: Run, batch_size: int | None = None, *, owns=None):
        if registry.reads_images(run.model):
            raise RunError(
                f"a Translator translates text, but {run.config.model} reads images: evaluate a "
                "split instead (eval.py --split)"
            )
        self.run = run
        self.batch_size = sharding.round_up(batch_size or run.config.eval_batch_size, run.mesh)
        self._owns = owns  # the temporary directory of an imported run, removed with this

    @classmethod
    def from_run(
        cls, workdir, *, batch_size: int | None = None, average_checkpoints=0, quantize="none"
    ) -> "Translator":
        """The run in `workdir` (its best checkpoint; eval.py's `--average_checkpoints`,
        `--quantize`)."""
        return cls(Run(Path(workdir).expanduser(), average_checkpoints, quantize), batch_size)

    @classmethod
    def from_marian(
        cls, marian_dir, workdir=None, *, batch_size: int | None = None, **import_fields
    ) -> "Translator":
        """The transformers Marian (opus-mt) model in `marian_dir`, imported as `convert.py import`
        does (`experiment.pretrained.import_marian`, `import_fields` as its) into `workdir`, or,
        without one, into a temporary directory removed with the translator."""
        owns = None
        if workdir is None:
            owns = tempfile.TemporaryDirectory(prefix="seqzoo-marian-")
            workdir = Path(owns.name) / "run"
        workdir = Path(workdir).expanduser()
        pretrained.import_marian(Path(marian_dir).expanduser(), workdir, **import_fields)
        return cls(Run(workdir), batch_size, owns=owns)

    def settings(self, prefix: str = "", **options) -> DecodeSettings:
        """The settings `options` give on this run (`settings_for`)."""
        return settings_for(self.run.config, options, prefix)

    def translate(self, sentences: Sequence[str], *, nbest: int = 0, **options) -> list:
        """`Translation`s of `sentences` (a list of str), in order; `options` are `DecodeSettings`
        fields (e.g. `beam_size=5, length_penalty="average", alpha=1.0`), `nbest` K > 0 adds each
        sentence's K best hypotheses (beam search, K <= beam_size)."""
        if isinstance(sentences, str | bytes):
            raise RunError("translate() takes a list of sentences, not one string: use [text]")
        for number, sentence in enumerate(sentences, start=1):
            if not isinstance(sentence, str):
                raise RunError(
                    f"sentence {number} is a {type(sentence).__name__}, not text: pass str"
                )
        settings = self.settings(**options)
        check_nbest(nbest, settings)
        beam = settings.decode == "beam"
        out = []

        def collect(text: str, record: dict | None) -> None:
            record = record or {}
            hypotheses = record.get("hypotheses") or [{}]
            log_prob = float(record.get("log_prob", 0.0))
            score = float(hypotheses[0].get("score", 0.0)) if beam else log_prob
            kept = record.get("hypotheses") if nbest else None
            out.append(Translation(text, score, log_prob, kept[:nbest] if kept else kept))

        # The best hypothesis's record gives its log-probability, the n-best its score.
        self.stream(sentences, collect, settings, max(nbest, 1) if beam else 0, tokens=True)
        return out

    def stream(
        self,
        lines: Iterable[str],
        sink: Callable[[str, dict | None], None],
        settings: DecodeSettings,
        nbest: int = 0,
        *,
        tsv: bool = False,
        tokens: bool = False,
        name: str = "--input",
    ) -> None:
        """Translates `lines` one sentence a line, each passed to `sink(text, record)` as soon as it
        and every line before it are done (`evaluation.translate.translate_lines`: empty lines,
        truncation, `tsv` prefixes, the records)."""
        translate.translate_lines(
            self.run,
            lines,
            settings,
            self.batch_size,
            sink,
            nbest,
            tsv=tsv,
            tokens=tokens,
            name=name,
        )
