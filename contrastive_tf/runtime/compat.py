"""The private Keras / TensorFlow API this package relies on, all of it here.

Each use has a reason no public API covers (given beside it). `missing()`
lists what a Keras / TensorFlow upgrade removed; tests/test_compat.py fails
naming it, so an upgrade breaks one test with a clear message rather than a
training run somewhere deep.
"""

from __future__ import annotations

import keras
import tensorflow as tf

# (where, attribute, why)
PRIVATE_API = (
    ("keras.Model", "_maybe_symbolic_build",
     "runtime.distribution.BuiltAtInit overrides it: Keras 3.15 builds a model under a "
     "strategy by reducing the first batch, which fails under MultiWorkerMirroredStrategy"),
    ("keras.Model instance", "_distribute_strategy",
     "runtime.distribution.BuiltAtInit: whether the model was made under a strategy"),
    ("CollectiveAllReduceExtended", "_in_multi_worker_mode",
     "runtime.distribution.step_logs: whether MultiWorkerMirroredStrategy spans processes"),
    ("tf.train.CheckpointManager instance", "_checkpoint_prefix",
     "runs.checkpoints.save_checkpoint: the file prefix, to remove a partial checkpoint"),
    ("keras.layers.TFSMLayer", "_add_existing_weight",
     "serving.export._ExportedFeatures overrides it to give weights names optimisers accept"),
    ("keras.layers.Layer", "_track_variable",
     "serving.export._ExportedFeatures: tracks those weights"),
    ("keras.layers.Layer", "_flatten_layers",
     "runtime.precision.recast: every layer inside a model, nested custom layers "
     "included (Model.layers lists only the top level)"),
    ("keras.optimizers.Optimizer", "_var_key",
     "method.optim.LARS: Keras' identity of a variable, the one update_step receives"),
    ("keras.optimizers.Optimizer", "_get_variable_index",
     "method.optim.LARS: the slot (velocity) of a variable"),
    ("keras.src.backend.common.global_state", "get_global_attribute",
     "runtime.seeds.seeded: Keras keeps its global seed and SeedGenerator there, to "
     "restore them"),
    ("keras.src.backend.common.global_state", "set_global_attribute",
     "runtime.seeds.seeded: puts them back"),
    ("tensorflow.python.framework.config", "is_op_determinism_enabled",
     "runtime.seeds.deterministic_ops: TF exports enable_op_determinism only; to restore it"),
    ("tensorflow.python.framework.config", "disable_op_determinism",
     "runtime.seeds.deterministic_ops: switches it back off after the run"),
    ("tensorflow.python.profiler.internal", "_pywrap_profiler_plugin",
     "experiments/benchmark.py --profile: op statistics from the profiler's trace"),
)


def _holder(where: str, tmp_dir: str | None = None):
    if where == "keras.Model":
        return keras.Model
    if where == "keras.Model instance":
        return keras.Sequential()
    if where == "CollectiveAllReduceExtended":
        from tensorflow.python.distribute import collective_all_reduce_strategy as module
        return module.CollectiveAllReduceExtended
    if where == "tf.train.CheckpointManager instance":
        return tf.train.CheckpointManager(tf.train.Checkpoint(), tmp_dir, max_to_keep=1)
    if where == "keras.layers.TFSMLayer":
        return keras.layers.TFSMLayer
    if where == "keras.layers.Layer":
        return keras.layers.Layer
    if where == "keras.optimizers.Optimizer":
        return keras.optimizers.Optimizer
    if where in ("tensorflow.python.profiler.internal", "tensorflow.python.framework.config",
                 "keras.src.backend.common.global_state"):
        import importlib
        return importlib.import_module(where)
    raise ValueError(f"unknown holder {where!r}")


def missing(tmp_dir: str) -> list[str]:
    """The private attributes this package uses that are gone, each with why
    it is used (`tmp_dir`: a folder for a throwaway CheckpointManager)."""
    gone = []
    for where, name, why in PRIVATE_API:
        try:
            present = hasattr(_holder(where, tmp_dir), name)
        except ImportError:
            present = False
        if not present:
            gone.append(f"{where}.{name} (used by {why})")
    return gone


def checkpoint_prefix(manager: tf.train.CheckpointManager) -> str:
    """The path prefix of a CheckpointManager's files ("<dir>/ckpt")."""
    return manager._checkpoint_prefix


def in_multi_worker_mode(strategy: tf.distribute.Strategy) -> bool:
    """Whether a MultiWorkerMirroredStrategy spans several processes."""
    return strategy.extended._in_multi_worker_mode()


def variable_key(optimizer: keras.optimizers.Optimizer, variable) -> int:
    """Keras' identity of a variable inside an optimizer."""
    return optimizer._var_key(variable)


def variable_index(optimizer: keras.optimizers.Optimizer, variable) -> int:
    """The position of a variable among an optimizer's slots."""
    return optimizer._get_variable_index(variable)


def distribute_strategy_of(model: keras.Model):
    """The strategy a model was made under, or None (made outside any)."""
    return model._distribute_strategy


def track_variable(layer: keras.layers.Layer, variable) -> None:
    """Makes `layer` own `variable` (its weights, checkpoints, optimisers)."""
    layer._track_variable(variable)


def all_layers(model: keras.layers.Layer) -> list:
    """Every layer inside `model`, recursively (not `model` itself)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


# Keras' names for its global seed state (keras.src.utils.rng_utils and
# keras.src.random.seed_generator), which keras.utils.set_random_seed writes.
_KERAS_SEED_ATTRIBUTES = ("global_random_seed", "global_seed_generator")


def keras_seed_state() -> tuple:
    """Keras' global seed and global SeedGenerator, as they are now."""
    from keras.src.backend.common import global_state
    return tuple(global_state.get_global_attribute(name) for name in _KERAS_SEED_ATTRIBUTES)


def restore_keras_seed_state(state: tuple) -> None:
    """Puts back what `keras_seed_state` returned."""
    from keras.src.backend.common import global_state
    for name, value in zip(_KERAS_SEED_ATTRIBUTES, state):
        global_state.set_global_attribute(name, value)


def op_determinism_enabled() -> bool:
    """Whether TensorFlow's op determinism is on."""
    from tensorflow.python.framework import config
    return config.is_op_determinism_enabled()


def disable_op_determinism() -> None:
    from tensorflow.python.framework import config
    config.disable_op_determinism()
