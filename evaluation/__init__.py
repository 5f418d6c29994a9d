"""eval.py's jobs, one module each.

- `evaluation.loading`: a trained run loaded for evaluation (`Run`); how to decode it is a
  `decoding.DecodeSettings`.
- `evaluation.decode_report`: decode a split and report its metrics and speed.
- `evaluation.sweep`: greedy and beam 1/2/4/8, with and without length normalization.
- `evaluation.error_analysis`: beam-search error analysis (blame the search or the model).
- `evaluation.translator`: `Translator`, the Python API (`from_run`, `from_marian`, `translate`),
  which eval.py's --input streams through; `evaluation.translate`: its batching of lines.
- `evaluation.attention`: attention heatmaps.
"""
