"""The one place where contrastive_tf talks to tf.distribute.

Everything that depends on the replica layout (how many replicas, which one
we are, gathering tensors across them, scaling a per-replica loss) goes
through these helpers, so the rest of the package reads like single-device
code and runs unchanged under the default strategy, `MirroredStrategy`,
`MultiWorkerMirroredStrategy` and `TPUStrategy`.
"""

from __future__ import annotations

import tensorflow as tf

from contrastive_tf.runtime import compat

# The `strategy` choices of the jobs (`make_strategy`).
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def replica_info() -> tuple[int, tf.Tensor | int]:
    """Returns `(num_replicas, replica_id)` for the current context.

    In a replica context (inside `strategy.run`, which `model.fit` uses)
    these describe the replica; in a cross-replica or default context they
    are `(1, 0)`.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        return 1, 0
    return ctx.num_replicas_in_sync, ctx.replica_id_in_sync_group


def num_replicas() -> int:
    """Number of replicas that synchronise in the current strategy."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def cross_replica_concat(tensor: tf.Tensor) -> tf.Tensor:
    """Concatenates `tensor` from all replicas along axis 0, in replica order.

    The gradient flows back to every replica: the gradient with respect to
    this replica's slice is the sum of what all replicas' losses send to it
    (`ReplicaContext.all_gather` is differentiable).
    """
    count, _ = replica_info()
    if count == 1:
        return tensor
    return tf.distribute.get_replica_context().all_gather(tensor, axis=0)


def scale_loss_for_replicas(loss: tf.Tensor) -> tf.Tensor:
    """Divides a per-replica mean loss by the number of replicas.

    Keras optimizers sum gradients over replicas; differentiating
    `loss / num_replicas` on each replica therefore yields the gradient of the
    mean loss over the global batch. Keras' own `compute_loss` does the same
    scaling; call this only in a `train_step` that computes its loss itself.
    """
    count, _ = replica_info()
    if count == 1:
        return loss
    return loss / tf.cast(count, loss.dtype)


def replica_seed(seed: tf.Tensor) -> tf.Tensor:
    """Makes a stateless-RNG seed differ between replicas.

    Every replica holds the same seed state (it is mirrored); folding in the
    replica id gives each replica its own random stream, reproducibly.
    """
    _, replica_id = replica_info()
    seed = tf.cast(seed, tf.int64)
    return tf.random.experimental.stateless_fold_in(
        seed, tf.cast(replica_id, tf.int64))


def _multi_worker() -> bool:
    strategy = tf.distribute.get_strategy()
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and compat.in_multi_worker_mode(strategy))


def step_logs(logs: dict) -> dict:
    """Shapes a train/test step's logs for Keras' cross-replica reduction.

    Under a multi-worker strategy Keras 3.15 reduces each returned value with
    `strategy.reduce("MEAN", value, axis=0)`, which fails for scalars; a
    1-element vector reduces to the same scalar. Elsewhere logs pass as is.
    """
    if not _multi_worker():
        return logs
    return {name: tf.reshape(value, [1]) for name, value in logs.items()}


class BuiltAtInit:
    """Mixin for a `keras.Model` whose weights all exist after `__init__`.

    Keras 3.15 builds a model under a strategy by reducing the first
    distributed batch with `strategy.reduce`, which fails for
    `(images, labels)` tuples under MultiWorkerMirroredStrategy. A model that
    creates every weight in `__init__` only needs its optimizer's slots
    built, which takes no data.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if compat.distribute_strategy_of(self) is None:
            return
        with self.distribute_strategy.scope():
            if self.optimizer is not None and not self.optimizer.built:
                self.optimizer.build(self.trainable_variables)


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy for a job's `--strategy` flag."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"Unknown strategy {name!r}")


def check_batch_size(batch_size: int, strategy: tf.distribute.Strategy, name: str) -> None:
    """Raises ValueError unless the global batch divides among the replicas."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(f"batch_size={batch_size} is not divisible by "
                         f"the {replicas} replicas of strategy {name!r}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the shared outputs (model_dir)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief
