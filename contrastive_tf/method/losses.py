"""Contrastive and distillation losses.

NT-Xent follows the paper definition (SimCLR, arXiv 2002.05709, eq. 1):

    l(i, j) = -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )
    L = 1 / (2N) * sum over the 2N anchors of l(anchor, its positive)

The reference TF2 code reports the sum of the two directions' means, which is
twice this value; contrastive_tf reports the paper value.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from contrastive_tf.runtime import distribution

_MASK_VALUE = -1e9


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(
            f"Expected temperature > 0. Received: temperature={temperature}")


def nt_xent_with_accuracy(z1, z2, temperature: float = 0.1):
    """NT-Xent loss and contrastive accuracy for two batches of views.

    Args:
        z1: `(n, d)` projections of the first view of each image.
        z2: `(n, d)` projections of the second view, row i pairs with
            `z1[i]`.
        temperature: softmax temperature `t > 0`. Defaults to `0.1`.

    Returns:
        `(loss, accuracy)`, float32 scalars. `loss` is the mean of
        `l(anchor, positive)` over this replica's 2n anchors, with the
        negatives taken from the views of all replicas (the global batch).
        `accuracy` is the fraction of anchors whose positive has the highest
        similarity among the 2N - 1 other views.

    Under a strategy with R replicas the global loss is the mean of the R
    returned values; differentiate `loss / R` on each replica and sum the
    gradients (what `SimCLR.train_step` and Keras optimizers do). All maths
    runs in float32 whatever the inputs' dtype.

    Example:
    >>> z = tf.random.normal((8, 16))
    >>> loss, acc = nt_xent_with_accuracy(z, z + 0.01, temperature=0.5)

    References:
        - [Chen et al., 2020](https://arxiv.org/abs/2002.05709)
    """
    _check_temperature(temperature)
    z1 = tf.math.l2_normalize(tf.cast(z1, tf.float32), axis=-1)
    z2 = tf.math.l2_normalize(tf.cast(z2, tf.float32), axis=-1)
    n = tf.shape(z1)[0]

    # Keys: every view in the global batch, ordered [all z1 ; all z2].
    keys1 = distribution.cross_replica_concat(z1)
    keys2 = distribution.cross_replica_concat(z2)
    keys = tf.concat([keys1, keys2], axis=0)
    global_n = tf.shape(keys1)[0]
    _, replica_id = distribution.replica_info()
    offset = tf.cast(replica_id, tf.int32) * n

    anchors = tf.concat([z1, z2], axis=0)
    logits = tf.matmul(anchors, keys, transpose_b=True) / temperature

    local = tf.range(n) + offset
    self_index = tf.concat([local, local + global_n], axis=0)
    positive_index = tf.concat([local + global_n, local], axis=0)
    self_mask = tf.one_hot(self_index, 2 * global_n, dtype=tf.float32)
    logits = logits + self_mask * _MASK_VALUE

    per_anchor = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=positive_index, logits=logits)
    loss = tf.reduce_mean(per_anchor)
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    accuracy = tf.reduce_mean(
        tf.cast(tf.equal(predicted, positive_index), tf.float32))
    return loss, accuracy


@keras.saving.register_keras_serializable(package="contrastive_tf")
def nt_xent(z1, z2, temperature: float = 0.1):
    """NT-Xent loss (paper definition), a float32 scalar.

    See `nt_xent_with_accuracy` for the arguments and the behaviour under a
    tf.distribute strategy (negatives are gathered from all replicas).

    Example:
    >>> z1, z2 = tf.random.normal((4, 8)), tf.random.normal((4, 8))
    >>> float(nt_xent(z1, z2, temperature=0.5)) > 0
    True

    References:
        - [Chen et al., 2020](https://arxiv.org/abs/2002.05709)
    """
    return nt_xent_with_accuracy(z1, z2, temperature)[0]


@keras.saving.register_keras_serializable(package="contrastive_tf")
def distillation_loss(teacher_logits, student_logits, temperature: float = 1.0):
    """Cross-entropy between softened teacher and student predictions.

    `L = -mean_x sum_y P_T(y|x; t) log P_S(y|x; t)` with
    `P(y|x; t) = softmax(logits / t)` (SimCLRv2, arXiv 2006.10029, eq. 2),
    averaged over the batch, in float32. The teacher receives no gradient.

    Args:
        teacher_logits: `(n, classes)` logits of the teacher.
        student_logits: `(n, classes)` logits of the student.
        temperature: softening temperature `t > 0`. Defaults to `1.0`.

    References:
        - [Chen et al., 2020b](https://arxiv.org/abs/2006.10029)
    """
    _check_temperature(temperature)
    teacher = ops.softmax(
        ops.stop_gradient(ops.cast(teacher_logits, "float32")) / temperature)
    log_student = ops.log_softmax(
        ops.cast(student_logits, "float32") / temperature)
    return -ops.mean(ops.sum(teacher * log_student, axis=-1))
