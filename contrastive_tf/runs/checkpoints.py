"""Checkpoints a user can trust: written whole or not at all, never of a
non-finite state, and resumed only into the same model.

`CheckpointAndGuard` is the pretraining's checkpoint callback: it stops
on a NaN/Inf loss before anything bad is saved, checks the whole state
(weights, batch-norm statistics, optimizer slots) for finiteness at each
checkpoint step, and writes through `save_checkpoint`, which removes a
partial write and says which checkpoint is intact. `check_resumable`
refuses to resume a model_dir that holds another model's checkpoints.
"""

from __future__ import annotations

import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from contrastive_tf.runs.artifacts import CONFIG
from contrastive_tf.runtime import compat
from contrastive_tf.runtime.files import read_json


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


def check_resumable(model_dir: str, architecture: dict, has_checkpoint: bool) -> None:
    """Raises `ResumeError` if `model_dir` holds checkpoints of a model whose
    `architecture` (the config fields that fix the weights' shapes, as its
    config.json records them) differs from this one's."""
    config_path = os.path.join(model_dir, CONFIG)
    if not (has_checkpoint and os.path.exists(config_path)):
        return
    previous = read_json(config_path)
    differing = {name: (previous.get(name), value) for name, value in architecture.items()
                 if previous.get(name) != value}
    if differing:
        detail = ", ".join(f"{k}: checkpoint has {old!r}, now {new!r}"
                           for k, (old, new) in differing.items())
        raise ResumeError(
            f"{model_dir} holds checkpoints of a different model "
            f"({detail}); refusing to resume. Use another `model_dir`, or "
            "delete that one to start over.")
