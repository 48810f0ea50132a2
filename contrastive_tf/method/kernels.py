"""Performance kernels: Keras layers that compute the same results as their
Keras parents through faster TensorFlow routes on CPU.

They are not architecture (a model built with the plain Keras layers has the
same weights and outputs); the backbones and heads import them. What each
buys, measured: BENCHMARKS.md ("batch norm", "small-map convolution").
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers, ops


@keras.saving.register_keras_serializable(package="contrastive_tf")
class FusedBatchNormalization(layers.BatchNormalization):
    """`BatchNormalization` through TensorFlow's fused kernel.

    Same weights, arguments and results as `keras.layers.BatchNormalization`
    (moving statistics use the biased batch variance, as Keras does), but
    one `FusedBatchNormV3` op forward and one backward instead of Keras 3's
    float32 upcast, moments and elementwise ops with their autodiff
    gradients (what that saves per step: BENCHMARKS.md). Statistics are
    still computed in float32 for bfloat16/float16 inputs. Falls back to the
    Keras implementation for synchronised BN, masks, renorm, other axes,
    ranks other than 4 (images) and 2 (features, run as 1x1 images), and
    other backends. TensorFlow's fused op needs epsilon >= 1.001e-5;
    smaller values are raised to that.
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

    oneDNN's bfloat16 weight-gradient kernel is slow on small maps
    (ResNet's last stages at 32 px), whereas one `matmul` per tap over
    shifted input slices (taken from `space_to_depth` for strided
    convolutions) does the same sums at close to the machine's matmul rate.
    On larger maps oneDNN is faster, and in float32 its kernel is not slow
    (the route costs a few percent there), so this route is taken only when
    the output has at most `matmul_grad_max_pixels` pixels (default 64: 8x8)
    and the layer computes in one of `matmul_grad_dtypes` (default bfloat16
    and float16); otherwise, and for dilation, groups, channels-first data or
    other backends, this is Keras' `Conv2D`. Forward pass, input gradient
    and results are unchanged (the same sums, in another order).
    Measurements and how the threshold was chosen: BENCHMARKS.md.
    """

    def __init__(self, *args, matmul_grad_max_pixels: int = 64,
                 matmul_grad_dtypes=("bfloat16", "float16"), **kwargs):
        super().__init__(*args, **kwargs)
        self.matmul_grad_max_pixels = int(matmul_grad_max_pixels)
        self.matmul_grad_dtypes = tuple(matmul_grad_dtypes)

    def _tap_gradient(self, inputs) -> bool:
        if (keras.backend.backend() != "tensorflow" or self.groups != 1
                or self.data_format != "channels_last" or len(inputs.shape) != 4
                or any(d != 1 for d in self.dilation_rate)
                or self.padding not in ("same", "valid")
                or keras.backend.standardize_dtype(inputs.dtype) not in self.matmul_grad_dtypes):
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
        config["matmul_grad_dtypes"] = list(self.matmul_grad_dtypes)
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
