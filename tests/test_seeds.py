"""seeded(seed) repeats the draws inside it and leaves the caller's seeds alone."""

import random

import keras
import numpy as np
import tensorflow as tf

from contrastive_tf.runtime.seeds import seeded


def _draws():
    return (random.random(), float(np.random.rand()),
            float(keras.random.uniform(())), float(tf.random.uniform(())))


def _kernel():
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    return layer.kernel.numpy()


def test_draws_inside_repeat_and_outside_state_is_restored():
    with seeded(3):
        first = _draws(), _kernel()
    with seeded(3):
        second = _draws(), _kernel()
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])

    keras.utils.set_random_seed(11)
    reference = (random.random(), float(np.random.rand()), float(keras.random.uniform(())))
    keras.utils.set_random_seed(11)
    with seeded(3):
        _draws(), _kernel()
    after = (random.random(), float(np.random.rand()), float(keras.random.uniform(())))
    assert after == reference  # the caller's sequences continue as if nothing ran
    assert tf.compat.v1.random.get_seed(None)[0] == 11


def test_restored_on_error_and_unseeded_stays_unseeded():
    tf.random.set_seed(None)
    from contrastive_tf.runtime import compat
    before = compat.keras_seed_state()
    try:
        with seeded(5):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert compat.keras_seed_state() == before
    assert tf.compat.v1.random.get_seed(None) == (None, None)


def test_deterministic_ops_only_inside_the_block():
    from contrastive_tf.runtime import compat
    from contrastive_tf.runtime.seeds import deterministic_ops
    assert not compat.op_determinism_enabled()
    with deterministic_ops(True):
        assert compat.op_determinism_enabled()
    assert not compat.op_determinism_enabled()
    with deterministic_ops(False):
        assert not compat.op_determinism_enabled()
