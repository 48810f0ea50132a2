"""Builds the embedded default dataset shipped in contrastive_tf/data/embedded/.

A class-balanced, reproducible subset of Fashion-MNIST (1,000 train and 200
test images per class) taken from Debian's `dataset-fashion-mnist` package:

    apt-get install dataset-fashion-mnist
    python -m experiments.build_embedded_data

Rerunning it rewrites the same bytes (fixed seed); tests check the checksum.
"""

import os
import shutil

from absl import app, flags
import numpy as np

from contrastive_tf import data

FLAGS = flags.FLAGS
flags.DEFINE_string("source_dir", data.DEBIAN_FASHION_MNIST_DIR,
                    "Folder with the four Fashion-MNIST IDX .gz files.")
flags.DEFINE_integer("train_per_class", data.EMBEDDED_PER_CLASS["train"],
                     "Training images per class.")
flags.DEFINE_integer("test_per_class", data.EMBEDDED_PER_CLASS["test"], "Test images per class.")
flags.DEFINE_integer("seed", data.EMBEDDED_SEED, "Seed of the subset choice.")
flags.DEFINE_string("output", data.EMBEDDED_PATH, "Output .npz file.")

_COPYRIGHT = "/usr/share/doc/dataset-fashion-mnist/copyright"


def main(argv):
    del argv
    arrays = {}
    for split, per_class in (("train", FLAGS.train_per_class),
                             ("test", FLAGS.test_per_class)):
        images, labels = data.read_fashion_mnist_dir(FLAGS.source_dir, split)
        chosen = data.class_balanced_indices(labels, per_class=per_class,
                                             seed=FLAGS.seed)
        arrays[f"{split}_images"] = images[chosen, :, :, 0]
        arrays[f"{split}_labels"] = labels[chosen].astype(np.uint8)
    tmp = FLAGS.output + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, FLAGS.output)
    if os.path.exists(_COPYRIGHT):
        shutil.copyfile(_COPYRIGHT, os.path.join(os.path.dirname(FLAGS.output),
                                                 "LICENSE.fashion-mnist"))
    print(f"wrote {FLAGS.output} ({os.path.getsize(FLAGS.output) / 1e6:.1f} MB): "
          + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    app.run(main)
