"""The performance kernels compute what the Keras layers they replace do."""

import numpy as np
import pytest
import keras


def _numpy_bn(x, gamma, beta, mean, var, eps):
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (40, 3)])
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_matches_numpy_and_keras(precision, shape):
    import tensorflow as tf
    from contrastive_tf.method.kernels import FusedBatchNormalization

    keras.mixed_precision.set_global_policy(precision)
    try:
        rng = np.random.RandomState(0)
        x = (rng.randn(*shape) * 2 + 1).astype(np.float32)
        axes = tuple(range(len(shape) - 1))
        gamma, beta = rng.rand(3).astype(np.float32) + 0.5, rng.randn(3).astype(np.float32)
        fused = FusedBatchNormalization(momentum=0.9, epsilon=1e-3)
        plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
        for layer in (fused, plain):
            layer.build(x.shape)
            layer.gamma.assign(gamma)
            layer.beta.assign(beta)
        tol = 1e-5 if precision == "float32" else 3e-2
        xin = tf.constant(x)
        grads = {}
        for name, layer in (("fused", fused), ("plain", plain)):
            with tf.GradientTape() as tape:
                tape.watch(xin)
                y = layer(xin, training=True)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) * np.arange(3, dtype=np.float32))
            grads[name] = tape.gradient(loss, [xin, layer.gamma, layer.beta])
            assert y.dtype == layer.compute_dtype
        # Training: batch statistics (biased variance), against NumPy.
        xr = np.asarray(tf.cast(tf.cast(x, fused.compute_dtype), tf.float32))
        mean, var = xr.mean(axes), xr.var(axes)
        np.testing.assert_allclose(np.asarray(tf.cast(fused(xin, training=True), tf.float32)),
                                   _numpy_bn(xr, gamma, beta, mean, var, 1e-3),
                                   atol=tol, rtol=tol)
        # Moving statistics after two training calls, against NumPy.
        np.testing.assert_allclose(fused.moving_mean.numpy(), 0.19 * mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(fused.moving_variance.numpy(), 0.81 + 0.19 * var,
                                   rtol=1e-4, atol=1e-5)
        # Gradients equal Keras' own (unfused) BatchNormalization's.
        for a, b in zip(grads["fused"], grads["plain"]):
            np.testing.assert_allclose(np.asarray(tf.cast(a, tf.float32)),
                                       np.asarray(tf.cast(b, tf.float32)),
                                       atol=tol * 10, rtol=tol * 10)
        # Inference: moving statistics.
        np.testing.assert_allclose(
            np.asarray(tf.cast(fused(xin, training=False), tf.float32)),
            _numpy_bn(xr, gamma, beta, fused.moving_mean.numpy(),
                      fused.moving_variance.numpy(), 1e-3), atol=tol, rtol=tol)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_fused_batch_norm_falls_back_for_other_ranks_and_synchronized_inputs():
    from contrastive_tf.method.kernels import FusedBatchNormalization

    x = np.random.RandomState(1).randn(8, 3, 4).astype(np.float32)
    layer = FusedBatchNormalization(epsilon=1e-3)
    assert not layer._fusable(keras.ops.convert_to_tensor(x), None)
    assert layer._fusable(keras.ops.zeros((8, 4)), None)
    y = np.asarray(layer(x, training=True))
    np.testing.assert_allclose(y, (x - x.mean((0, 1))) / np.sqrt(x.var((0, 1)) + 1e-3),
                               atol=1e-5)
    assert not FusedBatchNormalization(synchronized=True)._fusable(
        keras.ops.zeros((2, 2, 2, 2)), None)
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(restored) is FusedBatchNormalization


def _numpy_conv(x, w, strides, padding):
    """NHWC convolution ('SAME' or 'VALID', TensorFlow's padding rule) and
    its kernel gradient for dy, by loops over output positions."""
    n, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
    sh, sw = strides
    if padding == "same":
        oh, ow = -(-h // sh), -(-wd // sw)
        pad_h = max((oh - 1) * sh + kh - h, 0)
        pad_w = max((ow - 1) * sw + kw - wd, 0)
    else:
        oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
        pad_h = pad_w = 0
    xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                    (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    patches = np.stack([np.stack([xp[:, i * sh:i * sh + kh, j * sw:j * sw + kw]
                                  for j in range(ow)], 1) for i in range(oh)], 1)
    y = np.einsum("nijabc,abcd->nijd", patches, w)
    return y, lambda dy: np.einsum("nijabc,nijd->abcd", patches, dy)


@pytest.mark.parametrize("kernel,strides,size,padding", [
    ((3, 3), (1, 1), (4, 4), "same"), ((3, 3), (2, 2), (8, 8), "same"),
    ((1, 1), (2, 2), (8, 8), "same"), ((3, 3), (2, 2), (7, 7), "same"),
    ((3, 3), (1, 1), (8, 8), "same"), ((1, 1), (1, 1), (6, 5), "same"),
    ((3, 3), (2, 2), (16, 15), "same"), ((2, 3), (2, 1), (9, 6), "same"),
    ((3, 3), (2, 2), (9, 9), "valid"), ((3, 2), (3, 3), (11, 10), "valid"),
    ((3, 3), (1, 1), (9, 9), "same")])  # 81 output pixels: Keras' own path
def test_small_map_conv_matches_numpy(kernel, strides, size, padding):
    import tensorflow as tf
    from contrastive_tf.method.kernels import SmallMapConv2D

    rng = np.random.RandomState(0)
    x = rng.randn(3, *size, 5).astype(np.float32)
    # float32 through the per-tap route too (by default it is for bf16/fp16),
    # so the sums are checked at float32 precision.
    layer = SmallMapConv2D(6, kernel, strides=strides, padding=padding, use_bias=False,
                           matmul_grad_dtypes=("float32",))
    layer.build(x.shape)
    w = layer.kernel.numpy()
    y_ref, kernel_grad = _numpy_conv(x, w, strides, padding)
    oh, ow = y_ref.shape[1:3]
    assert layer._tap_gradient(tf.constant(x)) == (oh * ow <= 64)
    dy = rng.randn(3, oh, ow, 6).astype(np.float32)
    xin = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xin)
        y = layer(xin)
        loss = tf.reduce_sum(y * dy)
    dx, dw = tape.gradient(loss, [xin, layer.kernel])
    np.testing.assert_allclose(y.numpy(), y_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(dw.numpy(), kernel_grad(dy), atol=1e-4, rtol=1e-4)
    # The input gradient is TensorFlow's own.
    with tf.GradientTape() as tape:
        tape.watch(xin)
        plain = tf.reduce_sum(tf.nn.conv2d(xin, w, [1, *strides, 1], padding.upper()) * dy)
    np.testing.assert_allclose(dx.numpy(), tape.gradient(plain, xin).numpy(), atol=1e-4)
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(restored) is SmallMapConv2D and restored.matmul_grad_max_pixels == 64
    assert restored.matmul_grad_dtypes == ("float32",)


def test_small_map_conv_takes_the_per_tap_route_in_reduced_precision_only():
    import tensorflow as tf
    from contrastive_tf.method.kernels import SmallMapConv2D

    x = tf.zeros((2, 4, 4, 3))
    layer = SmallMapConv2D(5, 3, padding="same")
    layer.build(x.shape)
    assert not layer._tap_gradient(x)  # float32: oneDNN's own kernel gradient
    assert layer._tap_gradient(tf.cast(x, tf.bfloat16))
    assert layer._tap_gradient(tf.cast(x, tf.float16))
    assert not layer._tap_gradient(tf.zeros((2, 16, 16, 3), tf.bfloat16))  # large map
