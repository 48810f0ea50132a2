"""ResNet encoders f(x) = h for SimCLR (v1 and v2, with selective kernels).

`resnet(...)` returns a functional `keras.Model` that maps float images in
[0, 1] to the global-average-pooled output of the last block.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf
from keras import layers, ops

from contrastive_tf import distribution

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


@keras.saving.register_keras_serializable(package="contrastive_tf")
class FusedBatchNormalization(layers.BatchNormalization):
    """`BatchNormalization` through TensorFlow's fused kernel.

    Same weights, arguments and results as `keras.layers.BatchNormalization`
    (moving statistics use the biased batch variance, as Keras does), but
    one `FusedBatchNormV3` op forward and one backward instead of Keras 3's
    float32 upcast, moments and elementwise ops with their autodiff
    gradients: on this project's 2-core CPU, BN + ReLU forward and backward
    at ResNet-18's first stage in bfloat16 went from about 4x the time of
    the 3x3 convolution beside it to under 1x (BENCHMARKS.md). Statistics are
    still computed in float32 for bfloat16/float16 inputs. Falls back to the
    Keras implementation for synchronised BN, masks, renorm, other axes,
    ranks other than 4 (images) and 2 (features, run as 1x1 images), and
    other backends. TensorFlow's fused op needs epsilon >=
    1.001e-5; smaller values are raised to that.
    """

    def _fusable(self, inputs, mask):
        return (keras.backend.backend() == "tensorflow" and mask is None
                and not self.synchronized and not self.renorm
                and len(inputs.shape) in (2, 4) and self.axis in (-1, len(inputs.shape) - 1)
                and inputs.dtype in (tf.float32, tf.bfloat16, tf.float16))

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        flat = len(inputs.shape) == 2
        if flat:  # (batch, features) as a (batch, 1, 1, features) image
            inputs = tf.reshape(inputs, [-1, 1, 1, channels])
        gamma = self.gamma if self.scale else tf.ones([channels], tf.float32)
        beta = self.beta if self.center else tf.zeros([channels], tf.float32)
        epsilon = max(self.epsilon, 1.001e-5)
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=epsilon, is_training=True)
            # The op returns the unbiased variance; Keras tracks the biased one.
            count = tf.cast(tf.size(inputs) // channels, tf.float32)
            variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
            self.moving_mean.assign(self.moving_mean * self.momentum
                                    + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum
                                        + variance * (1.0 - self.momentum))
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, mean=self.moving_mean,
                variance=self.moving_variance, epsilon=epsilon, is_training=False)
        if flat:
            outputs = tf.reshape(outputs, [-1, channels])
        return ops.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="contrastive_tf")
class SmallMapConv2D(layers.Conv2D):
    """`Conv2D` whose kernel gradient is matrix products (one per kernel
    tap) when the output map is small.

    oneDNN's bfloat16 weight-gradient kernel is slow on small maps: on this
    project's 2-core AMX CPU, ResNet-18 at 32 px (256 views) computed it at
    160-220 GFLOP/s for the last stage's 4x4 maps (5 to 6 times the forward
    convolution's time) and about 610 for 3x3 convolutions on 8x8 maps,
    whereas one `matmul` per tap over shifted input slices (taken from
    `space_to_depth` for strided convolutions) does the same sums at
    500-1,060 there. On 16x16 and larger maps oneDNN is faster, so this
    route is taken only when the output has at most `matmul_grad_max_pixels`
    pixels (default 64: 8x8); otherwise, and for dilation, groups,
    channels-first data or other backends, this is Keras' `Conv2D`.
    Forward pass, input gradient and results are unchanged (the same sums,
    in another order). Measurements: BENCHMARKS.md.
    """

    def __init__(self, *args, matmul_grad_max_pixels: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.matmul_grad_max_pixels = int(matmul_grad_max_pixels)

    def _tap_gradient(self, inputs) -> bool:
        if (keras.backend.backend() != "tensorflow" or self.groups != 1
                or self.data_format != "channels_last" or len(inputs.shape) != 4
                or any(d != 1 for d in self.dilation_rate)
                or self.padding not in ("same", "valid")):
            return False
        out = self.compute_output_shape(inputs.shape)
        return (out[1] is not None and out[2] is not None
                and out[1] * out[2] <= self.matmul_grad_max_pixels)

    def call(self, inputs):
        if not self._tap_gradient(inputs):
            return super().call(inputs)
        outputs = _conv2d_tap_gradient(
            inputs, ops.cast(self.kernel, inputs.dtype), tuple(self.strides),
            self.padding.upper())
        if self.use_bias:
            outputs = outputs + ops.cast(self.bias, outputs.dtype)
        return self.activation(outputs) if self.activation is not None else outputs

    def get_config(self):
        config = super().get_config()
        config["matmul_grad_max_pixels"] = self.matmul_grad_max_pixels
        return config


def _conv2d_tap_gradient(x, kernel, strides, padding):
    """tf.nn.conv2d (NHWC) whose kernel gradient is one matrix product per
    kernel tap (`_kernel_gradient`)."""
    step = [1, strides[0], strides[1], 1]

    @tf.custom_gradient
    def conv(x, kernel):
        def gradient(dy):
            dx = tf.compat.v1.nn.conv2d_backprop_input(tf.shape(x), kernel, dy, step,
                                                       padding)
            return dx, _kernel_gradient(x, dy, kernel.shape, strides, padding)
        return tf.nn.conv2d(x, kernel, step, padding), gradient

    return conv(x, kernel)


def _kernel_gradient(x, dy, kernel_shape, strides, padding):
    """d(sum(conv2d(x, w) * dy))/dw as `kh * kw` products `x_tap^T @ dy`.

    x_tap is the (padded) input seen by kernel tap (i, j) at every output
    position. With equal strides s the taps are unstrided slices of
    `space_to_depth(x, s)` (strided slices are slow in TensorFlow); otherwise
    strided slices.
    """
    kh, kw, cin, cout = kernel_shape
    sh, sw = strides
    oh, ow = dy.shape[1], dy.shape[2]
    height, width = x.shape[1], x.shape[2]
    top = left = 0
    if padding == "SAME":
        top = max((oh - 1) * sh + kh - height, 0) // 2
        left = max((ow - 1) * sw + kw - width, 0) // 2
    # Padded extent: every tap's slice fits, and it divides by the stride.
    ph, pw = sh * ((kh - 1) // sh + oh), sw * ((kw - 1) // sw + ow)
    xp = tf.pad(x, [[0, 0], [top, max(ph - height - top, 0)],
                    [left, max(pw - width - left, 0)], [0, 0]])[:, :ph, :pw, :]
    stacked = sh == sw
    planes = tf.nn.space_to_depth(xp, sh) if stacked and sh > 1 else xp
    dy = tf.reshape(dy, [-1, cout])
    taps = []
    for i in range(kh):
        for j in range(kw):
            if stacked:
                block = (i % sh) * sw + j % sw
                tap = planes[:, i // sh:i // sh + oh, j // sw:j // sw + ow,
                             block * cin:(block + 1) * cin]
            else:
                tap = xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :]
            taps.append(tf.matmul(tf.reshape(tap, [-1, cin]), dy, transpose_a=True))
    return tf.reshape(tf.stack(taps), kernel_shape)


class _Builder:
    """Holds the shared settings while the functional graph is laid out."""

    def __init__(self, bn_momentum, bn_epsilon, synchronized, sk_ratio):
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.synchronized = synchronized
        self.sk_ratio = sk_ratio

    def conv(self, x, filters, kernel, strides=1, name=None):
        return SmallMapConv2D(filters, kernel, strides=strides, padding="same",
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

    def spatial_conv(self, x, filters, strides, name):
        """A 3x3 conv + BN + ReLU, or a selective-kernel conv when enabled."""
        if self.sk_ratio <= 0:
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

    def shortcut(self, x, filters, strides, name):
        if x.shape[-1] == filters and strides == 1:
            return x
        if self.sk_ratio > 0 and strides > 1:
            # ResNet-D shortcut, as SimCLRv2 uses with SK.
            x = layers.AveragePooling2D(strides, strides, padding="same")(x)
            strides = 1
        return self.conv_bn(x, filters, 1, strides, relu=False,
                            name=f"{name}_proj")

    def basic_block(self, x, filters, strides, name):
        residual = self.shortcut(x, filters, strides, name)
        x = self.spatial_conv(x, filters, strides, name=f"{name}_1")
        x = self.conv_bn(x, filters, 3, relu=False, zero_gamma=True,
                         name=f"{name}_2")
        return layers.ReLU()(layers.Add()([x, residual]))

    def bottleneck_block(self, x, filters, strides, name):
        residual = self.shortcut(x, 4 * filters, strides, name)
        x = self.conv_bn(x, filters, 1, name=f"{name}_1")
        x = self.spatial_conv(x, filters, strides, name=f"{name}_2")
        x = self.conv_bn(x, 4 * filters, 1, relu=False, zero_gamma=True,
                         name=f"{name}_3")
        return layers.ReLU()(layers.Add()([x, residual]))


def resnet(depth: int,
           width_multiplier: int = 1,
           cifar_stem: bool | None = None,
           sk_ratio: float = 0.0,
           input_shape: Sequence[int] = (224, 224, 3),
           bn_momentum: float = 0.9,
           bn_epsilon: float = 1e-5,
           synchronized_bn: bool | None = None,
           base_width: int = 64,
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
    width_multiplier = int(width_multiplier)
    if cifar_stem is None:
        side = max(s for s in input_shape[:2] if s is not None) \
            if any(s is not None for s in input_shape[:2]) else None
        cifar_stem = side is not None and side <= 32
    if synchronized_bn is None:
        synchronized_bn = distribution.num_replicas() > 1

    kind, stages = _DEPTHS[depth]
    build = _Builder(bn_momentum, bn_epsilon, synchronized_bn, sk_ratio)
    width = base_width * width_multiplier
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    if cifar_stem:
        x = build.conv_bn(inputs, width, 3, 1, name="stem")
    else:
        if sk_ratio > 0:  # ResNet-D deep stem, as SimCLRv2 uses with SK.
            x = build.conv_bn(inputs, width // 2, 3, 2, name="stem_a")
            x = build.conv_bn(x, width // 2, 3, 1, name="stem_b")
            x = build.conv_bn(x, width, 3, 1, name="stem_c")
        else:
            x = build.conv_bn(inputs, width, 7, 2, name="stem")
        x = layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)

    block = build.basic_block if kind == "basic" else build.bottleneck_block
    for stage, blocks in enumerate(stages):
        filters = width * 2 ** stage
        for index in range(blocks):
            strides = 2 if (index == 0 and stage > 0) else 1
            x = block(x, filters, strides, name=f"stage{stage + 1}_block{index + 1}")
        x = layers.Identity(name=f"stage{stage + 1}")(x)
    features = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    features = layers.Activation("linear", dtype="float32", name="features")(features)
    return keras.Model(inputs, features,
                       name=name or f"resnet{depth}_{width_multiplier}x")
