import math

import numpy as np
import pytest
import keras

from contrastive_tf.method import optim


def numpy_lars(weights, grads_per_step, lr, momentum, eta, wd, excluded):
    """The spec's LARS, step by step, in float64."""
    weights = [w.astype(np.float64).copy() for w in weights]
    velocity = [np.zeros_like(w) for w in weights]
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(weights, grads)):
            g = g.astype(np.float64)
            rate = lr
            if not excluded[i]:
                g = g + wd * w
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                trust = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
                rate = lr * trust
            velocity[i] = momentum * velocity[i] + rate * g
            weights[i] = w - velocity[i]
    return weights


@pytest.mark.parametrize("exclude", [True, False])
def test_lars_matches_numpy(exclude):
    rng = np.random.RandomState(0)
    shapes = [(4, 3), (3,), (2, 2, 3, 5)]
    initial = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(4)]
    variables = [keras.Variable(w) for w in initial]
    optimizer = optim.LARS(learning_rate=0.5, momentum=0.9, trust_coefficient=0.01,
                           weight_decay=0.05, exclude_bias_and_norm=exclude)
    for step_grads in grads:
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in step_grads], variables)
    excluded = [exclude and len(s) <= 1 for s in shapes]
    expected = numpy_lars(initial, grads, 0.5, 0.9, 0.01, 0.05, excluded)
    for got, want in zip(variables, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_lars_zero_weights_use_trust_one():
    w = keras.Variable(np.zeros((2, 2), np.float32))
    optimizer = optim.LARS(learning_rate=0.1, weight_decay=0.0)
    optimizer.apply([keras.ops.ones((2, 2))], [w])
    np.testing.assert_allclose(w.numpy(), -0.1)


def test_lars_serialises_and_model_reloads(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=optim.LARS(optim.WarmupCosine(1.0, 2, 10),
                                       weight_decay=1e-4), loss="mse")
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(restored.optimizer, optim.LARS)
    config = restored.optimizer.get_config()
    assert config["weight_decay"] == 1e-4 and config["trust_coefficient"] == 0.001


def test_warmup_cosine_values():
    schedule = optim.WarmupCosine(peak=2.0, warmup_steps=10, total_steps=110)
    expected = {0: 0.0, 5: 1.0, 10: 2.0,
                35: 2.0 * 0.5 * (1 + math.cos(math.pi * 0.25)),
                60: 1.0, 110: 0.0, 500: 0.0}
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, abs=1e-6), step
    restored = optim.WarmupCosine.from_config(schedule.get_config())
    assert float(restored(35)) == pytest.approx(expected[35], abs=1e-6)


def test_warmup_cosine_without_warmup_starts_at_peak():
    assert float(optim.WarmupCosine(1.0, 0, 10)(0)) == pytest.approx(1.0)


@pytest.mark.parametrize("scaling, expected", [
    ("linear", 0.3 * 4096 / 256), ("sqrt", 0.075 * 64.0), ("none", 0.3)])
def test_learning_rate_scaling(scaling, expected):
    base = 0.075 if scaling == "sqrt" else 0.3
    assert optim.scaled_learning_rate(base, 4096, scaling) == pytest.approx(expected)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_decoupled_decay_skips_biases_and_batch_norm(name):
    # Keras applies decoupled decay to every variable not excluded; the spec
    # wants none on batch-norm parameters and biases.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization()])
    for w in model.trainable_variables:
        w.assign(np.full(w.shape, 2.0, np.float32))
    optimizer = optim.make_optimizer(name, 0.1, 0.5)
    optim.exclude_from_decay(optimizer, model.trainable_variables)
    zeros = [keras.ops.zeros(w.shape) for w in model.trainable_variables]
    optimizer.apply(zeros, model.trainable_variables)
    for w in model.trainable_variables:
        # w -= lr * wd * w for kernels only: 2 * (1 - 0.05) = 1.9
        expected = 1.9 if len(w.shape) >= 2 else 2.0
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6, err_msg=w.path)


def test_lars_excluded_variables_get_plain_momentum_sgd():
    rng = np.random.RandomState(1)
    initial = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2)]
    grads = [[rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2)]
             for _ in range(3)]
    variables = [keras.Variable(w) for w in initial]
    optimizer = optim.LARS(learning_rate=0.5, momentum=0.9, trust_coefficient=0.01,
                           weight_decay=0.05)
    optim.exclude_from_decay(optimizer, variables, extra=[variables[1]])
    for step_grads in grads:
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in step_grads], variables)
    expected = numpy_lars(initial, grads, 0.5, 0.9, 0.01, 0.05, [False, True])
    for got, want in zip(variables, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not names"):
        optim.LARS().exclude_from_weight_decay(var_names=["bias"])


def test_simclr_probe_is_not_decayed_or_adapted():
    from tests.testing import tiny_simclr
    model = tiny_simclr(16, 1, num_classes=3)
    model.compile(optimizer=optim.LARS(learning_rate=0.5, weight_decay=0.05,
                                       trust_coefficient=0.01, momentum=0.0))
    model.optimizer.build(model.trainable_variables)
    kernel = model.probe.kernel
    before = kernel.numpy().copy()
    gradient = np.full(kernel.shape, 0.1, np.float32)
    model.optimizer.apply([keras.ops.convert_to_tensor(gradient)], [kernel])
    np.testing.assert_allclose(kernel.numpy(), before - 0.5 * gradient, rtol=1e-5)


def test_make_optimizer_and_errors():
    assert isinstance(optim.make_optimizer("lars", 0.1, 1e-6), optim.LARS)
    assert isinstance(optim.make_optimizer("adamw", 0.1, 1e-4), keras.optimizers.AdamW)
    assert isinstance(optim.make_optimizer("sgd", 0.1, 0.0), keras.optimizers.SGD)
    with pytest.raises(ValueError, match="optimizer"):
        optim.make_optimizer("adagrad", 0.1, 0.0)
    with pytest.raises(ValueError, match="momentum"):
        optim.LARS(momentum=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.WarmupCosine(1.0, 20, 10)
    with pytest.raises(ValueError, match="scaling"):
        optim.scaled_learning_rate(1.0, 10, "cubic")
