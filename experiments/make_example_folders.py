"""Writes the embedded Fashion-MNIST subset as folders of image files, laid
out as a user with many unlabelled images and a few labelled ones has them:

    DIR/unlabelled/          flat folder of PNG/JPEG files (no labels)
    DIR/labelled/<class>/    --labels_per_class images per class
    DIR/test/<class>/        the embedded test split (--test_per_class each)

    python -m experiments.make_example_folders --output=examples/own_images

The README's "Your own images" walkthrough runs on these.
"""

import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Folder to write (must not exist or be empty).")
flags.DEFINE_integer("labels_per_class", 10, "Labelled images per class.")
flags.DEFINE_integer("unlabelled", 5000, "Unlabelled images (from the rest of the train split).")
flags.DEFINE_integer("test_per_class", 100, "Test images per class.")
flags.DEFINE_integer("seed", 0, "Which images go where.")
flags.DEFINE_enum("source", "embedded", ["embedded", "fashion_mnist"],
                  "embedded: the subset shipped in the package (what the recipes were tuned "
                  "on); fashion_mnist: the full Fashion-MNIST less that subset, images no "
                  "recipe was tuned on (needs `apt-get install dataset-fashion-mnist`).")
flags.DEFINE_string("data_dir", None, "The Fashion-MNIST folder, for --source=fashion_mnist.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.output:
        raise app.UsageError("--output is required")
    if os.path.isdir(FLAGS.output) and os.listdir(FLAGS.output):
        raise app.UsageError(f"{FLAGS.output} is not empty")
    import numpy as np
    from PIL import Image
    from contrastive_tf import data

    rng = np.random.RandomState(FLAGS.seed)
    if FLAGS.source == "embedded":
        train, test = data.load_embedded("train"), data.load_embedded("test")
    else:
        train, test = (_outside_the_embedded_subset(data, split) for split in ("train", "test"))
    names = [name.replace("/", "-").replace(" ", "_") for name in train.class_names]
    labelled = data.class_balanced_indices(train.labels, per_class=FLAGS.labels_per_class,
                                           seed=FLAGS.seed)
    rest = rng.permutation(np.setdiff1d(np.arange(train.num_examples), labelled))
    tested = data.class_balanced_indices(test.labels, per_class=FLAGS.test_per_class,
                                         seed=FLAGS.seed)

    def write(image, folder, stem, index):
        os.makedirs(folder, exist_ok=True)
        fmt = "png" if index % 2 else "jpg"  # both formats, as real folders have
        Image.fromarray(image[..., 0], "L").save(os.path.join(folder, f"{stem}.{fmt}"))

    for n, i in enumerate(rest[:FLAGS.unlabelled]):
        write(train.images[i], os.path.join(FLAGS.output, "unlabelled"), f"img{n:05d}", n)
    for n, i in enumerate(labelled):
        write(train.images[i], os.path.join(FLAGS.output, "labelled", names[train.labels[i]]),
              f"img{n:05d}", n)
    for n, i in enumerate(tested):
        write(test.images[i], os.path.join(FLAGS.output, "test", names[test.labels[i]]),
              f"img{n:05d}", n)
    print(f"wrote {min(FLAGS.unlabelled, len(rest))} unlabelled, {len(labelled)} labelled "
          f"and {len(tested)} test images to {FLAGS.output}")


def _outside_the_embedded_subset(data, split):
    """The full Fashion-MNIST `split` without the images of the embedded subset."""
    import numpy as np
    full = data.load_fashion_mnist(split, FLAGS.data_dir)
    embedded = data.class_balanced_indices(
        full.labels, per_class=data.EMBEDDED_PER_CLASS[split], seed=data.EMBEDDED_SEED)
    kept = np.setdiff1d(np.arange(full.num_examples), embedded)
    return data.from_arrays(full.images[kept], full.labels[kept], full.class_names,
                            spec="fashion_mnist less the embedded subset", split=split)


if __name__ == "__main__":
    app.run(main)
