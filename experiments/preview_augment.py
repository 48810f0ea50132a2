"""A picture of SimCLR's views, to judge augmentation settings at a glance.

    python -m experiments.preview_augment --dataset=embedded --output=views.png
    python -m experiments.preview_augment --dataset=folder:photos --image_size=96 \
        --color_strength=1.0 --blur --output=views.png

Each row shows an image and several positive pairs drawn with the given
settings: if the two views of a pair look unrelated, the crops or colours are
too strong; if they look identical, too weak.
"""

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "embedded", "Dataset spec (see README).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir or Fashion-MNIST folder.")
flags.DEFINE_string("split", "train", "Split to draw images from.")
flags.DEFINE_string("output", "views.png", "PNG file to write.")
flags.DEFINE_integer("image_size", 32, "View side in pixels.")
flags.DEFINE_integer("images", 6, "Rows (images).")
flags.DEFINE_integer("pairs", 3, "Positive pairs per image.")
flags.DEFINE_float("color_strength", 0.5, "Colour distortion strength s.")
flags.DEFINE_float("crop_min_area", 0.08, "Smallest crop area fraction.")
flags.DEFINE_bool("blur", False, "Gaussian blur.")
flags.DEFINE_float("solarize_probability", 0.0, "Solarisation probability.")
flags.DEFINE_integer("seed", 0, "Seed of the image choice and the views.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    import numpy as np
    from contrastive_tf import data
    from contrastive_tf.jobs import visualize
    from contrastive_tf.method.augment import SimCLRAugmenter

    source = data.load(FLAGS.dataset, FLAGS.split, FLAGS.data_dir,
                       image_size=FLAGS.image_size)
    if source.images is None:
        images = np.stack([image.numpy() for image, _ in
                           data.pipeline(source, 1, training=False,
                                         image_size=FLAGS.image_size).unbatch()
                           .take(FLAGS.images)])
    else:
        chosen = np.random.RandomState(FLAGS.seed).choice(
            source.num_examples, min(FLAGS.images, source.num_examples), replace=False)
        images = source.images[chosen]
    augmenter = SimCLRAugmenter(FLAGS.image_size, crop_area=(FLAGS.crop_min_area, 1.0),
                                color_strength=FLAGS.color_strength, blur=FLAGS.blur,
                                solarize_probability=FLAGS.solarize_probability,
                                seed=FLAGS.seed)
    path = visualize.view_grid(
        images, augmenter, FLAGS.output, FLAGS.pairs,
        title=f"{FLAGS.dataset}: s={FLAGS.color_strength}, crop>={FLAGS.crop_min_area}, "
              f"blur={'on' if FLAGS.blur else 'off'}")
    print(f"[preview_augment] wrote {path}")


if __name__ == "__main__":
    app.run(main)
