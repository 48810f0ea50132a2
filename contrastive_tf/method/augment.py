"""SimCLR's two-view augmentation and the evaluation preprocessing.

`SimCLRAugmenter` turns a batch of images into one random view per call;
calling it twice gives the positive pair. It runs inside the model's graph,
vectorised over the batch, so the data pipeline can ship uint8 images.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from contrastive_tf.method.color import color_jitter, grayscale, to_float_images
from contrastive_tf.method.crop import (VIEW_STREAM, RandomResizedCrop, check_pair,
                                        check_range, draw_counter, next_seed)


def check_probability(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"Expected {name} in [0, 1]. Received: {name}={value}")
    return value


def center_crop_and_resize(images: tf.Tensor, size: tuple[int, int],
                           crop_fraction: float) -> tf.Tensor:
    """Central crop of `crop_fraction` of each side, resized to `size`."""
    if crop_fraction < 1.0:
        images = tf.image.central_crop(images, crop_fraction)
    if tuple(images.shape[1:3]) != tuple(size):
        images = tf.image.resize(images, size, method="bilinear")
    return tf.clip_by_value(images, 0.0, 1.0)


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
        cropped: the images are random resized crops already, at
            `image_size` (a folder streamed by `data.stream.view_stream`, which
            crops the whole decoded image): only the steps after the crop
            apply. Defaults to `False`.

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
                 **kwargs):  # pragma: no mutate block (Keras reads this signature)
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.image_size = check_pair(image_size, "image_size")
        self.crop_area = check_range(crop_area, "crop_area", 0.0, 1.0)
        if self.crop_area[0] <= 0:
            raise ValueError(
                f"Expected crop_area > 0. Received: crop_area={self.crop_area}")
        self.aspect_ratio = check_range(aspect_ratio, "aspect_ratio", 1e-3, None)
        self.flip = bool(flip)
        self.color_strength = float(color_strength)
        if self.color_strength < 0:
            raise ValueError("Expected color_strength >= 0. Received: "
                             f"color_strength={color_strength}")
        self.jitter_probability = check_probability(jitter_probability,
                                                    "jitter_probability")
        self.grayscale_probability = check_probability(grayscale_probability,
                                                       "grayscale_probability")
        self.blur = bool(blur)
        self.blur_probability = check_probability(blur_probability,
                                                  "blur_probability")
        self.blur_sigma = check_range(blur_sigma, "blur_sigma", 1e-6, None)
        self.solarize_probability = check_probability(solarize_probability,
                                                      "solarize_probability")
        self.seed = seed
        # Kernel of about 10% of the side, odd, as in the reference.
        self.blur_radius = max(1, min(self.image_size) // 10 // 2)
        self.eval_crop_fraction = 1.0 if max(self.image_size) <= 32 else 0.875

        self._crop = RandomResizedCrop(self.image_size, self.crop_area,
                                       self.aspect_ratio, self.flip, seed=seed)
        self._draws = draw_counter(self)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels not in (1, 3):
            raise ValueError(
                "SimCLRAugmenter expects images with 1 or 3 channels. "
                f"Received input shape {tuple(input_shape)}")
        self.built = True

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.image_size, input_shape[-1])

    def call(self, images, training=True, cropped=False):
        images = to_float_images(images)
        if images.shape.rank != 4:
            raise ValueError("SimCLRAugmenter expects a batch of images "
                             "(batch, height, width, channels). Received "
                             f"shape {images.shape}")
        if not training:
            return center_crop_and_resize(images, self.image_size,
                                          self.eval_crop_fraction)
        if cropped:
            if tuple(images.shape[1:3]) != self.image_size:
                raise ValueError(f"Expected cropped views of {self.image_size}. Received "
                                 f"shape {images.shape}")
            views = images
        else:
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
            next_seed(self.seed, self._draws, VIEW_STREAM), num=8))
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


def finetune_augmenter(image_size: int, crop_min_area: float = 0.08,
                       seed: int = 0) -> SimCLRAugmenter:
    """Crop + flip only, as SimCLR fine-tunes and distils; centre crop at
    evaluation."""
    return SimCLRAugmenter(image_size, crop_area=(crop_min_area, 1.0),
                           color_strength=0.0, jitter_probability=0.0,
                           grayscale_probability=0.0, seed=seed)
