"""One worker of the 2-process MultiWorkerMirroredStrategy test.

Run as `python -m tests.mwms_worker OUT.npz` with TF_CONFIG set; trains a
few steps of a tiny SimCLR and writes its final weights.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from tests.testing import random_images, tiny_simclr  # noqa: E402


def main(out_path):
    keras.config.disable_traceback_filtering()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    images = random_images(32, size=16)
    labels = np.arange(32) % 4
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    dataset = (tf.data.Dataset.from_tensor_slices((images, labels))
               .batch(8, drop_remainder=True).with_options(options))
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = tiny_simclr(image_size=16, num_classes=4)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    initial = {f"init{i}": v.numpy() for i, v in enumerate(model.weights)}
    history = model.fit(dataset, epochs=2, verbose=0)
    weights = {f"w{i}": v.numpy() for i, v in enumerate(model.weights)}
    np.savez(out_path, loss=np.array(history.history["loss"]), **weights,
             **initial)


if __name__ == "__main__":
    main(sys.argv[1])
