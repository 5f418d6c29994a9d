"""What train.py and eval.py share, one module per responsibility.

- `experiment.config`: a run directory's config (write once, read, check on resume), flag errors.
- `experiment.checkpoints`: periodic and best checkpoints with integrity records, resume, averaging.
- `experiment.programs`: the model, its special ids, initial params, optimizer and loss.
- `experiment.decode_programs`: the jitted decode (`decode_fn`, a `decoding.DecodeSettings` whole) and
  score programs that train.py, eval.py, the benchmarks and the tests all build the same way.
- `experiment.metrics`: BLEU/chrF/exact match, quality by source length, `metrics.jsonl`.
- `experiment.plots`: learning and quality curves, attention figures (PNG files).
- `experiment.training`: the train state, the train step and the training loop.
- `experiment.pretrained`: transformers Marian (opus-mt) directories imported as runs (`interop`),
  fine-tuning from one (`init_from`).

A run lives in a workdir:
  config.json          the config the run started with (written once; eval.py and resumes read it)
  resumes.jsonl        one line per resume: the step it resumed from and the fields it changed
  tokenizer/{src,tgt}/ the run's tokenizers
  checkpoints/<step>/  periodic checkpoints (params, optimizer state, step, data-iterator state) and
                       their integrity record (`integrity.json`: a SHA-256 per file)
  best/<step>/         the params with the best validation metric (and their integrity record)
  pretrained/0/        an imported model's params (experiment/pretrained.py: a converted opus-mt model
                       is a run directory with config.json, tokenizer/ and this)
  metrics.jsonl        one JSON object per line: {"step", "split", metric: value, ...}
  learning_curves.png
"""


class RunError(Exception):
    """A problem with a run's workdir, config or checkpoint; its message is one line saying the fix."""
