"""The random resized crop (a KerasCV vectorised layer) and the seeded
draws every random layer of the method uses.

Random numbers come from stateless ops seeded by (seed, the layer's draw
count, its stream tag, the replica id): reproducible, different on every
replica, and continued after a checkpoint restore.
"""

from __future__ import annotations

import math

import keras
import keras_cv
import tensorflow as tf

from contrastive_tf.runtime import distribution


def check_pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) <= 0:
        raise ValueError(
            f"Expected {name} to be a positive int or a pair of them. "
            f"Received: {name}={value}")
    return value


def check_range(value, name: str, low: float, high: float | None) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if (len(value) != 2 or value[0] > value[1] or value[0] < low
            or (high is not None and value[1] > high)):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(
            f"Expected {name} to be (min, max) with min <= max within {bound}. "
            f"Received: {name}={value}")
    return value


def draw_counter(layer: keras.layers.Layer) -> keras.Variable:
    """A checkpointed count of random draws, the state of a layer's RNG.

    Random numbers come from stateless ops seeded by (seed, draw count,
    replica id), so they are reproducible, differ between replicas, and
    continue where they left off when a checkpoint is restored (a
    `keras.random.SeedGenerator`'s state is not in TF checkpoints).
    """
    return layer.add_weight(name="draws", shape=(), dtype="int64",
                            initializer="zeros", trainable=False,
                            aggregation="only_first_replica")


# Each layer folds its own stream tag into its seed, so the crop layer and the
# augmenter never draw the same numbers (they share the seed and each count
# their draws from 0).
CROP_STREAM, VIEW_STREAM = 1, 2


def next_seed(seed: int | None, counter: keras.Variable, stream: int) -> tf.Tensor:
    """The stateless seed of a layer's next draw: (seed, draw count) with the
    layer's `stream` tag and the replica id folded in; advances the count."""
    count = tf.convert_to_tensor(counter)
    counter.assign(count + 1)
    base = tf.stack([tf.constant(seed if seed is not None else 0, tf.int64), count])
    base = tf.random.experimental.stateless_fold_in(base, tf.constant(stream, tf.int64))
    return distribution.replica_seed(base)


@keras.saving.register_keras_serializable(package="contrastive_tf")
class RandomResizedCrop(keras_cv.layers.VectorizedBaseImageAugmentationLayer):
    """Random resized crop and horizontal flip, vectorised over the batch.

    A KerasCV vectorised augmentation layer. Each image gets a box of area
    fraction U(`crop_area`) and log-uniform aspect ratio in `aspect_ratio`
    (redrawn, vectorised, up to `MAX_CROP_ATTEMPTS` times until it fits
    inside the image; then a centred fallback), placed uniformly, and
    optionally mirrored with p = 0.5; all boxes are cut and resized by one
    batched `tf.image.crop_and_resize` (bilinear; a box with x1 > x2 is read
    mirrored, which is how the flip costs nothing).

    Args:
        target_size: `(height, width)` of the output.
        crop_area: range of the box's area fraction. Defaults to `(0.08, 1)`.
        aspect_ratio: range of width/height. Defaults to `(3/4, 4/3)`.
        flip: mirror half of the boxes. Defaults to `True`.
        seed: int seed. Defaults to `None` (0).
    """

    MAX_CROP_ATTEMPTS = 10

    def __init__(self, target_size, crop_area=(0.08, 1.0),
                 aspect_ratio=(3 / 4, 4 / 3), flip=True, seed=None,
                 **kwargs):  # pragma: no mutate block (Keras reads this signature)
        kwargs.setdefault("dtype", "float32")
        # The base class makes a tf.random.Generator this layer never uses;
        # a seed keeps it off the global generator, which op determinism
        # forbids.
        super().__init__(seed=(seed or 0) + 1, **kwargs)
        self.target_size = check_pair(target_size, "target_size")
        self.crop_area = check_range(crop_area, "crop_area", 0.0, 1.0)
        if self.crop_area[0] <= 0:
            raise ValueError(f"Expected crop_area > 0. Received: crop_area={self.crop_area}")
        self.aspect_ratio = check_range(aspect_ratio, "aspect_ratio", 1e-3, None)
        self.flip = bool(flip)
        self.seed = seed
        self._draws = draw_counter(self)

    def get_random_transformation_batch(self, batch_size, images=None, **kwargs):
        """Boxes `(batch, 4)` as `(y1, x1, y2, x2)` fractions; x1 > x2 mirrors.

        Each image tries `MAX_CROP_ATTEMPTS` (area, aspect) draws and keeps
        the first whose box fits inside the image, so accepted boxes follow
        the spec's distribution restricted to boxes that fit (the
        reference redraws the same way); if none fits, the largest centred
        box with an allowed aspect ratio is used.
        """
        seeds = tf.random.experimental.stateless_split(
            next_seed(self.seed, self._draws, CROP_STREAM), num=5)
        # Pixel aspect ratio of the input (width / height).
        if images is None:
            image_aspect = tf.constant(1.0)
        else:
            shape = tf.cast(tf.shape(images), tf.float32)
            image_aspect = shape[2] / shape[1]
        attempts = [self.MAX_CROP_ATTEMPTS, batch_size]
        area = tf.random.stateless_uniform(attempts, seeds[0],
                                           self.crop_area[0], self.crop_area[1])
        ratio = tf.exp(tf.random.stateless_uniform(
            attempts, seeds[1], math.log(self.aspect_ratio[0]),
            math.log(self.aspect_ratio[1])))
        # Fractions of the image's width and height: width * height = area,
        # (width * W) / (height * H) = ratio.
        width = tf.sqrt(area * ratio / image_aspect)
        height = tf.sqrt(area / ratio * image_aspect)
        fits = (width <= 1.0) & (height <= 1.0)
        first = tf.argmax(tf.cast(fits, tf.int32), axis=0, output_type=tf.int32)
        pick = lambda values: tf.gather(tf.transpose(values), first, batch_dims=1)  # noqa: E731
        found = tf.reduce_any(fits, axis=0)
        # Fallback: the whole image, cut to the nearest allowed aspect ratio.
        low, high = self.aspect_ratio
        fallback_width = tf.minimum(1.0, high / image_aspect)
        fallback_height = tf.minimum(1.0, image_aspect / low)
        width = tf.where(found, pick(width), fallback_width)
        height = tf.where(found, pick(height), fallback_height)
        top_u = tf.where(found, tf.random.stateless_uniform([batch_size], seeds[2]), 0.5)
        left_u = tf.where(found, tf.random.stateless_uniform([batch_size], seeds[3]), 0.5)
        top, left = top_u * (1.0 - height), left_u * (1.0 - width)
        boxes = tf.stack([top, left, top + height, left + width], axis=1)
        if self.flip:
            mirror = tf.random.stateless_uniform([batch_size], seeds[4]) < 0.5
            boxes = tf.where(mirror[:, None], tf.gather(boxes, [0, 3, 2, 1], axis=1),
                             boxes)
        return boxes

    def augment_images(self, images, transformations, **kwargs):
        batch = tf.shape(images)[0]
        return tf.image.crop_and_resize(images, transformations, tf.range(batch),
                                        self.target_size, method="bilinear")

    def augment_labels(self, labels, transformations, **kwargs):
        return labels

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.target_size, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"target_size": list(self.target_size),
                       "crop_area": list(self.crop_area),
                       "aspect_ratio": list(self.aspect_ratio),
                       "flip": self.flip, "seed": self.seed})
        return config
