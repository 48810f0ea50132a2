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

from contrastive_tf import compat, data, distribution, evaluation, optim, precision
from contrastive_tf.augment import SimCLRAugmenter
from contrastive_tf.backbones import resnet
from contrastive_tf.config import PretrainConfig
from contrastive_tf.files import atomic_path, read_json, write_json
from contrastive_tf.heads import ProjectionHead
from contrastive_tf.model import SimCLR


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


def _check_resumable(config: PretrainConfig, config_path: str, has_checkpoint: bool):
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
            f"({detail}); refusing to resume. Use another --model_dir, or "
            "delete that one to start over.")


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
    (`precision.choose`); the choice and its reason are printed and recorded
    in config.json and summary.json. Keras' global dtype policy is restored
    on return.

    Args:
        config: the run's settings.
        verbose: 0 silent, 1 progress and summary lines.
        callbacks: extra Keras callbacks for `fit`.
        choice: the precision decision when the caller made it already
            (the pipeline resolves "auto" once for all its stages).

    Returns:
        The summary dict also written to summary.json.
    """
    choice = choice or precision.resolve(config.precision)
    resolved = dataclasses.replace(config, precision=choice.policy)
    with precision.policy_scope(choice.policy):
        return _pretrain(resolved, choice, config.precision, verbose, callbacks)


def _pretrain(config: PretrainConfig, choice: precision.Choice, requested: str,
              verbose: int, callbacks: list | None) -> dict:
    started = time.time()
    train_split, query_split = config.splits()
    source = data.load(config.dataset, train_split, config.data_dir,
                       image_size=config.image_size, channels=config.channels)
    channels = source.image_shape[-1]
    config = dataclasses.replace(config, channels=channels)
    strategy = distribution.make_strategy(config.strategy)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by "
                         f"the {replicas} replicas of strategy {config.strategy!r}")
    chief = distribution.is_chief(strategy)
    work_dir = config.model_dir if chief else os.path.join(
        config.model_dir, f"worker_tmp_{strategy.cluster_resolver.task_id}")
    os.makedirs(work_dir, exist_ok=True)
    checkpoint_dir = os.path.join(work_dir, "checkpoints")
    # Every worker resumes from the chief's checkpoints (the shared model_dir);
    # non-chief workers write theirs to a scratch folder that is discarded.
    shared_checkpoint_dir = os.path.join(config.model_dir, "checkpoints")
    resume_from = tf.train.latest_checkpoint(shared_checkpoint_dir)
    config_path = os.path.join(config.model_dir, "config.json")
    _check_resumable(config, config_path, resume_from is not None)
    precision_record = {"precision_requested": requested,
                        "precision_reason": choice.reason}
    if chief:
        write_json(config_path, dict(config.to_dict(), **precision_record))

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    steps_per_epoch = source.num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise data.DataError(
            f"{source.spec} has {source.num_examples} images, fewer than one "
            f"batch of {config.batch_size}: lower --batch_size")
    total_steps = config.train_steps or config.epochs * steps_per_epoch
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    if warmup_steps > total_steps * MAX_WARMUP_SHARE:
        # A short run (e.g. --train_steps=20 with 10 warmup epochs) would
        # never leave warmup: its learning rate would only rise.
        clamped = int(total_steps * MAX_WARMUP_SHARE)
        if verbose:
            print(f"[pretrain] warmup clamped from {warmup_steps} to {clamped} steps "
                  f"({MAX_WARMUP_SHARE:.0%} of the run's {total_steps} steps)", flush=True)
        warmup_steps = clamped
    peak = optim.scaled_learning_rate(config.learning_rate, config.batch_size,
                                      config.lr_scaling)
    schedule = optim.WarmupCosine(peak, warmup_steps, total_steps)

    with strategy.scope():
        model = build_model(config)
        optimizer = precision.loss_scaled(optim.make_optimizer(
            config.optimizer, schedule, config.weight_decay, config.momentum),
            config.precision)
        model.compile(optimizer=optimizer)
        model.optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir,
                                         max_to_keep=config.keep_checkpoints)
    if resume_from:
        try:
            checkpoint.restore(resume_from).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise ResumeError(f"cannot resume from {resume_from}: {error}") from None
    start_step = int(model.optimizer.iterations.numpy())
    if verbose:
        what = (f"resuming at step {start_step}" if start_step
                else "starting from scratch")
        print(f"[pretrain] {source.spec}: {source.num_examples} images, "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps in all, "
              f"{replicas} replica(s), {config.precision} ({choice.reason}); {what}",
              flush=True)

    # One Keras "epoch" per checkpoint interval, never longer than the run.
    chunk = min(config.checkpoint_steps, total_steps)
    log_dir = os.path.join(work_dir, "logs")
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "images"))
    guard = CheckpointAndGuard(manager, chunk, total_steps, schedule)
    guard.set_model(model)
    callbacks = [guard, *(callbacks or [])]
    knn = None
    if source.labelled and source.images is not None and query_split:
        query = data.load(config.dataset, query_split, config.data_dir,
                          image_size=config.image_size, channels=channels)
        bank_size = min(config.knn_bank_size, source.num_examples)
        bank_index = data.class_balanced_indices(
            source.labels, fraction=bank_size / source.num_examples, seed=config.seed)
        knn = evaluation.KNNMonitor(
            (source.images[bank_index], source.labels[bank_index]),
            (query.images, query.labels), source.num_classes, steps_per_epoch,
            config.knn_every_epochs or None, config.knn_k, config.knn_temperature,
            writer=tf.summary.create_file_writer(os.path.join(log_dir, "knn")))
        # fit sets it too, but a finished run resumed at its last step never calls fit.
        knn.set_model(model)
        callbacks.append(knn)
    if config.log_images and source.images is not None and chief:
        callbacks.append(ViewPairsToTensorBoard(source.images[:4], writer))
    callbacks.append(keras.callbacks.TensorBoard(log_dir, update_freq=max(1, chunk // 4)))

    history = {}
    fit_start = time.time()
    if start_step < total_steps:
        stream = data.training_stream(source, config.batch_size, seed=config.seed,
                                      start_step=start_step, image_size=config.image_size)
        result = model.fit(stream, initial_epoch=start_step // chunk,
                           epochs=math.ceil(total_steps / chunk),
                           steps_per_epoch=chunk, callbacks=callbacks, shuffle=False,
                           verbose=verbose if sys.stdout.isatty() else
                           (2 if verbose else 0))
        history = result.history
    fit_seconds = time.time() - fit_start
    steps_run = int(model.optimizer.iterations.numpy()) - start_step
    step = int(model.optimizer.iterations.numpy())
    latest = manager.latest_checkpoint
    if latest is None or not latest.endswith(f"-{step}"):
        guard.save(step)

    final = {name: float(np.ravel(values[-1])[0]) for name, values in history.items()}
    if knn is not None:
        final["knn_accuracy"] = knn.measure()
        knn.history.append((step, final["knn_accuracy"]))
    if chief:
        _append_history(os.path.join(config.model_dir, "history.json"), history,
                        knn.history if knn is not None else [], chunk)
    summary = {
        "step": step,
        "total_steps": total_steps,
        "epochs": round(step / steps_per_epoch, 3),
        "steps_this_run": steps_run,
        "images_per_s": round(steps_run * config.batch_size / fit_seconds, 2)
        if steps_run else None,
        "wall_s": round(time.time() - started, 2),
        "metrics": final,
        "model_dir": config.model_dir,
        "precision": config.precision,
        **precision_record,
    }
    if chief:
        _atomic_save(model, os.path.join(config.model_dir, "simclr.keras"))
        _atomic_save(model.encoder, os.path.join(config.model_dir, "encoder.keras"))
        write_json(os.path.join(config.model_dir, "summary.json"), summary)
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    if verbose:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items()))
        rate = summary["images_per_s"]
        print(f"[pretrain] done: step {summary['step']}/{total_steps} "
              f"({summary['epochs']} epochs), "
              f"{rate if rate is not None else '-'} images/s, "
              f"{summary['wall_s']} s; {shown}; outputs in {config.model_dir}",
              flush=True)
    return summary
