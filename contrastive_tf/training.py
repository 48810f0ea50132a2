"""The pretraining job: config in, trained model, checkpoints and summary out.

`pretrain(config)` is what `experiments/pretrain.py` calls after turning its
flags into a `PretrainConfig`; it can be called from Python just the same.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from contrastive_tf import (compat, data, distribution, evaluation, optim, precision, progress,
                            seeds)
from contrastive_tf.augment import SimCLRAugmenter
from contrastive_tf.backbones import resnet
from contrastive_tf.config import PretrainConfig
from contrastive_tf.files import atomic_path, read_json, write_json
from contrastive_tf.heads import ProjectionHead
from contrastive_tf.model import SimCLR

log = progress.logger("pretrain")


# Warmup takes at most this share of a run's steps.
MAX_WARMUP_SHARE = 0.1


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss, or a non-finite model state."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, file size limit, ...)."""


def save_checkpoint(manager: tf.train.CheckpointManager, step: int) -> str:
    """`manager.save` that fails loudly and leaves no partial files.

    A failed write must stop training: TensorFlow reports a full disk as
    `OutOfRangeError`, which Keras' `fit` would take for the end of the
    input and quietly end the epoch, skipping the checkpoint. The
    CheckpointManager's state file is only updated after a complete write,
    so the last complete checkpoint stays the one a rerun resumes from.
    """
    try:
        return manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as error:
        prefix = os.path.basename(compat.checkpoint_prefix(manager))  # "ckpt"
        partial = (f"{prefix}-{step}_temp", f"{prefix}-{step}.")
        if not (manager.latest_checkpoint or "").endswith(f"{prefix}-{step}"):
            for name in os.listdir(manager.directory):
                path = os.path.join(manager.directory, name)
                if not name.startswith(partial):
                    continue
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        reason = getattr(error, "message", str(error)).rsplit("} ", 1)[-1]
        raise CheckpointWriteError(
            f"could not write checkpoint {step} to {manager.directory}: {reason}. "
            f"The last complete checkpoint, {manager.latest_checkpoint}, is intact; "
            "free some space and rerun the same command to resume from it.") from None


class ResumeError(RuntimeError):
    """A model_dir holds a run that this config cannot continue."""


def build_model(config: PretrainConfig) -> SimCLR:
    """The SimCLR model a config describes (call inside strategy.scope())."""
    encoder = resnet(config.depth, config.width_multiplier,
                     sk_ratio=config.sk_ratio, base_width=config.base_width,
                     input_shape=(config.image_size, config.image_size,
                                  config.channels))
    augmenter = SimCLRAugmenter(
        config.image_size, crop_area=(config.crop_min_area, 1.0),
        color_strength=config.color_strength, blur=config.blur,
        seed=config.seed)
    head = ProjectionHead(config.projection_layers, config.projection_dim,
                          ft_layer=config.ft_layer)
    return SimCLR(encoder, augmenter, head, temperature=config.temperature)


def _float_variables(model: keras.Model) -> list:
    """Every floating-point variable a checkpoint of `model` holds: weights,
    batch-norm statistics and the optimizer's slots."""
    variables = list(model.variables)
    if model.optimizer is not None:
        variables += list(model.optimizer.variables)
    return [v for v in variables if v.dtype in ("float16", "bfloat16", "float32", "float64")]


class FiniteStateCheck:
    """Whether a model's whole state (weights, batch-norm statistics,
    optimizer slots) is finite, as one fused reduction in a tf.function.

    The loss of a step is computed before that step's update, so a finite
    loss does not prove that the state about to be checkpointed is finite:
    an update can turn weights or batch-norm moving variances into NaN.
    Called only at checkpoint steps.
    """

    def __init__(self, model: keras.Model):
        self.variables = _float_variables(model)
        tensors = lambda: [tf.convert_to_tensor(v) for v in self.variables]  # noqa: E731
        self._all_finite = tf.function(lambda: tf.reduce_all(tf.stack(
            [tf.reduce_all(tf.math.is_finite(t)) for t in tensors()])))

    def __call__(self) -> bool:
        return bool(self._all_finite())

    def non_finite_names(self) -> list[str]:
        """Paths of the variables holding NaN/Inf (the slow path, for errors)."""
        return [getattr(v, "path", v.name) for v in self.variables
                if not np.all(np.isfinite(np.asarray(v.numpy(), np.float32)))]


def refuse_non_finite_state(check: FiniteStateCheck, manager, step: int) -> None:
    """Raises `NonFiniteLossError` if the state about to be saved at `step`
    holds NaN/Inf, naming the variables and the last (finite) checkpoint."""
    if check():
        return
    names = check.non_finite_names()
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise NonFiniteLossError(
        f"the model state after step {step} holds NaN/Inf in {len(names)} "
        f"variable(s) ({shown}); it was not saved and training stopped. The "
        f"last good checkpoint is {manager.latest_checkpoint} (every saved "
        "checkpoint was checked finite). Lower the learning rate or use "
        "float32 / mixed_bfloat16.")


class CheckpointAndGuard(keras.callbacks.Callback):
    """Saves a checkpoint every `every_steps` steps; stops on a bad loss or
    a non-finite state.

    A NaN/Inf loss raises `NonFiniteLossError` naming the step before any
    checkpoint of the bad state is written; at checkpoint steps the whole
    state (weights, batch-norm statistics, optimizer slots) is checked for
    finiteness before it is saved, so every checkpoint on disk is finite and
    the last good one survives. Also puts the learning rate into the logs
    for TensorBoard.
    """

    def __init__(self, manager, every_steps, total_steps, schedule):
        super().__init__()
        self.manager = manager
        self.every_steps = every_steps
        self.total_steps = total_steps
        self.schedule = schedule
        self._finite = None

    def save(self, step: int) -> None:
        """Checks the state for NaN/Inf, then writes checkpoint `step`."""
        if self._finite is None:
            self._finite = FiniteStateCheck(self.model)
        refuse_non_finite_state(self._finite, self.manager, step)
        save_checkpoint(self.manager, step)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        loss = None if logs is None else logs.get("loss")
        if loss is not None and not np.all(np.isfinite(loss)):
            self.model.stop_training = True
            raise NonFiniteLossError(
                f"loss is {float(np.ravel(loss)[0])} at step {step}; training "
                f"stopped. The last good checkpoint is "
                f"{self.manager.latest_checkpoint} (not overwritten). Lower "
                "the learning rate or use float32 / mixed_bfloat16.")
        if logs is not None:
            logs["learning_rate"] = float(self.schedule(step - 1))
        if step % self.every_steps == 0 or step >= self.total_steps:
            self.save(step)
        if step >= self.total_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:  # History records epoch logs
            step = int(self.model.optimizer.iterations.numpy())
            logs["learning_rate"] = float(self.schedule(step - 1))


class ViewPairsToTensorBoard(keras.callbacks.Callback):
    """Writes a few images and their two augmented views to TensorBoard."""

    def __init__(self, images, writer):
        super().__init__()
        self.images, self.writer = images, writer

    def on_train_begin(self, logs=None):
        augmenter = self.model.augmenter
        original = augmenter(self.images, training=False)
        rows = [original, augmenter(self.images), augmenter(self.images)]
        grid = tf.concat(rows, axis=2)  # original | view 1 | view 2
        if grid.shape[-1] == 1:
            grid = tf.tile(grid, [1, 1, 1, 3])
        with self.writer.as_default():
            tf.summary.image("original_view1_view2", grid, step=0,
                             max_outputs=len(self.images))
        self.writer.flush()


# -- the pretraining job, stage by stage ------------------------------------

@dataclasses.dataclass(frozen=True)
class RunDir:
    """Where a run writes: `work` (model_dir on the chief, a scratch folder
    on other workers), its `checkpoints`, and the chief's checkpoint to
    resume from (every worker resumes from the shared model_dir)."""
    work: str
    checkpoints: str
    resume_from: str | None
    chief: bool


@dataclasses.dataclass(frozen=True)
class Plan:
    """The run's length and learning-rate schedule."""
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    schedule: optim.WarmupCosine
    chunk: int  # steps per Keras "epoch": one checkpoint interval


def load_training_data(config: PretrainConfig):
    """The training images and, where the dataset has one apart from them,
    the kNN monitor's query set; returns (config with `channels` filled in,
    source, query or None)."""
    train_split, query_split = config.splits()
    source = data.load(config.dataset, train_split, config.data_dir,
                       image_size=config.image_size, channels=config.channels)
    config = dataclasses.replace(config, channels=source.image_shape[-1])
    query = None
    if source.labelled and source.images is not None and query_split:
        query = data.load(config.dataset, query_split, config.data_dir,
                          image_size=config.image_size, channels=config.channels)
    return config, source, query


def check_resumable(config: PretrainConfig, config_path: str, has_checkpoint: bool) -> None:
    """Raises `ResumeError` if model_dir's checkpoints are of another model."""
    if not (has_checkpoint and os.path.exists(config_path)):
        return
    previous = read_json(config_path)
    differing = {name: (previous.get(name), value)
                 for name, value in config.architecture().items()
                 if previous.get(name) != value}
    if differing:
        detail = ", ".join(f"{k}: checkpoint has {old!r}, now {new!r}"
                           for k, (old, new) in differing.items())
        raise ResumeError(
            f"{config.model_dir} holds checkpoints of a different model "
            f"({detail}); refusing to resume. Use another `model_dir`, or "
            "delete that one to start over.")


def prepare_run_dir(config: PretrainConfig, strategy, precision_record: dict) -> RunDir:
    """Creates the run's folders, refuses a model_dir of another model and
    (on the chief) writes config.json with the precision decision."""
    chief = distribution.is_chief(strategy)
    work = config.model_dir if chief else os.path.join(
        config.model_dir, f"worker_tmp_{strategy.cluster_resolver.task_id}")
    os.makedirs(work, exist_ok=True)
    resume_from = tf.train.latest_checkpoint(os.path.join(config.model_dir, "checkpoints"))
    config_path = os.path.join(config.model_dir, "config.json")
    check_resumable(config, config_path, resume_from is not None)
    if chief:
        write_json(config_path, dict(config.to_dict(), **precision_record))
    return RunDir(work, os.path.join(work, "checkpoints"), resume_from, chief)


def plan_run(config: PretrainConfig, num_examples: int, spec: str) -> Plan:
    """Steps per epoch, total steps and the warmup + cosine schedule; warmup
    is clamped to `MAX_WARMUP_SHARE` of the run (a short run would otherwise
    never leave it, its learning rate only rising)."""
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise data.DataError(
            f"{spec} has {num_examples} images, fewer than one "
            f"batch of {config.batch_size}: lower `batch_size`")
    total_steps = config.train_steps or config.epochs * steps_per_epoch
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    if warmup_steps > total_steps * MAX_WARMUP_SHARE:
        clamped = int(total_steps * MAX_WARMUP_SHARE)
        log.info("warmup clamped from %d to %d steps (%.0f%% of the run's %d steps)",
                 warmup_steps, clamped, 100 * MAX_WARMUP_SHARE, total_steps)
        warmup_steps = clamped
    peak = optim.scaled_learning_rate(config.learning_rate, config.batch_size,
                                      config.lr_scaling)
    return Plan(steps_per_epoch, total_steps, warmup_steps,
                optim.WarmupCosine(peak, warmup_steps, total_steps),
                min(config.checkpoint_steps, total_steps))


def build_and_restore(config: PretrainConfig, strategy, plan: Plan, run_dir: RunDir):
    """The compiled model under the strategy, restored from the latest
    checkpoint when there is one; returns (model, CheckpointManager)."""
    with strategy.scope():
        model = build_model(config)
        optimizer = precision.loss_scaled(optim.make_optimizer(
            config.optimizer, plan.schedule, config.weight_decay, config.momentum),
            config.precision)
        model.compile(optimizer=optimizer)
        model.optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, run_dir.checkpoints,
                                         max_to_keep=config.keep_checkpoints)
    if run_dir.resume_from:
        try:
            checkpoint.restore(run_dir.resume_from).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise ResumeError(f"cannot resume from {run_dir.resume_from}: {error}") from None
    return model, manager


def make_callbacks(config: PretrainConfig, model, manager, plan: Plan, run_dir: RunDir,
                   source: data.Source, query: data.Source | None, extra: list | None):
    """The checkpoint guard, the kNN monitor (with a query set), the view
    pairs and TensorBoard; returns (guard, knn or None, callbacks)."""
    log_dir = os.path.join(run_dir.work, "logs")
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "images"))
    guard = CheckpointAndGuard(manager, plan.chunk, plan.total_steps, plan.schedule)
    guard.set_model(model)
    callbacks = [guard, *(extra or [])]
    knn = None
    if query is not None:
        bank_size = min(config.knn_bank_size, source.num_examples)
        bank_index = data.class_balanced_indices(
            source.labels, fraction=bank_size / source.num_examples, seed=config.seed)
        knn = evaluation.KNNMonitor(
            (source.images[bank_index], source.labels[bank_index]),
            (query.images, query.labels), source.num_classes, plan.steps_per_epoch,
            config.knn_every_epochs or None, config.knn_k, config.knn_temperature,
            writer=tf.summary.create_file_writer(os.path.join(log_dir, "knn")))
        # fit sets it too, but a finished run resumed at its last step never calls fit.
        knn.set_model(model)
        callbacks.append(knn)
    if config.log_images and source.images is not None and run_dir.chief:
        callbacks.append(ViewPairsToTensorBoard(source.images[:4], writer))
    callbacks.append(keras.callbacks.TensorBoard(log_dir, update_freq=max(1, plan.chunk // 4)))
    return guard, knn, callbacks


def fit(model, source: data.Source, config: PretrainConfig, plan: Plan, start_step: int,
        callbacks: list, verbose: int) -> tuple[dict, float]:
    """Trains from `start_step` to the plan's last step, one Keras epoch per
    checkpoint interval; returns (history, seconds in fit)."""
    if start_step >= plan.total_steps:
        return {}, 0.0
    started = time.time()
    stream = data.training_stream(source, config.batch_size, seed=config.seed,
                                  start_step=start_step, image_size=config.image_size)
    result = model.fit(stream, initial_epoch=start_step // plan.chunk,
                       epochs=math.ceil(plan.total_steps / plan.chunk),
                       steps_per_epoch=plan.chunk, callbacks=callbacks, shuffle=False,
                       verbose=verbose if sys.stdout.isatty() else (2 if verbose else 0))
    return result.history, time.time() - started


def _append_history(path: str, history: dict, knn_points: list, chunk: int) -> None:
    """Keeps per-interval metrics across resumed runs, for the curves."""
    previous = read_json(path) if os.path.exists(path) else {}
    merged = {"steps_per_point": chunk,
              "knn": [tuple(p) for p in previous.get("knn", [])] + [list(p) for p in knn_points]}
    for name, values in history.items():
        merged[name] = previous.get(name, []) + [float(np.ravel(v)[0]) for v in values]
    write_json(path, merged)


def _atomic_save(model: keras.Model, path: str) -> None:
    with atomic_path(path) as tmp:
        model.save(tmp)


def finish(config: PretrainConfig, model, guard, manager, knn, run_dir: RunDir,
           history: dict, plan: Plan) -> dict:
    """Makes sure the last step is checkpointed, measures kNN once more,
    and (on the chief) writes history.json, simclr.keras, encoder.keras;
    returns the final metrics."""
    step = int(model.optimizer.iterations.numpy())
    latest = manager.latest_checkpoint
    if latest is None or not latest.endswith(f"-{step}"):
        guard.save(step)
    final = {name: float(np.ravel(values[-1])[0]) for name, values in history.items()}
    if knn is not None:
        final["knn_accuracy"] = knn.measure()
        knn.history.append((step, final["knn_accuracy"]))
    if run_dir.chief:
        _append_history(os.path.join(config.model_dir, "history.json"), history,
                        knn.history if knn is not None else [], plan.chunk)
        _atomic_save(model, os.path.join(config.model_dir, "simclr.keras"))
        _atomic_save(model.encoder, os.path.join(config.model_dir, "encoder.keras"))
    else:
        shutil.rmtree(run_dir.work, ignore_errors=True)
    return final


def pretrain(config: PretrainConfig, verbose: int = 1,
             callbacks: list | None = None,
             choice: precision.Choice | None = None) -> dict:
    """Runs (or resumes) SimCLR pretraining as `config` says.

    Writes into `config.model_dir`: config.json, checkpoints/ (every
    `checkpoint_steps` steps and at the end, via tf.train.CheckpointManager),
    logs/ (TensorBoard), simclr.keras and encoder.keras (the final models)
    and summary.json. Rerunning the same call resumes from the latest
    checkpoint and stops at the same total step count. `config.precision`
    "auto" becomes the policy this machine runs fastest
    (`precision.choose`); the choice and its reason are logged and recorded
    in config.json and summary.json. Keras' dtype policy and the global
    seeds are restored on return.

    Args:
        config: the run's settings.
        verbose: Keras' progress output (0: none).
        callbacks: extra Keras callbacks for `fit`.
        choice: the precision decision when the caller made it already
            (the pipeline resolves "auto" once for all its stages).

    Returns:
        The summary dict also written to summary.json.
    """
    choice = choice or precision.resolve(config.precision)
    record = {"precision_requested": config.precision, "precision_reason": choice.reason}
    config = dataclasses.replace(config, precision=choice.policy)
    with precision.policy_scope(choice.policy), seeds.seeded(config.seed), \
            seeds.deterministic_ops(config.deterministic):
        return _pretrain(config, record, verbose, callbacks)


def _pretrain(config: PretrainConfig, record: dict, verbose: int,
              callbacks: list | None) -> dict:
    """The stages of `pretrain`, in the precision and seed it set."""
    started = time.time()
    config, source, query = load_training_data(config)
    strategy = distribution.make_strategy(config.strategy)
    distribution.check_batch_size(config.batch_size, strategy, config.strategy)
    run_dir = prepare_run_dir(config, strategy, record)
    plan = plan_run(config, source.num_examples, source.spec)
    model, manager = build_and_restore(config, strategy, plan, run_dir)
    start_step = int(model.optimizer.iterations.numpy())
    intervals = ("" if plan.chunk == plan.steps_per_epoch else
                 f"; Keras' \"Epoch k/n\" lines count checkpoint intervals of {plan.chunk} steps")
    log.info("%s: %d images, %d steps/epoch, %d steps in all, %d replica(s), %s; %s%s",
             source.spec, source.num_examples, plan.steps_per_epoch, plan.total_steps,
             strategy.num_replicas_in_sync, config.precision,
             f"resuming at step {start_step}" if start_step else "starting from scratch",
             intervals)
    guard, knn, all_callbacks = make_callbacks(config, model, manager, plan, run_dir,
                                               source, query, callbacks)
    history, fit_seconds = fit(model, source, config, plan, start_step, all_callbacks,
                               verbose)
    final = finish(config, model, guard, manager, knn, run_dir, history, plan)
    step = int(model.optimizer.iterations.numpy())
    summary = {
        "step": step, "total_steps": plan.total_steps,
        "epochs": round(step / plan.steps_per_epoch, 3),
        "steps_this_run": step - start_step,
        "images_per_s": round((step - start_step) * config.batch_size / fit_seconds, 2)
        if step > start_step and fit_seconds else None,
        "wall_s": round(time.time() - started, 2), "metrics": final,
        "model_dir": config.model_dir, "precision": config.precision, **record,
    }
    if run_dir.chief:
        write_json(os.path.join(config.model_dir, "summary.json"), summary)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items()))
    log.info("done: step %d/%d (%s epochs), %s images/s, %s s; %s; outputs in %s",
             step, plan.total_steps, summary["epochs"], summary["images_per_s"] or "-",
             summary["wall_s"], shown, config.model_dir)
    return summary
