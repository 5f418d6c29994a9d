"""The training loop: restore or init, step, maybe evaluate, maybe checkpoint.

`train_and_evaluate(config, workdir)` runs on every device (of every host) with jax.sharding: the
global batch is split over all devices, params and optimizer state are sharded FSDP-style over
`config.mesh.fsdp` of them (sharding.py). Pointing `workdir` at an existing run resumes it from its
newest intact checkpoint (params, optimizer state, step and data-iterator state), so an interrupted
run ends with exactly the params of an uninterrupted one.
"""

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh
from tqdm import tqdm

import sharding
from data import input_pipeline
from decoding import DecodeSettings
from experiment import RunError, checkpoints, decode_programs, metrics, plots, pretrained, programs
from experiment import config as run_config


class TrainingDiverged(RunError):
    pass


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds of training (the model and optimizer are rebuilt from the config)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def fresh_state(model, optimizer, seed) -> TrainState:
    """Step 0: params from `seed` (int32 scalar; `fold_in(key(seed), 0)`), fresh optimizer state."""
    params = programs.init_params_from_seed(model, seed)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def train_step(state, batch, seed, *, model, optimizer, label_smoothing):
    """One optimizer step on a batch; returns (new_state, {"loss_sum", "tokens"}).

    `batch` holds int32 `src [batch, src_len]`, `tgt_in` and `tgt_out` `[batch, tgt_len]`; `seed` is
    the int32 scalar config seed: dropout at step `s` uses `fold_in(fold_in(key(seed), 1), s)`.
    """
    dropout_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), state.step + 1)

    def loss_fn(params):
        logits = model.apply(
            {"params": params},
            batch["src"],
            batch["tgt_in"],
            train=True,
            rngs={"dropout": dropout_key},
        )
        loss_sum, tokens = programs.cross_entropy(
            logits, batch["tgt_out"], label_smoothing, programs.special_ids(model).pad
        )
        return loss_sum / jnp.maximum(tokens, 1.0), (loss_sum, tokens)

    grads, (loss_sum, tokens) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    state = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
    return state, {"loss_sum": loss_sum, "tokens": tokens}


class Programs(NamedTuple):
    """The jitted programs of a (model, optimizer) on a mesh (see `jitted_programs`):

    init: `(seed) -> TrainState`, created directly in `state_shardings`;
    start: `(params) -> TrainState`: step 0 from given params (fine-tuning), fresh optimizer state;
    train_step: `(state, global batch, seed) -> (state, {"loss_sum", "tokens"})`, donating `state`;
    state_shardings: a `NamedSharding` per leaf of the train state (the FSDP rule over the mesh).
    """

    init: Callable
    start: Callable
    train_step: Callable
    state_shardings: TrainState


@functools.cache
def jitted_programs(model, optimizer, label_smoothing: float, mesh: Mesh) -> Programs:
    """Init and train step jitted with explicit shardings (cached: one compilation per batch shape).

    State (params, optimizer state) is sharded by the FSDP rule (`sharding.tree_shardings`), batches
    over every device (`sharding.batch_sharding`), the seed and the metrics replicated. The step
    donates the state, so the old state's buffers are reused for the new one.
    """
    init = functools.partial(fresh_state, model, optimizer)
    state_shardings = sharding.tree_shardings(mesh, jax.eval_shape(init, 0))
    replicated = sharding.replicated(mesh)
    step = functools.partial(
        train_step, model=model, optimizer=optimizer, label_smoothing=label_smoothing
    )
    return Programs(
        init=jax.jit(init, in_shardings=replicated, out_shardings=state_shardings),
        start=jax.jit(
            lambda params: TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params)),
            in_shardings=(state_shardings.params,),
            out_shardings=state_shardings,
        ),
        train_step=jax.jit(
            step,
            in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        ),
        state_shardings=state_shardings,
    )


@functools.partial(jax.jit, static_argnames="model")
def eval_step(params, batch, model):
    """Summed token loss on a batch; the batch's sharding (and the params') carry over."""
    logits = model.apply({"params": params}, batch["src"], batch["tgt_in"], train=False)
    loss_sum, tokens = programs.cross_entropy(
        logits, batch["tgt_out"], pad_id=programs.special_ids(model).pad
    )
    return {"loss_sum": loss_sum, "tokens": tokens}


def validation_settings(config) -> DecodeSettings:
    """How validation decodes: `config.decoding`, checked; a one-line error names a bad
    `--config.decoding.<field>`, and sampling (validation scores one output per sentence)."""
    settings = DecodeSettings(**config.decoding).check("--config.decoding.")
    if settings.decode == "sample":
        raise RunError(
            "--config.decoding.decode=sample: validation decodes with greedy or beam search; "
            "draw samples from the trained run with `eval.py --decode sample`"
        )
    return settings


def evaluate(config, model, params, eval_data, tgt_tokenizer, num_examples, mesh):
    """Validation loss (all examples) and decoding metrics (the first `num_examples`, 0 = all),
    decoded as `config.decoding` says.

    Each batch is split over the devices of `mesh` (its size must divide the eval batch size).
    """
    settings = validation_settings(config)
    decode = decode_programs.decode_fn(model, settings, mesh)
    limit = num_examples or len(eval_data.references)
    decoding_params = decode_programs.decoding_params(model, params)
    loss_sum = tokens = 0.0
    hypotheses = []
    for batch in eval_data.batches:
        arrays = sharding.shard_batch({k: batch[k] for k in ("src", "tgt_in", "tgt_out")}, mesh)
        out = eval_step(params, arrays, model)
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
        if len(hypotheses) < limit:
            result = decode(decoding_params, arrays["src"], settings.alpha)
            ids = decode_programs.best_sequences(result)[batch["mask"]]
            hypotheses.extend(tgt_tokenizer.decode(row.tolist()) for row in ids)
    hypotheses = hypotheses[:limit]
    scores = {"loss": loss_sum / max(tokens, 1.0)}
    scores.update(
        metrics.text_metrics(
            hypotheses,
            eval_data.references[:limit],
            exact_match=config.eval_metric == "exact_match",
        )
    )
    samples = list(zip(eval_data.sources, eval_data.references, hypotheses))
    return scores, samples


def train_and_evaluate(config, workdir, *, stop_after_steps: int | None = None):
    """Trains `config` in `workdir` (resuming if it holds a run); returns (train state, last metrics).

    `stop_after_steps` stops this process after that many steps without a final save, as a crash
    would (tests use it to check exact resume).

    Runs on the mesh of `config.mesh` (`sharding.mesh_from_config`): one device, the local devices,
    or every device of a multi-host job (`config.distributed`), where each host reads its own rows of
    every global batch and only process 0 writes files other than checkpoints.
    """
    workdir = Path(workdir)
    config = pretrained.adopt_model(config)
    validation_settings(config)  # a bad decoding setting stops the run before it trains
    sharding.initialize_distributed(config)
    mesh = sharding.mesh_from_config(config)
    is_main = jax.process_index() == 0
    if config.average_last_checkpoints > config.keep_checkpoints:
        raise RunError(
            f"average_last_checkpoints={config.average_last_checkpoints} needs keep_checkpoints >= "
            f"{config.average_last_checkpoints} (got {config.keep_checkpoints}): raise "
            "--config.keep_checkpoints"
        )
    saved = None
    if (workdir / run_config.CONFIG_FILE).exists():
        saved = run_config.load_config(workdir)
        run_config.check_resumable(config, saved, workdir)
    data = input_pipeline.get_datasets(config, batch_multiple=mesh.size)
    if is_main:
        print(
            f"{config.dataset}: {data.stats['train_kept']} training pairs, "
            f"{data.stats['train_dropped']} dropped as longer than max_len={config.max_len} "
            f"tokens; batch shapes {[tuple(s) for s in data.train.batch_shapes()]}; "
            f"mesh {dict(mesh.shape)}"
        )
        data.src_tokenizer.save(workdir / run_config.SRC_TOKENIZER)
        data.tgt_tokenizer.save(workdir / run_config.TGT_TOKENIZER)
    run_config.check_data_plan(workdir, data.train.batch_shapes())
    model = programs.create_model(
        config, data.src_tokenizer.vocab_size, data.tgt_tokenizer.vocab_size
    )
    programs.check_tokenizer_ids(model, data.src_tokenizer, data.tgt_tokenizer)
    run = jitted_programs(model, programs.make_optimizer(config), config.label_smoothing, mesh)
    seed = np.int32(config.seed)
    train_iter = data.train.iterator(*sharding.host_shard(mesh))
    state = restore_or_init(run, seed, train_iter, workdir, config.init_from)
    if is_main:
        if saved is None:
            run_config.save_config(config, workdir)
        elif int(state.step) > 0:
            run_config.record_resume(config, saved, workdir, int(state.step))
    ckpt = checkpoints.checkpoint_manager(workdir, config.keep_checkpoints)
    best = checkpoints.best_manager(workdir, config.eval_metric)

    per_epoch = data.train.batches_per_epoch
    eval_every = interval(config.eval_every, config.eval_every_epochs, per_epoch)
    checkpoint_every = interval(config.checkpoint_every, config.checkpoint_every_epochs, per_epoch)
    if is_main and (config.eval_every_epochs > 0 or config.checkpoint_every_epochs > 0):
        print(
            f"{per_epoch} updates per epoch: validation every {eval_every}, checkpoints every "
            f"{checkpoint_every} updates"
        )
    start = int(state.step)
    last_metrics: dict = {}
    patience = Patience(config.early_stopping_patience, workdir, start, is_main)
    if patience.exhausted():
        print(f"stopped early at step {start}: {patience.reason()}")
        ckpt.close()
        best.close()
        return state, last_metrics
    window = TrainWindow()
    started = (
        time.perf_counter()
    )  # records carry elapsed_s: wall seconds since this process's first step
    finished = False
    progress = tqdm(
        total=config.num_train_steps,
        initial=start,
        desc="train",
        dynamic_ncols=True,
        mininterval=1,
        disable=not is_main,
    )
    for step in range(start + 1, config.num_train_steps + 1):
        batch = sharding.global_batch(next(train_iter), mesh)
        state, out = run.train_step(state, batch, seed)
        progress.update(1)
        if stop_after_steps is not None and step - start >= stop_after_steps:
            break
        window.add(out)
        is_last = step == config.num_train_steps
        if step % config.log_every == 0 or is_last:
            record = window.close(step, ckpt, workdir)
            record["elapsed_s"] = time.perf_counter() - started
            if is_main:
                metrics.append_metrics(workdir, record)
            progress.set_postfix(
                loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:.0f}"
            )
        if step % eval_every == 0 or is_last:
            last_metrics, samples = evaluate(
                config,
                model,
                state.params,
                data.eval["validation"],
                data.tgt_tokenizer,
                config.num_eval_examples,
                mesh,
            )
            checkpoints.save(best, step, ocp.args.StandardSave(state.params), metrics=last_metrics)
            if is_main:
                elapsed = {"elapsed_s": time.perf_counter() - started}
                metrics.append_metrics(
                    workdir, {"step": step, "split": "validation", **last_metrics, **elapsed}
                )
                report_validation(
                    progress,
                    step,
                    metrics.summary(last_metrics, config.eval_metric),
                    samples[: config.num_samples_to_log],
                )
                plots.learning_curves(
                    metrics.read_metrics(workdir),
                    config.eval_metric,
                    workdir / "learning_curves.png",
                )
            patience.add(step, last_metrics["loss"])
        stopping = patience.exhausted()
        if step % checkpoint_every == 0 or is_last or stopping:
            if not programs.all_finite(state.params):
                raise TrainingDiverged(
                    f"params are not finite at step {step}; the last good checkpoint "
                    f"(step {ckpt.latest_step()}) is kept in {workdir}/checkpoints: "
                    "lower --config.learning_rate and resume"
                )
            checkpoints.save(
                ckpt,
                step,
                ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(train_iter),
                ),
            )
        finished = is_last or stopping
        if stopping:
            if is_main:
                metrics.append_metrics(workdir, {"step": step, "split": "early_stop"})
            progress.write(f"stopped early at step {step}: {patience.reason()}")
            break
    progress.close()
    ckpt.wait_until_finished()
    best.wait_until_finished()
    ckpt.close()
    best.close()
    if finished and config.average_last_checkpoints > 0:
        validate_average(config, model, state, data, mesh, workdir, is_main)
    return state, last_metrics


def validate_average(config, model, state, data, mesh, workdir: Path, is_main: bool) -> dict:
    """Validates the mean of the last `average_last_checkpoints` periodic checkpoints (the anchors'
    checkpoint averaging) and records it as `validation_averaged` at the final step."""
    available = len(checkpoints.periodic_steps(workdir))
    count = min(config.average_last_checkpoints, available)
    if count < config.average_last_checkpoints and is_main:
        print(
            f"notice: average_last_checkpoints={config.average_last_checkpoints}, but the run has "
            f"{available} periodic checkpoint(s): averaging {count}"
        )
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    template = sharding.abstract(jax.eval_shape(lambda: state.params), shardings)
    params, _, which = checkpoints.restore_params(workdir, template, count)
    scores, _ = evaluate(
        config,
        model,
        params,
        data.eval["validation"],
        data.tgt_tokenizer,
        config.num_eval_examples,
        mesh,
    )
    record = {
        "step": int(state.step),
        "split": "validation_averaged",
        "checkpoints": which,
        **scores,
    }
    if is_main:
        metrics.append_metrics(workdir, record)
        print(f"{which} validation: {metrics.summary(scores, config.eval_metric)}")
    return record


def interval(steps: int, epochs: float, per_epoch: int) -> int:
    """Updates between validations or checkpoints: `epochs` x updates per epoch (rounded, at least 1)
    when `epochs` > 0, else `steps`."""
    return max(1, round(epochs * per_epoch)) if epochs > 0 else steps


class Patience:
    """Early stopping on validation loss: exhausted once `patience` validations in a row have not
    lowered the lowest one (0: never). The history before `start` comes from metrics.jsonl (process
    0 reads it, every host gets its figures), so a resumed run counts as the uninterrupted one."""

    def __init__(self, patience: int, workdir: Path, start: int, is_main: bool):
        self.patience, self.best, self.best_step, self.since = patience, math.inf, 0, 0
        if patience <= 0:
            return
        history = np.array([math.inf, 0.0, 0.0])
        if is_main and (workdir / metrics.METRICS_FILE).exists():
            # The last record of each step: a validation repeated after a crash counts once.
            losses = {
                r["step"]: r["loss"]
                for r in metrics.read_metrics(workdir)
                if r["split"] == "validation" and r["step"] <= start
            }
            for step in sorted(losses):
                self.add(step, losses[step])
            history = np.array([self.best, self.best_step, self.since])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            history = np.asarray(multihost_utils.broadcast_one_to_all(history))
        self.best, self.best_step, self.since = float(history[0]), int(history[1]), int(history[2])

    def add(self, step: int, loss: float) -> None:
        if loss < self.best:
            self.best, self.best_step, self.since = loss, step, 0
        else:
            self.since += 1

    def exhausted(self) -> bool:
        return self.patience > 0 and self.since >= self.patience

    def reason(self) -> str:
        return (
            f"{self.since} validations without a lower loss than {self.best:.4f} (step "
            f"{self.best_step}; early_stopping_patience={self.patience})"
        )


def restore_or_init(
    run: Programs, seed, train_iter, workdir: Path, init_from: str = ""
) -> TrainState:
    """The newest intact periodic checkpoint's train state (and `train_iter` at its position), damaged
    newer ones set aside (`checkpoints.newest_intact_step`); when there is none, a fresh state: from
    `seed`, or the params of the run `init_from` (fine-tuning)."""
    step = checkpoints.newest_intact_step(workdir)
    if step is None and init_from:
        shapes = jax.eval_shape(run.init, seed).params
        template = sharding.abstract(shapes, run.state_shardings.params)
        params, _, _ = checkpoints.restore_params(Path(init_from), template)
        logging.info("Starting %s from the params of %s.", workdir, init_from)
        return run.start(params)
    if step is None:
        return run.init(seed)
    with checkpoints.reader(workdir / "checkpoints") as manager:
        check_data_state_hosts(manager, step)
        template = jax.eval_shape(run.init, seed)
        state = checkpoints.restore_train_state(manager, step, template, train_iter, workdir)
    logging.info("Resumed %s from step %d.", workdir, int(state.step))
    return state


class TrainWindow:
    """Loss and tokens summed over the steps since the last log line, on the device (no host sync
    per step)."""

    def __init__(self):
        self.loss = self.tokens = 0.0
        self.start = time.perf_counter()

    def add(self, out) -> None:
        self.loss += out["loss_sum"]
        self.tokens += out["tokens"]

    def close(self, step: int, ckpt, workdir) -> dict:
        """The window's train record; raises `TrainingDiverged` on a non-finite loss."""
        loss = float(self.loss) / max(float(self.tokens), 1.0)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss} at step {step}; the last good checkpoint "
                f"(step {ckpt.latest_step()}) is kept in {workdir}/checkpoints: "
                "lower --config.learning_rate or raise --config.warmup_steps and resume"
            )
        record = {
            "step": step,
            "split": "train",
            "loss": loss,
            "tokens": int(float(self.tokens)),  # real target tokens of the window's batches
            "tokens_per_sec": float(self.tokens) / (time.perf_counter() - self.start),
        }
        self.__init__()
        return record


def report_validation(progress, step, summary: str, samples) -> None:
    """The validation line (`metrics.summary`: the run's metric first) and some decoded samples."""
    progress.write(f"step {step} validation: {summary}")
    for source, reference, hypothesis in samples:
        progress.write(f"  src: {source}\n  ref: {reference}\n  hyp: {hypothesis}")


def check_data_state_hosts(ckpt: ocp.CheckpointManager, step: int) -> None:
    """Grain saves each host's iterator position as `data/process_<i>-of-<n>.json` and restores only
    that file, so a run resumes on as many hosts as it was saved from (any device count per host)."""
    data_dir = Path(ckpt.directory) / str(step) / "data"
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = sorted(p.name for p in data_dir.glob("process_*.json"))
    if saved and mine not in saved:
        raise RunError(
            f"checkpoint {data_dir.parent} holds the data-iterator positions of hosts {saved}, "
            f"not {mine}: resume with the number of hosts (processes) that saved it"
        )
