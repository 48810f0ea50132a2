"""Test session setup: two logical CPU devices for the distribution tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: takes more than a few seconds (CI runs it; "
        "`pytest -m 'not slow'` skips it for a quick run)")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mirrored():
    """One MirroredStrategy over the two logical CPUs for the whole session.

    Collective-op instance keys are per strategy; several strategies running
    collectives in one process can collide ("Collective instance N expected
    type ..."), so every test shares this one.
    """
    names = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    return tf.distribute.MirroredStrategy(names)
