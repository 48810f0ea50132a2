"""Colour operations of SimCLR's augmentation, on float images in [0, 1].

`LUMA` is the one definition of gray in the package: the augmentation's
random grayscale and saturation use it, and so does the data layer when it
turns RGB files into one-channel images for a gray model.
"""

from __future__ import annotations

import tensorflow as tf

# ITU-R 601 luma weights, as tf.image.rgb_to_grayscale uses.
LUMA = (0.2989, 0.5870, 0.1140)


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
    luma = tf.reduce_sum(images * tf.constant(LUMA, images.dtype), axis=-1,
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
