import numpy as np
import pytest
import keras

from contrastive_tf.backbones import resnet


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


# torchvision's published parameter counts minus the final fc layer
# (resnet18: 11,689,512 - 513,000; resnet34: 21,797,672 - 513,000;
#  resnet50: 25,557,032 - 2,049,000; resnet101: 44,549,160 - 2,049,000).
@pytest.mark.parametrize("depth, expected", [
    (18, 11_176_512), (34, 21_284_672), (50, 23_508_032), (101, 42_500_160)])
def test_parameter_counts_match_standard_architectures(depth, expected):
    model = resnet(depth, input_shape=(224, 224, 3))
    assert _trainable(model) == expected
    assert model.output_shape == (None, 512 if depth < 50 else 2048)


@pytest.mark.slow
def test_wide_and_selective_kernel_sizes_match_simclr_v2():
    # SimCLRv2 table: R50 (2x) about 94 M parameters, R50 (1x)+SK about 35 M.
    assert _trainable(resnet(50, 2)) == pytest.approx(94e6, rel=0.01)
    assert _trainable(resnet(50, sk_ratio=0.0625)) == pytest.approx(35e6, rel=0.02)


def test_cifar_stem_is_automatic_for_small_images():
    small = resnet(18, input_shape=(32, 32, 3), base_width=8)
    large = resnet(18, input_shape=(64, 64, 3), base_width=8)
    assert small.get_layer("stem_conv").kernel.shape[:2] == (3, 3)
    assert small.get_layer("stem_conv").strides == (1, 1)
    assert "stem_pool" not in [l.name for l in small.layers]
    assert large.get_layer("stem_conv").kernel.shape[:2] == (7, 7)
    assert "stem_pool" in [l.name for l in large.layers]
    forced = resnet(18, input_shape=(64, 64, 3), base_width=8, cifar_stem=True)
    assert forced.get_layer("stem_conv").strides == (1, 1)


def test_batch_norm_settings():
    model = resnet(18, input_shape=(32, 32, 3), base_width=8)
    norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and all(n.momentum == 0.9 and n.epsilon == 1e-5 for n in norms)
    assert not any(n.synchronized for n in norms)  # one replica
    synced = resnet(18, input_shape=(32, 32, 3), base_width=8, synchronized_bn=True)
    assert all(l.synchronized for l in synced.layers
               if isinstance(l, keras.layers.BatchNormalization))


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("sk_ratio", [0.0, 0.0625])
def test_forward_on_any_image_size_and_one_channel(depth, sk_ratio):
    model = resnet(depth, input_shape=(None, None, 1), base_width=4,
                   sk_ratio=sk_ratio, cifar_stem=False)
    for size in (40, 57):
        out = model(np.random.rand(2, size, size, 1).astype("float32"))
        assert out.shape == (2, model.output_shape[-1])
        assert np.all(np.isfinite(out))


def test_serialisation_round_trip_keeps_outputs(tmp_path):
    model = resnet(18, input_shape=(32, 32, 3), base_width=4, sk_ratio=0.25)
    path = tmp_path / "encoder.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    x = np.random.rand(2, 32, 32, 3).astype("float32")
    np.testing.assert_allclose(restored(x), model(x), atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(depth=20), "depth"),
    (dict(depth=18, width_multiplier=0), "width_multiplier"),
    (dict(depth=18, sk_ratio=-1), "sk_ratio"),
    (dict(depth=18, input_shape=(32, 32, 4)), "input_shape"),
])
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resnet(**kwargs)


def _numpy_bn(x, gamma, beta, mean, var, eps):
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (40, 3)])
@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_matches_numpy_and_keras(precision, shape):
    import tensorflow as tf
    from contrastive_tf.backbones import FusedBatchNormalization

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
    from contrastive_tf.backbones import FusedBatchNormalization

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
    from contrastive_tf.backbones import SmallMapConv2D

    rng = np.random.RandomState(0)
    x = rng.randn(3, *size, 5).astype(np.float32)
    layer = SmallMapConv2D(6, kernel, strides=strides, padding=padding, use_bias=False)
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
