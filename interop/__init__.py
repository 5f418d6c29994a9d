"""Other frameworks' models in and out of seqzoo: transformers' Marian (opus-mt) directories.

- `interop.marian`: the mapping, pure functions on dicts: a Marian `config.json` <-> Transformer
  hyperparameters, a Marian state dict <-> Transformer params.
- `interop.marian_import`: a Marian model directory read and checked (config, weights, tokenizers).
- `interop.marian_export`: a seqzoo Transformer (model, params, tokenizers) written as one.
- `interop.staging`: a directory written whole or not at all.

interop stands beside models/ and data/: it imports them and contracts, never experiment/ or
evaluation/, which call into it (`experiment.pretrained`: an imported model as a run directory;
convert.py: the command line).
"""


class InteropError(ValueError):
    """A model directory or mapping seqzoo cannot read or write; the message is one line naming
    the problem and the fix."""
