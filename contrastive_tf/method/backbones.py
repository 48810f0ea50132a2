"""ResNet encoders f(x) = h for SimCLR (v1 and v2, with selective kernels).

`resnet(...)` returns a functional `keras.Model` that maps float images in
[0, 1] to the global-average-pooled output of the last block.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers, ops

from contrastive_tf.runtime import distribution
from contrastive_tf.method.kernels import FusedBatchNormalization, SmallMapConv2D

# depth -> (block kind, blocks per stage)
_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
SUPPORTED_DEPTHS = tuple(sorted(_DEPTHS))
LAYOUTS = ("default", "reference")


class _Builder:
    """Holds the shared settings while the functional graph is laid out."""

    def __init__(self, bn_momentum, bn_epsilon, synchronized, sk_ratio, layout):
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.synchronized = synchronized
        self.sk_ratio = sk_ratio
        self.reference = layout == "reference"

    def conv(self, x, filters, kernel, strides=1, name=None):
        padding = "same"
        if self.reference and strides > 1:
            # The reference pads (kernel - 1) split evenly, then convolves
            # without padding; "same" would pad only after on even sizes.
            before = (kernel - 1) // 2
            after = kernel - 1 - before
            x = layers.ZeroPadding2D(((before, after), (before, after)),
                                     name=f"{name}_pad" if name else None)(x)
            padding = "valid"
        return SmallMapConv2D(filters, kernel, strides=strides, padding=padding,
                              use_bias=False, kernel_initializer="he_normal",
                              name=name)(x)

    def bn(self, x, relu=True, zero_gamma=False, name=None):
        x = FusedBatchNormalization(
            momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            gamma_initializer="zeros" if zero_gamma else "ones",
            synchronized=self.synchronized, name=name)(x)
        return layers.ReLU()(x) if relu else x

    def conv_bn(self, x, filters, kernel, strides=1, relu=True,
                zero_gamma=False, name=None):
        x = self.conv(x, filters, kernel, strides, name=f"{name}_conv")
        return self.bn(x, relu, zero_gamma, name=f"{name}_bn")

    def spatial_conv(self, x, filters, strides, name, selective=True):
        """A 3x3 conv + BN + ReLU, or a selective-kernel conv when enabled."""
        if self.sk_ratio <= 0 or not selective:
            return self.conv_bn(x, filters, 3, strides, name=name)
        # SK (SimCLRv2): two 3x3 branches from one conv of 2x width, mixed by
        # per-channel softmax attention computed from their pooled sum.
        both = self.conv_bn(x, 2 * filters, 3, strides, name=f"{name}_sk")
        branch_a, branch_b = ops.split(both, 2, axis=-1)
        pooled = ops.mean(branch_a + branch_b, axis=(1, 2), keepdims=True)
        mid = max(int(filters * self.sk_ratio), 32)
        attention = self.conv_bn(pooled, mid, 1, name=f"{name}_sk_fc")
        attention = self.conv(attention, 2 * filters, 1,
                              name=f"{name}_sk_attn_conv")
        logit_a, logit_b = ops.split(attention, 2, axis=-1)
        weights = ops.softmax(ops.stack([logit_a, logit_b], axis=0), axis=0)
        return branch_a * weights[0] + branch_b * weights[1]

    def stem(self, inputs, width, cifar_stem):
        """CIFAR stem (3x3 stride-1 conv, no max-pool), or the ImageNet stem
        (7x7 stride-2 conv, or the ResNet-D deep stem with SK; 3x3 stride-2
        max-pool)."""
        if cifar_stem:
            return self.conv_bn(inputs, width, 3, 1, name="stem")
        if self.sk_ratio > 0:  # ResNet-D deep stem, as SimCLRv2 uses with SK.
            x = self.conv_bn(inputs, width // 2, 3, 2, name="stem_a")
            x = self.conv_bn(x, width // 2, 3, 1, name="stem_b")
            x = self.conv_bn(x, width, 3, 1, name="stem_c")
        else:
            x = self.conv_bn(inputs, width, 7, 2, name="stem")
        return layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)

    def shortcut(self, x, filters, strides, name, first=False):
        # The reference projects in the first block of every stage, even
        # where the shapes already match (ResNet-18/34's first stage).
        if x.shape[-1] == filters and strides == 1 and not (self.reference and first):
            return x
        if self.sk_ratio > 0 and self.reference:
            # ResNet-D shortcut as the reference lays it out: a 2x2 average
            # pool in every projection (stride 1 in the first stage), the
            # strided one over a map padded by one row and column after.
            if strides > 1:
                x = layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"{name}_proj_pad")(x)
                x = layers.AveragePooling2D(2, strides, padding="valid",
                                            name=f"{name}_proj_pool")(x)
            else:
                x = layers.AveragePooling2D(2, 1, padding="same", name=f"{name}_proj_pool")(x)
            strides = 1
        elif self.sk_ratio > 0 and strides > 1:
            # ResNet-D shortcut, as SimCLRv2 uses with SK.
            x = layers.AveragePooling2D(strides, strides, padding="same")(x)
            strides = 1
        return self.conv_bn(x, filters, 1, strides, relu=False,
                            name=f"{name}_proj")

    def basic_block(self, x, filters, strides, name, first=False):
        residual = self.shortcut(x, filters, strides, name, first)
        # The reference's basic block has no selective kernel.
        x = self.spatial_conv(x, filters, strides, name=f"{name}_1",
                              selective=not self.reference)
        x = self.conv_bn(x, filters, 3, relu=False, zero_gamma=True,
                         name=f"{name}_2")
        return layers.ReLU()(layers.Add()([x, residual]))

    def bottleneck_block(self, x, filters, strides, name, first=False):
        residual = self.shortcut(x, 4 * filters, strides, name, first)
        x = self.conv_bn(x, filters, 1, name=f"{name}_1")
        x = self.spatial_conv(x, filters, strides, name=f"{name}_2")
        x = self.conv_bn(x, 4 * filters, 1, relu=False, zero_gamma=True,
                         name=f"{name}_3")
        return layers.ReLU()(layers.Add()([x, residual]))


def _check_arguments(depth, width_multiplier, sk_ratio, input_shape, base_width,
                     layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"Expected layout in {LAYOUTS}. Received: layout={layout!r}")
    if depth not in _DEPTHS:
        raise ValueError(f"Expected depth in {SUPPORTED_DEPTHS}. "
                         f"Received: depth={depth}")
    if int(width_multiplier) != width_multiplier or width_multiplier < 1:
        raise ValueError("Expected width_multiplier to be a positive int. "
                         f"Received: width_multiplier={width_multiplier}")
    if sk_ratio < 0:
        raise ValueError(f"Expected sk_ratio >= 0. Received: sk_ratio={sk_ratio}")
    if len(input_shape) != 3 or input_shape[-1] not in (1, 3):
        raise ValueError("Expected input_shape (height, width, 1 or 3). "
                         f"Received: input_shape={tuple(input_shape)}")
    if base_width < 1:
        raise ValueError(f"Expected base_width >= 1. Received: base_width={base_width}")


def resnet(depth: int,
           width_multiplier: int = 1,
           cifar_stem: bool | None = None,
           sk_ratio: float = 0.0,
           input_shape: Sequence[int] = (224, 224, 3),
           bn_momentum: float = 0.9,
           bn_epsilon: float = 1e-5,
           synchronized_bn: bool | None = None,
           base_width: int = 64,
           layout: str = "default",
           name: str | None = None) -> keras.Model:
    """A ResNet encoder mapping images to pooled features h.

    Basic blocks for depths 18/34, bottlenecks for 50 and above; the stride
    sits on the 3x3 conv (ResNet v1.5); the last BN of each block starts at
    zero gamma. Images of 32 px or less get the CIFAR stem (3x3 stride-1
    conv, no max-pool) unless `cifar_stem` says otherwise.

    Args:
        depth: one of 18, 34, 50, 101, 152, 200.
        width_multiplier: channel multiplier (1x, 2x, 3x, 4x). Defaults to 1.
        cifar_stem: force the CIFAR stem on or off. Defaults to `None`
            (automatic: on for inputs of 32 px or less).
        sk_ratio: selective-kernel reduction ratio (SimCLRv2 uses 0.0625);
            0 turns SK off. Defaults to `0.0`.
        input_shape: `(height, width, channels)`; height and width may be
            `None` for any size. Defaults to `(224, 224, 3)`.
        bn_momentum: Defaults to `0.9`.
        bn_epsilon: Defaults to `1e-5`.
        synchronized_bn: synchronise BN statistics across replicas. Defaults
            to `None` (on when the current strategy has several replicas).
        base_width: channels of the first stage at 1x. Defaults to `64`;
            smaller values make tiny models for tests and demos.
        layout: "default", or "reference" for the exact layout of
            google-research/simclr's TF code, which its published checkpoints
            need (`contrastive_tf.import_simclr` builds it): strided convs
            pad (kernel - 1) evenly then convolve unpadded; the first block of
            every stage has a projection shortcut; with SK, every projection
            starts with the ResNet-D 2x2 average pool (zero-padded after when
            strided) and basic blocks keep plain 3x3 convs. Defaults to
            `"default"` ("same" padding, projections only where shapes change).
        name: model name. Defaults to `resnet{depth}_{w}x`.

    Returns:
        A `keras.Model` from images to features of width
        `base_width * 8 * width_multiplier` (x4 for bottlenecks).

    Example:
    >>> encoder = resnet(18, input_shape=(32, 32, 3))
    >>> encoder.output_shape
    (None, 512)

    References:
        - [He et al., 2016](https://arxiv.org/abs/1512.03385)
        - [Chen et al., 2020b](https://arxiv.org/abs/2006.10029) (SK, width)
    """
    _check_arguments(depth, width_multiplier, sk_ratio, input_shape, base_width, layout)
    width_multiplier = int(width_multiplier)
    if cifar_stem is None:
        side = max(s for s in input_shape[:2] if s is not None) \
            if any(s is not None for s in input_shape[:2]) else None
        cifar_stem = side is not None and side <= 32
    if synchronized_bn is None:
        synchronized_bn = distribution.num_replicas() > 1

    kind, stages = _DEPTHS[depth]
    build = _Builder(bn_momentum, bn_epsilon, synchronized_bn, sk_ratio, layout)
    width = base_width * width_multiplier
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = build.stem(inputs, width, cifar_stem)
    block = build.basic_block if kind == "basic" else build.bottleneck_block
    for stage, blocks in enumerate(stages):
        filters = width * 2 ** stage
        for index in range(blocks):
            strides = 2 if (index == 0 and stage > 0) else 1
            x = block(x, filters, strides, name=f"stage{stage + 1}_block{index + 1}",
                      first=index == 0)
        x = layers.Identity(name=f"stage{stage + 1}")(x)
    features = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    features = layers.Activation("linear", dtype="float32", name="features")(features)
    return keras.Model(inputs, features,
                       name=name or f"resnet{depth}_{width_multiplier}x")


def freeze_stages(encoder: keras.Model, after_block: int) -> list[str]:
    """Freezes the stem and the first `after_block` stages of a `resnet`
    encoder (as the reference's `fine_tune_after_block`): their weights stop
    training and their batch norm runs in inference mode. -1 freezes
    nothing; 4 freezes the whole encoder. Returns the frozen layers' names.

    Example:
    >>> freeze_stages(encoder, 2)  # stages 3 and 4 (and the heads) train
    """
    if not -1 <= after_block <= 4:
        raise ValueError(f"Expected after_block in [-1, 4]. Received: after_block={after_block}")
    if after_block < 0:
        return []
    prefixes = ("stem",) + tuple(f"stage{s}_" for s in range(1, after_block + 1))
    frozen = []
    for layer in encoder.layers:
        if layer.name.startswith(prefixes) and layer.weights:
            layer.trainable = False
            frozen.append(layer.name)
    if not frozen:
        raise ValueError(f"{encoder.name} has no stem or stage layers to freeze: not an encoder "
                         "built by contrastive_tf.resnet")
    return frozen
