"""A job with TFDS mocked, for tests: `python -m tests.mocked_job pretrain FLAGS...`.

`tfds.testing.mock_data` serves random images of the named dataset's own
shapes; the mocked sets count as prepared.
"""

import sys

import tensorflow_datasets as tfds
from absl import app

from contrastive_tf.data import builtin, loading

_real = builtin.load_tfds


def _prepared(name, split="train", data_dir=None, download=False):
    return _real(name, split, data_dir, True)


if __name__ == "__main__":
    builtin.load_tfds = loading.load_tfds = _prepared
    module = __import__("experiments." + sys.argv[1], fromlist=["main"])
    with tfds.testing.mock_data(num_examples=48):
        app.run(module.main, argv=[sys.argv[1], *sys.argv[2:]])
