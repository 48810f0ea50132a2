"""SimCLR's two-view augmentation and the evaluation preprocessing.

`SimCLRAugmenter` turns a batch of images into one random view per call;
calling it twice gives the positive pair. It runs inside the model's graph,
vectorised over the batch, so the data pipeline can ship uint8 images.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import keras_cv
import tensorflow as tf

from contrastive_tf import data, distribution



def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) <= 0:
        raise ValueError(
            f"Expected {name} to be a positive int or a pair of them. "
            f"Received: {name}={value}")
    return value


def _range(value, name: str, low: float, high: float | None) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if (len(value) != 2 or value[0] > value[1] or value[0] < low
            or (high is not None and value[1] > high)):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(
            f"Expected {name} to be (min, max) with min <= max within {bound}. "
            f"Received: {name}={value}")
    return value


def _probability(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"Expected {name} in [0, 1]. Received: {name}={value}")
    return value


def to_float_images(images) -> tf.Tensor:
    """Converts uint8/uint16 images to float32 in [0, 1]; floats are kept.

    Float inputs are taken to be in [0, 1] already and are clipped there.
    """
    images = tf.convert_to_tensor(images)
    if images.dtype.is_integer:
        scale = float(images.dtype.max)
        return tf.cast(images, tf.float32) / scale
    return tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 1.0)


def grayscale(images: tf.Tensor) -> tf.Tensor:
    """Luma of RGB images, kept at the same channel count."""
    channels = images.shape[-1]
    if channels == 1:
        return images
    luma = tf.reduce_sum(images * tf.constant(data.LUMA, images.dtype), axis=-1,
                         keepdims=True)
    return tf.tile(luma, [1, 1, 1, channels])


def shift_hue(images: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
    """Rotates the HSV hue of each RGB image by its `shift` (turns), keeping
    saturation and value: `hsv_to_rgb(rgb_to_hsv(x) + (shift, 0, 0))` as
    `tf.image.adjust_hue` defines it, computed in RGB.

    With M, m the largest and smallest channel and C = M - m, each output
    channel is `m + C * d(h')` for the rotated hue h' (`d` as in
    `tf.image.hsv_to_rgb`), so the HSV round trip reduces to elementwise ops
    on the three channel planes, cheaper than TensorFlow's `rgb_to_hsv` +
    `hsv_to_rgb` kernels (measured: BENCHMARKS.md, "partitioned colour
    jitter").

    Args:
        images: `(batch, height, width, 3)` floats in [0, 1].
        shift: `(batch,)` hue shifts, in turns.
    """
    r, g, b = tf.unstack(images, axis=-1)
    top = tf.maximum(tf.maximum(r, g), b)
    bottom = tf.minimum(tf.minimum(r, g), b)
    chroma = top - bottom
    safe = tf.where(chroma > 0, chroma, tf.ones_like(chroma))
    sextant = tf.where(top == r, (g - b) / safe,
                       tf.where(top == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    rotated = 6.0 * tf.math.floormod(sextant / 6.0 + tf.reshape(shift, [-1, 1, 1]), 1.0)
    red = tf.clip_by_value(tf.abs(rotated - 3.0) - 1.0, 0.0, 1.0)
    green = tf.clip_by_value(2.0 - tf.abs(rotated - 2.0), 0.0, 1.0)
    blue = tf.clip_by_value(2.0 - tf.abs(rotated - 4.0), 0.0, 1.0)
    return tf.stack([bottom + chroma * red, bottom + chroma * green,
                     bottom + chroma * blue], axis=-1)


def color_jitter(images: tf.Tensor, factors: tf.Tensor, hue_shifts: tf.Tensor,
                 order: tf.Tensor) -> tf.Tensor:
    """Brightness, contrast, saturation and hue changes in a per-image order,
    each followed by clipping to [0, 1].

    Args:
        images: `(batch, height, width, channels)` floats in [0, 1]; with 1
            channel only brightness and contrast apply.
        factors: `(3, batch)` brightness, contrast and saturation factors
            (brightness multiplies, contrast scales around each channel's
            mean, saturation scales away from the luma).
        hue_shifts: `(batch,)` hue rotations in turns (`shift_hue`).
        order: `(batch, k)` int32, a permutation of the k ops (4 for RGB,
            2 for grayscale: 0 brightness, 1 contrast, 2 saturation, 3 hue)
            per image.

    At each of the k steps every image gets its own op: the batch is split
    by op (`dynamic_partition`), each op runs on its part only, and the parts
    are stitched back, so a step costs about one op per image rather than
    every op on every image and a select (measured: BENCHMARKS.md).
    """
    per_image = lambda v: tf.reshape(v, [-1, 1, 1, 1])  # noqa: E731

    def brightness(x, rows):
        return x * per_image(tf.gather(factors[0], rows))

    def contrast(x, rows):
        mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        return (x - mean) * per_image(tf.gather(factors[1], rows)) + mean

    def saturation(x, rows):
        gray = grayscale(x)
        return gray + (x - gray) * per_image(tf.gather(factors[2], rows))

    def hue(x, rows):
        return shift_hue(x, tf.gather(hue_shifts, rows))

    count = order.shape[-1]
    transforms = [brightness, contrast, saturation, hue][:count]
    positions = tf.range(tf.shape(images)[0])
    for step in range(count):
        chosen = order[:, step]
        parts = tf.dynamic_partition(images, chosen, count)
        rows = tf.dynamic_partition(positions, chosen, count)
        images = tf.dynamic_stitch(
            rows, [tf.clip_by_value(transform(part, part_rows), 0.0, 1.0)
                   for transform, part, part_rows in zip(transforms, parts, rows)])
    return images


def center_crop_and_resize(images: tf.Tensor, size: tuple[int, int],
                           crop_fraction: float) -> tf.Tensor:
    """Central crop of `crop_fraction` of each side, resized to `size`."""
    if crop_fraction < 1.0:
        images = tf.image.central_crop(images, crop_fraction)
    if tuple(images.shape[1:3]) != tuple(size):
        images = tf.image.resize(images, size, method="bilinear")
    return tf.clip_by_value(images, 0.0, 1.0)


def _draw_counter(layer: keras.layers.Layer) -> keras.Variable:
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


def _next_seed(seed: int | None, counter: keras.Variable, stream: int) -> tf.Tensor:
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
                 aspect_ratio=(3 / 4, 4 / 3), flip=True, seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        # The base class makes a tf.random.Generator this layer never uses;
        # a seed keeps it off the global generator, which op determinism
        # forbids.
        super().__init__(seed=(seed or 0) + 1, **kwargs)
        self.target_size = _pair(target_size, "target_size")
        self.crop_area = _range(crop_area, "crop_area", 0.0, 1.0)
        if self.crop_area[0] <= 0:
            raise ValueError(f"Expected crop_area > 0. Received: crop_area={self.crop_area}")
        self.aspect_ratio = _range(aspect_ratio, "aspect_ratio", 1e-3, None)
        self.flip = bool(flip)
        self.seed = seed
        self._draws = _draw_counter(self)

    def get_random_transformation_batch(self, batch_size, images=None, **kwargs):
        """Boxes `(batch, 4)` as `(y1, x1, y2, x2)` fractions; x1 > x2 mirrors.

        Each image tries `MAX_CROP_ATTEMPTS` (area, aspect) draws and keeps
        the first whose box fits inside the image, so accepted boxes follow
        the spec's distribution restricted to boxes that fit (the
        reference redraws the same way); if none fits, the largest centred
        box with an allowed aspect ratio is used.
        """
        seeds = tf.random.experimental.stateless_split(
            _next_seed(self.seed, self._draws, CROP_STREAM), num=5)
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


@keras.saving.register_keras_serializable(package="contrastive_tf")
class SimCLRAugmenter(keras.layers.Layer):
    """One random SimCLR view of each image in a batch.

    In order: random resized crop and horizontal flip (`RandomResizedCrop`, a
    vectorised KerasCV layer), colour jitter with probability
    `jitter_probability` (brightness, contrast, saturation, hue in a random
    order per image, clipped to [0, 1] after each), grayscale with
    probability `grayscale_probability`, optional Gaussian blur and optional
    solarisation. Every step is vectorised over the batch; every call draws
    fresh randomness, so calling the layer twice gives a positive pair.

    With `training=False` it applies the evaluation preprocessing instead: a
    central crop of 0.875 (none for images of 32 px or less) resized to
    `image_size`.

    Grayscale (1-channel) images are accepted: brightness and contrast apply,
    saturation, hue and grayscale are no-ops, and the output keeps 1 channel.

    Args:
        image_size: output side, int or `(height, width)`.
        crop_area: range of the crop's area fraction. Defaults to
            `(0.08, 1.0)`.
        aspect_ratio: range of the crop's aspect ratio. Defaults to
            `(3/4, 4/3)`.
        flip: random horizontal flip with p = 0.5. Defaults to `True`.
        color_strength: colour distortion strength `s` (1.0 ImageNet, 0.5
            CIFAR). Brightness, contrast and saturation factors are drawn from
            U(max(0, 1 - 0.8s), 1 + 0.8s), the hue shift from U(-0.2s, 0.2s).
            Defaults to `0.5`.
        jitter_probability: probability of colour jitter. Defaults to `0.8`.
        grayscale_probability: probability of grayscale. Defaults to `0.2`.
        blur: apply Gaussian blur with probability `blur_probability`.
            Defaults to `False` (the CIFAR recipe; ImageNet turns it on).
        blur_probability: Defaults to `0.5`.
        blur_sigma: range of the blur's sigma in pixels. Defaults to
            `(0.1, 2.0)`.
        solarize_probability: probability of solarisation (not part of
            SimCLR; BYOL uses 0.2). Defaults to `0.0`.
        seed: optional int seed for reproducible views.

    Call arguments:
        images: `(batch, height, width, channels)` uint8, uint16 or float
            (float in [0, 1]) images with 1 or 3 channels.
        training: augment when true (default), preprocess for evaluation when
            false.

    Returns:
        float32 images in [0, 1] of shape `(batch, *image_size, channels)`.

    Example:
    >>> augmenter = SimCLRAugmenter(image_size=32, seed=1)
    >>> images = tf.zeros((4, 32, 32, 3), tf.uint8)
    >>> view1, view2 = augmenter(images), augmenter(images)

    References:
        - [Chen et al., 2020](https://arxiv.org/abs/2002.05709), appendix A.
    """

    def __init__(self,
                 image_size: int | Sequence[int],
                 crop_area: Sequence[float] = (0.08, 1.0),
                 aspect_ratio: Sequence[float] = (3 / 4, 4 / 3),
                 flip: bool = True,
                 color_strength: float = 0.5,
                 jitter_probability: float = 0.8,
                 grayscale_probability: float = 0.2,
                 blur: bool = False,
                 blur_probability: float = 0.5,
                 blur_sigma: Sequence[float] = (0.1, 2.0),
                 solarize_probability: float = 0.0,
                 seed: int | None = None,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.image_size = _pair(image_size, "image_size")
        self.crop_area = _range(crop_area, "crop_area", 0.0, 1.0)
        if self.crop_area[0] <= 0:
            raise ValueError(
                f"Expected crop_area > 0. Received: crop_area={self.crop_area}")
        self.aspect_ratio = _range(aspect_ratio, "aspect_ratio", 1e-3, None)
        self.flip = bool(flip)
        self.color_strength = float(color_strength)
        if self.color_strength < 0:
            raise ValueError("Expected color_strength >= 0. Received: "
                             f"color_strength={color_strength}")
        self.jitter_probability = _probability(jitter_probability,
                                               "jitter_probability")
        self.grayscale_probability = _probability(grayscale_probability,
                                                  "grayscale_probability")
        self.blur = bool(blur)
        self.blur_probability = _probability(blur_probability,
                                             "blur_probability")
        self.blur_sigma = _range(blur_sigma, "blur_sigma", 1e-6, None)
        self.solarize_probability = _probability(solarize_probability,
                                                 "solarize_probability")
        self.seed = seed
        # Kernel of about 10% of the side, odd, as in the reference.
        self.blur_radius = max(1, min(self.image_size) // 10 // 2)
        self.eval_crop_fraction = 1.0 if max(self.image_size) <= 32 else 0.875

        self._crop = RandomResizedCrop(self.image_size, self.crop_area,
                                       self.aspect_ratio, self.flip, seed=seed)
        self._draws = _draw_counter(self)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels not in (1, 3):
            raise ValueError(
                "SimCLRAugmenter expects images with 1 or 3 channels. "
                f"Received input shape {tuple(input_shape)}")
        self.built = True

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.image_size, input_shape[-1])

    def call(self, images, training=True):
        images = to_float_images(images)
        if images.shape.rank != 4:
            raise ValueError("SimCLRAugmenter expects a batch of images "
                             "(batch, height, width, channels). Received "
                             f"shape {images.shape}")
        if not training:
            return center_crop_and_resize(images, self.image_size,
                                          self.eval_crop_fraction)
        views = tf.clip_by_value(self._crop(images), 0.0, 1.0)
        return self._apply_decisions(
            views, self._draw_decisions(tf.shape(images)[0], views.shape[-1]))

    def _draw_decisions(self, batch, channels: int) -> dict:
        """Every random decision of one call after the crop, per image.

        Each decision has its own stream of the call's seed, so all are
        independent of each other, of the crop's (another stream) and of the
        other view's (another draw count).
        """
        seeds = tf.unstack(tf.random.experimental.stateless_split(
            _next_seed(self.seed, self._draws, VIEW_STREAM), num=8))
        uniform = lambda seed, low=0.0, high=1.0, shape=None: (  # noqa: E731
            tf.random.stateless_uniform(shape or [batch], seed, low, high))
        strength = 0.8 * self.color_strength
        count = 4 if channels == 3 else 2
        return {
            "jitter": uniform(seeds[0]) < self.jitter_probability,
            "factors": uniform(seeds[1], max(0.0, 1.0 - strength), 1.0 + strength,
                               shape=[3, batch]),
            "hue_shifts": uniform(seeds[2], -0.2 * self.color_strength,
                                  0.2 * self.color_strength),
            "order": tf.argsort(uniform(seeds[3], shape=[batch, count]), axis=-1),
            "grayscale": uniform(seeds[4]) < self.grayscale_probability,
            "blur": uniform(seeds[5]) < self.blur_probability,
            "sigma": uniform(seeds[6], self.blur_sigma[0], self.blur_sigma[1]),
            "solarize": uniform(seeds[7]) < self.solarize_probability,
        }

    def _apply_decisions(self, views, decisions: dict):
        """Colour jitter, grayscale, blur and solarisation as `decisions` say."""
        if self.jitter_probability > 0 and self.color_strength > 0:
            jittered = color_jitter(views, decisions["factors"],
                                    decisions["hue_shifts"], decisions["order"])
            views = self._where_per_image(decisions["jitter"], jittered, views)
        if self.grayscale_probability > 0 and views.shape[-1] == 3:
            views = self._where_per_image(decisions["grayscale"], grayscale(views), views)
        if self.blur and self.blur_probability > 0:
            views = self._where_per_image(
                decisions["blur"], self._gaussian_blur(views, decisions["sigma"]), views)
        if self.solarize_probability > 0:
            views = self._where_per_image(
                decisions["solarize"], tf.where(views < 0.5, views, 1.0 - views), views)
        return views

    # -- vectorised pieces -------------------------------------------------

    @staticmethod
    def _where_per_image(mask, if_true, if_false):
        return tf.where(tf.reshape(mask, [-1, 1, 1, 1]), if_true, if_false)

    def _gaussian_blur(self, images, sigma):
        """Separable Gaussian blur with a different sigma per image."""
        radius = self.blur_radius
        taps = tf.range(-radius, radius + 1, dtype=tf.float32)
        kernel = tf.exp(-tf.square(taps)[None, :] /
                        (2.0 * tf.square(sigma)[:, None]))
        kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)
        shape = tf.shape(images)
        batch, height, width = shape[0], shape[1], shape[2]
        channels = images.shape[-1]
        # Fold the batch into channels so one depthwise conv blurs every image
        # with its own kernel.
        stacked = tf.reshape(tf.transpose(images, [1, 2, 0, 3]),
                             [1, height, width, batch * channels])
        kernel = tf.repeat(kernel, channels, axis=0)  # (batch*channels, taps)
        kernel = tf.transpose(kernel)
        vertical = tf.reshape(kernel, [2 * radius + 1, 1, -1, 1])
        horizontal = tf.reshape(kernel, [1, 2 * radius + 1, -1, 1])
        padded = tf.pad(stacked, [[0, 0], [radius, radius], [0, 0], [0, 0]],
                        mode="REFLECT")
        stacked = tf.nn.depthwise_conv2d(padded, vertical, [1, 1, 1, 1], "VALID")
        padded = tf.pad(stacked, [[0, 0], [0, 0], [radius, radius], [0, 0]],
                        mode="REFLECT")
        stacked = tf.nn.depthwise_conv2d(padded, horizontal, [1, 1, 1, 1],
                                         "VALID")
        out = tf.reshape(stacked, [height, width, batch, channels])
        # The kernel's weights sum to 1 only up to rounding, which can leave
        # a value a few ulps above 1.
        return tf.clip_by_value(tf.transpose(out, [2, 0, 1, 3]), 0.0, 1.0)

    def get_config(self):
        config = super().get_config()
        config.update({
            "image_size": list(self.image_size),
            "crop_area": list(self.crop_area),
            "aspect_ratio": list(self.aspect_ratio),
            "flip": self.flip,
            "color_strength": self.color_strength,
            "jitter_probability": self.jitter_probability,
            "grayscale_probability": self.grayscale_probability,
            "blur": self.blur,
            "blur_probability": self.blur_probability,
            "blur_sigma": list(self.blur_sigma),
            "solarize_probability": self.solarize_probability,
            "seed": self.seed,
        })
        return config
