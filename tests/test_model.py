import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf
import keras

import contrastive_tf as ct
from tests.testing import random_images, start_local_cluster, tiny_encoder, tiny_simclr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dataset(images, labels=None, batch=16):
    data = images if labels is None else (images, labels)
    return tf.data.Dataset.from_tensor_slices(data).batch(batch, drop_remainder=True)


def test_fit_reports_contrastive_and_probe_metrics():
    model = tiny_simclr(num_classes=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = random_images(32)
    history = model.fit(_dataset(images, np.arange(32) % 3), epochs=1, verbose=0)
    assert set(history.history) == {"loss", "contrastive_accuracy",
                                    "probe_loss", "probe_accuracy"}
    assert all(np.isfinite(v[0]) for v in history.history.values())
    assert history.history["loss"][0] > 0


def test_fit_on_images_alone_without_probe():
    model = tiny_simclr()
    model.compile(optimizer="sgd")
    history = model.fit(_dataset(random_images(32)), epochs=1, verbose=0)
    assert set(history.history) == {"loss", "contrastive_accuracy"}


def test_probe_does_not_change_the_encoder_gradient():
    # The probe sees stop_gradient(h): with and without labels the encoder
    # moves identically for the same views.
    images = random_images(16)
    results = []
    for labels in (None, np.arange(16) % 4):
        keras.utils.set_random_seed(1)
        model = tiny_simclr(num_classes=4, seed=5)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        model.fit(_dataset(images, labels), epochs=1, verbose=0)
        results.append([w.numpy() for w in model.encoder.weights])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_predict_returns_features():
    model = tiny_simclr()
    out = model.predict(random_images(5), verbose=0)
    assert out.shape == (5, model.encoder.output_shape[-1])


def _smooth_images(count, size=32, seed=0):
    """Random low-frequency colour patterns: crops of one image share its
    structure, unlike iid pixel noise whose crops share nothing."""
    coarse = np.random.RandomState(seed).uniform(0, 255, (count, 4, 4, 3))
    smooth = tf.image.resize(coarse.astype("float32"), (size, size), "bicubic")
    return np.clip(smooth.numpy(), 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_overfits_64_images():
    """A tiny encoder learns to pick each view's partner among 127 views.

    Crops (30-100% of the area), flips and mild colour jitter: strong enough
    that the task is not trivial at the start, mild enough for 64 synthetic
    images to be learnable in a couple of hundred steps.
    """
    keras.utils.set_random_seed(0)
    images = _smooth_images(64)
    augmenter = ct.SimCLRAugmenter(32, crop_area=(0.3, 1.0), color_strength=0.2,
                                   grayscale_probability=0.0, seed=0)
    model = ct.SimCLR(tiny_encoder(32), augmenter, ct.ProjectionHead(2, 32),
                      temperature=0.2)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(64).repeat()
    history = model.fit(dataset, steps_per_epoch=25, epochs=8, verbose=0)
    accuracy = history.history["contrastive_accuracy"]
    assert accuracy[0] < 0.8
    assert accuracy[-1] > 0.9, accuracy


def test_save_and_load_round_trip(tmp_path):
    model = tiny_simclr(num_classes=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(_dataset(random_images(16), np.arange(16) % 3), epochs=1, verbose=0)
    path = tmp_path / "simclr.keras"
    model.save(path)
    restored = keras.models.load_model(path)  # no custom_objects
    assert isinstance(restored, ct.SimCLR)
    # Compiled again, with the optimizer's state.
    assert isinstance(restored.optimizer, keras.optimizers.Adam)
    assert int(restored.optimizer.iterations) == int(model.optimizer.iterations) > 0
    assert restored.temperature == model.temperature
    images = random_images(4, seed=3)
    np.testing.assert_allclose(restored.predict(images, verbose=0),
                               model.predict(images, verbose=0), atol=1e-6)
    for a, b in zip(restored.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    h = model.predict(images, verbose=0)
    np.testing.assert_allclose(restored.probe(h), model.probe(h), atol=1e-6)


def test_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        tiny_simclr(temperature=0)


def test_mixed_bfloat16_trains_with_float32_loss():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = tiny_simclr(num_classes=2)
        assert model.encoder.layers[1].compute_dtype == "bfloat16"
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        history = model.fit(_dataset(random_images(16), np.arange(16) % 2),
                            epochs=2, verbose=0)
        assert all(np.isfinite(history.history["loss"]))
        assert model.encoder.output.dtype == "float32"
        assert all(v.dtype == "float32" for v in model.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_float16_uses_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tiny_simclr()
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        history = model.fit(_dataset(random_images(16)), epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mirrored_strategy_fit_matches_single_device(mirrored):
    """Same data, same init, SGD: 2 replicas end where 1 replica ends.

    Augmentation is turned off (full crops, no flip or colour) so both runs
    see identical views; BN statistics are synchronised across replicas.
    """
    images = random_images(16, size=16)
    plain = dict(crop_area=(1.0, 1.0), aspect_ratio=(1.0, 1.0), flip=False,
                 jitter_probability=0.0, grayscale_probability=0.0)

    def train(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(2)
            model = tiny_simclr(image_size=16, **plain)
            model.compile(optimizer=keras.optimizers.SGD(0.1))
        history = model.fit(_dataset(images, batch=8), epochs=2, verbose=0)
        return history.history["loss"], [w.numpy() for w in model.trainable_weights]

    cpu = tf.config.list_logical_devices("CPU")[0].name
    loss_single, weights_single = train(tf.distribute.OneDeviceStrategy(cpu))
    loss_mirrored, weights_mirrored = train(mirrored)
    np.testing.assert_allclose(loss_mirrored, loss_single, rtol=1e-4)
    for a, b in zip(weights_mirrored, weights_single):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_multi_worker_mirrored_two_processes(tmp_path):
    procs = start_local_cluster(
        lambda index: ["tests.mwms_worker", str(tmp_path / f"w{index}.npz")], ROOT)
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append(out.decode(errors="replace"))
        assert proc.returncode == 0, outputs[-1][-3000:]
    first, second = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    assert np.all(np.isfinite(first["loss"]))
    np.testing.assert_allclose(first["loss"], second["loss"], rtol=1e-6)
    names = [k for k in first.files if k.startswith("w")]
    assert len(names) > 10
    for name in names:
        np.testing.assert_array_equal(first[name], second[name])
    moved = [not np.array_equal(first[n], first["init" + n[1:]]) for n in names]
    assert sum(moved) > len(names) // 2  # training really changed the weights
