r"""Train a seqzoo model.

  python train.py                                   # dates + attention RNN (configs/default.py)
  python train.py --config configs/multi30k_transformer.py --workdir runs/m30k_tf \
      --config.manual_dir=../shared/data/multi30k
  python train.py --config.mesh.fsdp=4              # params and optimizer state over 4 devices

Runs on every device (of every host) with jax.sharding (experiment/training.py). Multi-host: the same
command on every host with `--config.distributed=True` (docs/accelerators.md). Pointing --workdir at an
existing run resumes it from its newest intact checkpoint, so an interrupted run ends with exactly
the params of an uninterrupted one.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from experiment import RunError, metrics, training
from experiment import config as run_config


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: use --config.key=value flags")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    workdir = Path(FLAGS.workdir)
    try:
        _, last = training.train_and_evaluate(FLAGS.config, workdir)
    except (RunError, ValueError) as e:  # DataError is a ValueError
        sys.exit(f"error: {e}")
    print(f"checkpoints: {workdir}/checkpoints (best: {workdir}/best)")
    print(f"metrics:     {workdir}/{metrics.METRICS_FILE}")
    print(f"plot:        {workdir}/learning_curves.png")
    if last:  # the run's metric first (its config's eval_metric), the others after it
        print(f"validation:  {metrics.summary(last, FLAGS.config.eval_metric)}")
    print(f"next:        python eval.py --workdir {workdir}")


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    with run_config.flag_errors():
        config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.")
    flags.DEFINE_string("workdir", "runs/default", "Run directory: checkpoints, metrics, plots.")
    app.run(main, flags_parser=run_config.parse_flags)
