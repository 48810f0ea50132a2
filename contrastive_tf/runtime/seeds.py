"""Seeding a block of work without leaving the seed behind.

`keras.utils.set_random_seed` makes model initialisation and training
repeatable, but it sets process-wide state (Python's, NumPy's, TensorFlow's
and Keras' global seeds) that the caller's own code then inherits.
`seeded(seed)` sets the same seeds for a block and puts the caller's back
when it ends, also on error.
"""

from __future__ import annotations

import contextlib
import random

import keras
import numpy as np
import tensorflow as tf

from contrastive_tf.runtime import compat


@contextlib.contextmanager
def seeded(seed: int):
    """`keras.utils.set_random_seed(seed)` for the block only.

    On exit Python's and NumPy's generator states, Keras' global seed and
    SeedGenerator and TensorFlow's global seed are what they were before
    (TensorFlow's per-op seed sequence restarts from that global seed, as
    after `tf.random.set_seed`).

    Example:
    >>> with seeded(0):
    ...     model = build_model()  # the same weights in every run
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    keras_state = compat.keras_seed_state()
    tf_seed = tf.compat.v1.random.get_seed(None)[0]
    keras.utils.set_random_seed(int(seed))
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        compat.restore_keras_seed_state(keras_state)
        tf.random.set_seed(tf_seed)


@contextlib.contextmanager
def deterministic_ops(enabled: bool = True):
    """TensorFlow's op determinism on for the block when `enabled`, and
    back to what it was after."""
    before = compat.op_determinism_enabled()
    if enabled and not before:
        tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if enabled and not before:
            compat.disable_op_determinism()
