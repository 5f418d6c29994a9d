r"""Convert models between transformers' Marian format (the opus-mt models) and seqzoo run directories.

  python convert.py import ~/models/opus-mt-en-de runs/opus-mt-en-de \
      --dataset multi30k/en-de --manual_dir ../shared/data/multi30k
  python eval.py --workdir runs/opus-mt-en-de          # as the model's generation settings say
  python convert.py export runs/m30k_tiny exported/m30k-tiny     # a post-LN Transformer run

An imported directory is a run directory (config.json, tokenizer/, pretrained/0): eval.py, its
sweep and error analysis, and `train.py --config.init_from=DIR` read it like a trained run; it
decodes with the model's own generation settings (generation_config.json) unless told otherwise.
Nothing is downloaded: point at a local directory (interop/marian_import.py; the run directory:
experiment/pretrained.py). Export writes the run's best params, or the mean of its last K
(interop/marian_export.py).
"""

import argparse
import shlex
import sys
from pathlib import Path

from evaluation import loading
from experiment import RunError, pretrained
from interop import marian_export


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imports = commands.add_parser("import", help="a Marian directory -> a seqzoo run directory")
    imports.add_argument("marian_dir")
    imports.add_argument("workdir")
    imports.add_argument("--dataset", help="what eval.py evaluates, e.g. multi30k/en-de")
    imports.add_argument("--manual_dir", help="local copy of the dataset (Multi30k)")
    imports.add_argument("--data_dir", help="TFDS data_dir")
    imports.add_argument("--max_len", type=int, default=128, help="longest source, in tokens")
    imports.add_argument(
        "--max_decode_len",
        type=int,
        help="most generated tokens (default: the model's max_length - 1, else 128)",
    )
    exports = commands.add_parser("export", help="a seqzoo Transformer run -> a Marian directory")
    exports.add_argument("workdir")
    exports.add_argument("marian_dir")
    exports.add_argument(
        "--average_checkpoints", type=int, default=0, help="export the mean of the last K"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            config = pretrained.import_marian(
                args.marian_dir,
                args.workdir,
                dataset=args.dataset,
                manual_dir=args.manual_dir,
                data_dir=args.data_dir,
                max_len=args.max_len,
                max_decode_len=args.max_decode_len,
            )
            print(
                f"imported {args.marian_dir} ({config.model_hparams.d_model} wide) to {args.workdir}"
            )
            for command in next_commands(args.workdir, config):
                print(f"next: {command}")
        else:
            run = loading.Run(Path(args.workdir), args.average_checkpoints)
            out = marian_export.write_directory(
                args.marian_dir, run.model, run.params, run.src_tokenizer, run.tgt_tokenizer
            )
            print(f"exported {args.workdir} to {out}")
    except (RunError, ValueError) as e:
        sys.exit(f"error: {e}")
    return 0


def next_commands(workdir: str, config) -> list[str]:
    """The commands that use an imported run: translate a line; score the dataset it names."""
    run = shlex.quote(str(workdir))
    commands = [f'echo "Hello world." | python eval.py --workdir {run} --input -']
    if config.dataset:
        commands.append(f"python eval.py --workdir {run}   # scores {config.dataset}'s test split")
    return commands


if __name__ == "__main__":
    sys.exit(main())
