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

from contrastive_tf import data
from contrastive_tf.jobs.config import PretrainConfig
from contrastive_tf.jobs.models import build_simclr
from contrastive_tf.method import evaluation, optim
from contrastive_tf.runs import artifacts
from contrastive_tf.runs.checkpoints import CheckpointAndGuard, ResumeError, check_resumable
from contrastive_tf.runtime import distribution, precision, progress, seeds
from contrastive_tf.runtime.files import write_json

log = progress.logger("pretrain")


# Warmup takes at most this share of a run's steps.
MAX_WARMUP_SHARE = 0.1


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
                       image_size=config.image_size, channels=config.channels, stream=True)
    config = dataclasses.replace(config, channels=source.image_shape[-1])
    query = None
    if source.labelled and query_split:
        query = data.load(config.dataset, query_split, config.data_dir,
                          image_size=config.image_size, channels=config.channels, stream=True)
    return config, source, query


def prepare_run_dir(config: PretrainConfig, strategy, precision_record: dict) -> RunDir:
    """Creates the run's folders, refuses a model_dir of another model and
    (on the chief) writes config.json with the precision decision."""
    chief = distribution.is_chief(strategy)
    work = config.model_dir if chief else os.path.join(
        config.model_dir, f"worker_tmp_{strategy.cluster_resolver.task_id}")
    os.makedirs(work, exist_ok=True)
    resume_from = tf.train.latest_checkpoint(os.path.join(config.model_dir,
                                                          artifacts.CHECKPOINTS))
    check_resumable(config.model_dir, config.architecture(), resume_from is not None)
    if chief:
        write_json(os.path.join(config.model_dir, artifacts.CONFIG),
                   dict(config.to_dict(), **precision_record))
    return RunDir(work, os.path.join(work, artifacts.CHECKPOINTS), resume_from, chief)


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
        log.info(f"warmup clamped from {warmup_steps} to {clamped} steps "
                 f"({100 * MAX_WARMUP_SHARE:.0f}% of the run's {total_steps} steps)")
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
        model = build_simclr(config, synchronized_bn=strategy.num_replicas_in_sync > 1)
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


def knn_sets(config: PretrainConfig, source: data.Source, query: data.Source):
    """The kNN monitor's bank and queries, in memory: a class-balanced
    `knn_bank_size` of the training images and the whole query split; from
    a streaming source (a TFDS set), the first `knn_bank_size` images of
    each, read once at the start (said so)."""
    bank_size = min(config.knn_bank_size, source.num_examples)
    if source.images is not None or source.streams_files:
        bank_index = data.class_balanced_indices(
            source.labels, fraction=bank_size / source.num_examples, seed=config.seed)
        bank = data.to_memory(source.subset(bank_index), config.image_size)
        if query.streams_files:
            query = data.head(query, bank_size, config.image_size)
            log.info(f"kNN monitor: a class-balanced {bank.num_examples} training images "
                     f"and the first {query.num_examples} {query.split} images, decoded once "
                     "(`knn_bank_size` sets both)")
        return bank, query
    bank = data.head(source, bank_size, config.image_size)
    query = data.head(query, bank_size, config.image_size)
    log.info(f"kNN monitor: the first {bank.num_examples} training and {query.num_examples} "
             f"{query.split} images of {source.spec} (a streaming set; `knn_bank_size` "
             "sets both)")
    return bank, query


def make_callbacks(config: PretrainConfig, model, manager, plan: Plan, run_dir: RunDir,
                   source: data.Source, query: data.Source | None, extra: list | None):
    """The checkpoint guard, the kNN monitor (with a query set), the view
    pairs and TensorBoard; returns (guard, knn or None, callbacks)."""
    log_dir = os.path.join(run_dir.work, artifacts.LOGS)
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "images"))
    guard = CheckpointAndGuard(manager, plan.chunk, plan.total_steps, plan.schedule)
    guard.set_model(model)
    callbacks = [guard, *(extra or [])]
    knn = None
    if query is not None:
        bank, query = knn_sets(config, source, query)
        knn = evaluation.KNNMonitor(
            (bank.images, bank.labels), (query.images, query.labels), source.num_classes,
            plan.steps_per_epoch,
            config.knn_every_epochs or None, config.knn_k, config.knn_temperature,
            writer=tf.summary.create_file_writer(os.path.join(log_dir, "knn")))
        # fit sets it too, but a finished run resumed at its last step never calls fit.
        knn.set_model(model)
        callbacks.append(knn)
    if config.log_images and run_dir.chief and (source.images is not None
                                                 or source.streams_files):
        callbacks.append(ViewPairsToTensorBoard(
            data.head(source, 4, config.image_size).images, writer))
    callbacks.append(keras.callbacks.TensorBoard(log_dir, update_freq=max(1, plan.chunk // 4)))
    return guard, knn, callbacks


def fit(model, source: data.Source, config: PretrainConfig, plan: Plan, start_step: int,
        callbacks: list, verbose: int) -> tuple[dict, float]:
    """Trains from `start_step` to the plan's last step, one Keras epoch per
    checkpoint interval; returns (history, seconds in fit)."""
    if start_step >= plan.total_steps:
        return {}, 0.0
    started = time.time()
    if source.streams_files:
        augmenter = model.augmenter
        stream = data.view_stream(
            source, config.batch_size, image_size=config.image_size, views=2,
            crop_area=augmenter.crop_area, aspect_ratio=augmenter.aspect_ratio,
            flip=augmenter.flip, seed=config.seed, start_step=start_step,
            cache_dir=config.cache_dir or None, strategy=model.distribute_strategy)
    else:
        stream = data.training_stream(source, config.batch_size, seed=config.seed,
                                      start_step=start_step, image_size=config.image_size)
    result = model.fit(stream, initial_epoch=start_step // plan.chunk,
                       epochs=math.ceil(plan.total_steps / plan.chunk),
                       steps_per_epoch=plan.chunk, callbacks=callbacks, shuffle=False,
                       verbose=verbose if sys.stdout.isatty() else (2 if verbose else 0))
    return result.history, time.time() - started


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
        artifacts.append_history(config.model_dir, history,
                                 knn.history if knn is not None else [], plan.chunk)
        artifacts.save_pretrained(model, config.model_dir)
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
    # The strategy first: a multi-worker one configures TensorFlow's runtime,
    # which must not have started (loading data starts it).
    strategy = distribution.make_strategy(config.strategy)
    config, source, query = load_training_data(config)
    distribution.check_batch_size(config.batch_size, strategy, config.strategy)
    run_dir = prepare_run_dir(config, strategy, record)
    plan = plan_run(config, source.num_examples, source.spec)
    model, manager = build_and_restore(config, strategy, plan, run_dir)
    start_step = int(model.optimizer.iterations.numpy())
    intervals = ("" if plan.chunk == plan.steps_per_epoch else
                 f"; Keras' \"Epoch k/n\" lines count checkpoint intervals of {plan.chunk} steps")
    replicas = strategy.num_replicas_in_sync
    replicas_shown = (f"{replicas} replicas (batch norm synchronised across them)"
                      if replicas > 1 else "1 replica")
    resuming = f"resuming at step {start_step}" if start_step else "starting from scratch"
    log.info(f"{source.spec}: {source.num_examples} images, {plan.steps_per_epoch} steps/epoch, "
             f"{plan.total_steps} steps in all, {replicas_shown}, {config.precision}; "
             f"{resuming}{intervals}")
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
    summary.update(data.SKIPPED.summary())
    if run_dir.chief:
        artifacts.write_summary(config.model_dir, summary)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items()))
    log.info(f"done: step {step}/{plan.total_steps} ({summary['epochs']} epochs), "
             f"{summary['images_per_s'] or '-'} images/s, {summary['wall_s']} s; {shown}; "
             f"outputs in {config.model_dir}")
    return summary
