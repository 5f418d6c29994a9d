"""Translate user text: the lines of a file or stdin, one sentence per line, in order."""

from collections.abc import Callable, Iterable

from data import input_pipeline
from evaluation.decode_report import decode_batches
from evaluation.loading import Run, Search, notice
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
    search: Search,
    batch_size: int,
    sink: Callable[[str, dict | None], None],
    nbest: int = 0,
) -> None:
    """Translates user text, one sentence per line. Empty lines are skipped and lines longer than
    `max_len - 1` tokens (room for EOS) truncated, each with a notice on stderr. Output lines stay
    aligned with input lines (an empty input line gives an empty output line); each is passed to
    `sink(text, nbest record or None)` as soon as it and every line before it are translated, so an
    error in a later line (e.g. one that is not UTF-8) loses nothing before it.

    Batches are `[batch_size, L]` with L from a fixed set (`input_pipeline.source_lengths`): each
    shape compiles once, however many chunks the input makes.
    """
    limit = run.config.max_len - 1
    pending: list[tuple[int, list[int]]] = []
    outputs: dict[int, str] = {}
    next_to_write = 0

    def flush(force=False):
        nonlocal next_to_write, pending
        while pending and (force or len(pending) >= batch_size):
            chunk, pending = pending[:batch_size], pending[batch_size:]
            batches = input_pipeline.source_batches(
                run.config, [ids for _, ids in chunk], batch_size
            )
            hyps: list[tuple[str, dict | None]] = []
            decode_batches(run, batches, search, lambda *d, hyps=hyps: hyps.append(d), nbest)
            for (index, _), hyp in zip(chunk, hyps, strict=True):
                outputs[index] = hyp
        while next_to_write in outputs:
            sink(*outputs.pop(next_to_write))
            next_to_write += 1

    try:
        for number, line in enumerate(lines):
            text = line.rstrip("\n").strip()
            if not text:
                notice(f"line {number + 1} is empty: skipped")
                outputs[number] = ("", {"hypotheses": []} if nbest else None)
                flush()
                continue
            ids = run.src_tokenizer.encode(text)
            if len(ids) > limit:
                notice(
                    f"line {number + 1} has {len(ids)} tokens: truncated to {limit} "
                    f"(max_len={run.config.max_len} with EOS)"
                )
                ids = ids[:limit]
            pending.append((number, ids))
            flush()
    except RunError:  # a bad line: what came before it is still translated and written
        flush(force=True)
        raise
    flush(force=True)
