"""A Marian model's generation settings, as its authors publish translations with transformers'
`generate`, in seqzoo's terms (`decoding.DecodeSettings` fields).

`read(directory, hparams)` reads `generation_config.json` (else the generation fields of
`config.json`, where older uploads keep them) and maps what `generate` would use: `num_beams`
(default 1: greedy) -> `decode`, `beam_size`; `length_penalty` (default 1.0; transformers divides
by length^p) -> `length_penalty="average"`, `alpha=p`; `early_stopping` (default False) ->
`beam_stopping` (False: heuristic, True: nbest, "never": exact) with `beam_policy="full"`
(transformers keeps the beam full); `max_new_tokens`, else `max_length` - 1 (transformers counts
the decoder start) -> `max_decode_len` (absent: left to the importer); `no_repeat_ngram_size`.
`bad_words_ids` of the pad token alone is seqzoo's own rule (pad is never generated); other bad
words, and sampling, are not applied: each is a note for the user. `forced_eos_token_id` is not
applied either (seqzoo leaves a hypothesis at the length limit unfinished; docs/pretrained.md).
"""

import json
from pathlib import Path

from contracts import is_int
from decoding import DecodeSettings
from interop import InteropError

# The DecodeSettings fields `read` may set (the beam policy ones where DecodeSettings has them).
FIELDS = tuple(
    name
    for name in (
        "decode",
        "beam_size",
        "length_penalty",
        "alpha",
        "max_decode_len",
        "no_repeat_ngram_size",
        "beam_policy",
        "beam_stopping",
    )
    if name in DecodeSettings.__dataclass_fields__
)
STOPPING = {False: "heuristic", True: "nbest", "never": "exact"}  # early_stopping -> beam_stopping


def read(directory: Path, hparams: dict) -> tuple[dict, list[str]]:
    """(DecodeSettings fields, notes) of the Marian directory's generation settings; `hparams` are
    its Transformer hyperparameters (`marian.hparams_from_config`: pad, EOS, decoder start).
    `InteropError` naming the file and field for a value of the wrong type."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        path = Path(directory) / "config.json"
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise InteropError(f"{path} is not readable JSON ({e}): restore the file") from None
    if not isinstance(values, dict):
        raise InteropError(f"{path} holds a JSON {type(values).__name__}, not an object")

    def value(key, check, what, default=None):
        found = values.get(key)
        if found is None:
            return default
        if not check(found):
            raise InteropError(
                f"{path} has {key} {json.dumps(found)}, not {what}: restore the model's own"
            )
        return found

    count = (lambda v: is_int(v) and v >= 1, "a positive integer")
    beams = value("num_beams", *count, default=1)
    penalty = value("length_penalty", lambda v: is_int(v) or isinstance(v, float), "a number", 1.0)
    stopping = value(
        "early_stopping",
        lambda v: isinstance(v, bool) or v == "never",
        "true, false or 'never'",
        False,
    )
    ngram = value("no_repeat_ngram_size", lambda v: is_int(v) and v >= 0, "an integer >= 0", 0)
    settings = {
        "decode": "beam" if beams > 1 else "greedy",
        "beam_size": beams,
        "length_penalty": "average",
        "alpha": float(penalty),
        "no_repeat_ngram_size": ngram or None,
        "beam_policy": "full",
        "beam_stopping": STOPPING[stopping],
    }
    new_tokens = value("max_new_tokens", *count)
    max_length = value("max_length", lambda v: is_int(v) and v >= 2, "an integer >= 2")
    if new_tokens or max_length:
        settings["max_decode_len"] = new_tokens or max_length - 1
    start = value("decoder_start_token_id", is_int, "a token id", hparams["bos_id"])
    if start != hparams["bos_id"]:
        raise InteropError(
            f"{path} has decoder_start_token_id {start}, but config.json {hparams['bos_id']}: "
            "use the files that came with the weights"
        )
    notes = []
    bad = value("bad_words_ids", lambda v: isinstance(v, list), "a list of token-id lists", [])
    other = [ids for ids in bad if ids != [hparams["pad_id"]]]
    if other:
        notes.append(
            f"{path.name} forbids the words {json.dumps(other)[:80]}: seqzoo does not apply "
            "bad_words_ids other than pad"
        )
    if values.get("do_sample"):
        notes.append(
            f"{path.name} sets do_sample: seqzoo imports {settings['decode']} search; sample "
            "with eval.py --decode sample"
        )
    return {k: v for k, v in settings.items() if k in FIELDS}, notes
