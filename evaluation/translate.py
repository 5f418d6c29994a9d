"""Translate user text: the lines of a file or stdin, one sentence per line, in order."""

from collections.abc import Callable, Iterable

import numpy as np

from data import input_pipeline
from decoding import DecodeSettings
from evaluation.decode_report import decode_batches
from evaluation.loading import Run, notice
from experiment import RunError


def utf8_lines(lines: Iterable[bytes], name: str):
    """The lines of a binary stream as text; raises a one-line `RunError` at the first line that is
    not UTF-8 (naming it), after every line before it has been yielded."""
    for number, raw in enumerate(lines, start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading BOM is no text
        except UnicodeDecodeError as e:
            raise RunError(
                f"{name} line {number} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                f"{e.start + 1}); the lines before it are translated: convert the file to UTF-8 "
                "(e.g. `iconv -f latin1 -t utf-8`) and translate from that line"
            ) from None


def translate_lines(
    run: Run,
    lines: Iterable[str],
    settings: DecodeSettings,
    batch_size: int,
    sink: Callable[[str, dict | None], None],
    nbest: int = 0,
    *,
    tsv: bool = False,
    tokens: bool = False,
    name: str = "--input",
) -> None:
    """Translates user text, one sentence per line. Empty lines are skipped and lines longer than
    `max_len - 1` tokens (room for EOS) truncated, each with a notice on stderr. Output lines stay
    aligned with input lines (an empty input line gives an empty output line); each is passed to
    `sink(text, record or None)` (`decode_batches`' records) as soon as it and every line before it
    are translated, so an error in a later line (e.g. one that is not UTF-8) loses nothing before it.

    With `tsv`, each line is `source<TAB>prefix`: the translation starts with the prefix (tokenized
    by the target tokenizer; an empty prefix leaves it free); a line without exactly one tab, or a
    prefix with no room for EOS under `max_decode_len`, stops with a one-line `RunError` naming it.

    Batches are `[batch_size, L]` with L from a fixed set (`input_pipeline.source_lengths`), and
    prefixes `[batch_size, P]` with P from the same set (below `max_decode_len`): each shape
    compiles once, however many chunks the input makes. A sentence's sampling key derives from its
    line number.
    """
    limit = run.config.max_len - 1
    pending: list[tuple[int, list[int], list[int]]] = []
    outputs: dict[int, str] = {}
    next_to_write = 0

    def flush(force=False):
        nonlocal next_to_write, pending
        while pending and (force or len(pending) >= batch_size):
            chunk, pending = pending[:batch_size], pending[batch_size:]
            batches = input_pipeline.source_batches(
                run.config, [ids for _, ids, _ in chunk], batch_size, run.special_ids
            )
            (batch,) = batches  # one chunk of at most batch_size lines is one batch
            batch["example_ids"] = np.array(
                [n for n, _, _ in chunk] + [0] * (batch_size - len(chunk))
            )
            if tsv:
                batch["prefix"] = prefix_array(
                    [p for _, _, p in chunk], batch_size, settings, run.special_ids.pad
                )
            hyps: list[tuple[str, dict | None]] = []
            decode_batches(
                run, batches, settings, lambda *d, hyps=hyps: hyps.append(d), nbest, tokens
            )
            for (index, _, _), hyp in zip(chunk, hyps, strict=True):
                outputs[index] = hyp
        while next_to_write in outputs:
            sink(*outputs.pop(next_to_write))
            next_to_write += 1

    try:
        for number, line in enumerate(lines):
            line = line.rstrip("\r\n")
            prefix: list[int] = []
            if tsv and line.strip():  # an empty line is skipped below, in either format
                line, prefix = split_prefix(run, line, number, settings, name)
            text = line.strip()
            if not text:
                notice(f"line {number + 1} is empty: skipped")
                outputs[number] = ("", empty_record(nbest, settings, tokens))
                flush()
                continue
            ids = run.src_tokenizer.encode(text.lower() if run.config.lowercase else text)
            if len(ids) > limit:
                notice(
                    f"line {number + 1} has {len(ids)} tokens: truncated to {limit} "
                    f"(max_len={run.config.max_len} with EOS)"
                )
                ids = ids[:limit]
            pending.append((number, ids, prefix))
            flush()
    except RunError:  # a bad line: what came before it is still translated and written
        flush(force=True)
        raise
    flush(force=True)


def split_prefix(run: Run, line: str, number: int, settings: DecodeSettings, name: str):
    """(source text, target prefix ids) of a `source<TAB>prefix` line; one-line `RunError`s for a
    line without exactly one tab or a prefix that leaves no room for EOS."""
    fields = line.split("\t")
    if len(fields) != 2:
        raise RunError(
            f"{name} line {number + 1} has {len(fields)} tab-separated fields: with "
            "--input_format tsv each line is `source<TAB>prefix` (the prefix may be empty); the "
            "lines before it are translated"
        )
    source, prefix_text = fields
    prefix_text = prefix_text.strip().lower() if run.config.lowercase else prefix_text.strip()
    prefix = run.tgt_tokenizer.encode(prefix_text) if prefix_text else []
    if len(prefix) >= settings.max_decode_len:
        raise RunError(
            f"{name} line {number + 1}: the prefix has {len(prefix)} tokens, which leaves no room "
            f"for EOS under --max_decode_len={settings.max_decode_len}: shorten it to at most "
            f"{settings.max_decode_len - 1} tokens or raise --max_decode_len; the lines before it "
            "are translated"
        )
    return source, prefix


def prefix_array(
    prefixes: list[list[int]], batch_size: int, settings: DecodeSettings, pad_id: int
) -> np.ndarray:
    """int32 `[batch_size, P]`, the prefixes padded with `pad_id`; P the least of
    `input_pipeline.source_lengths` that fits them, below `max_decode_len`."""
    longest = max(map(len, prefixes), default=0)
    widths = [w for w in input_pipeline.source_lengths(settings.max_decode_len) if w >= longest]
    width = min(min(widths, default=longest), settings.max_decode_len - 1)
    out = np.full((batch_size, max(width, 1)), pad_id, np.int32)
    for row, prefix in enumerate(prefixes):
        out[row, : len(prefix)] = prefix
    return out


def empty_record(nbest: int, settings: DecodeSettings, tokens: bool) -> dict | None:
    """The record of a skipped (empty) line: empty lists where `decode_batches` would fill them."""
    record = {}
    if nbest:
        record["hypotheses"] = []
    if settings.num_samples > 1:
        record["samples"] = []
    if tokens:
        record.update(tokens=[], token_log_probs=[])
    return record or None
