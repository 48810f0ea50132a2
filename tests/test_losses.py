import numpy as np
import pytest
import tensorflow as tf

import contrastive_tf as ct
from tests.testing import numpy_nt_xent


@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_numpy(n, temperature):
    rng = np.random.RandomState(n)
    z1 = rng.normal(size=(n, 8)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.normal(size=(n, 8))).astype(np.float32)
    loss, accuracy = ct.nt_xent_with_accuracy(z1, z2, temperature)
    expected_loss, expected_accuracy = numpy_nt_xent(z1, z2, temperature)
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5, atol=1e-5)
    assert float(accuracy) == pytest.approx(expected_accuracy)
    assert float(ct.nt_xent(z1, z2, temperature)) == pytest.approx(float(loss))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_nt_xent_computes_in_float32_for_any_input_dtype(dtype):
    rng = np.random.RandomState(0)
    z1 = tf.cast(rng.normal(size=(6, 4)), dtype)
    z2 = tf.cast(rng.normal(size=(6, 4)), dtype)
    loss = ct.nt_xent(z1, z2, 0.1)
    assert loss.dtype == tf.float32
    # The reference sees exactly the values the low-precision tensors hold.
    expected, _ = numpy_nt_xent(tf.cast(z1, tf.float32).numpy(),
                                tf.cast(z2, tf.float32).numpy(), 0.1)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-5)


def test_nt_xent_known_values():
    # Identical, mutually orthogonal pairs: the positive has similarity 1,
    # the 2N - 2 negatives 0, so l = -log(e^{1/t} / (e^{1/t} + 2N - 2)).
    z = np.eye(4, dtype=np.float32)
    t = 0.5
    expected = -np.log(np.exp(1 / t) / (np.exp(1 / t) + 6))
    loss, accuracy = ct.nt_xent_with_accuracy(z, z, t)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(accuracy) == 1.0


def test_uninformative_embeddings_give_log_2n_minus_1():
    z = np.ones((8, 3), np.float32)  # every similarity equal
    assert float(ct.nt_xent(z, z, 0.2)) == pytest.approx(np.log(15), rel=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_nt_xent_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        ct.nt_xent(np.ones((2, 2)), np.ones((2, 2)), temperature)


def test_default_temperature_is_the_imagenet_recipes():
    rng = np.random.RandomState(5)
    z1, z2 = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    expected_loss, _ = numpy_nt_xent(z1, z2, 0.1)
    assert float(ct.nt_xent(z1, z2)) == pytest.approx(expected_loss, rel=1e-5)
    loss, _ = ct.nt_xent_with_accuracy(z1, z2)
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5)


def test_contrastive_accuracy_across_replicas_matches_numpy(mirrored):
    # Each replica scores its own anchors against every view of the global
    # batch (a rectangular block of the similarity matrix); the mean over the
    # replicas is the accuracy of the whole batch.
    rng = np.random.RandomState(11)
    z1 = rng.normal(size=(8, 3)).astype(np.float32)
    z2 = (z1 + rng.normal(scale=1.2, size=(8, 3))).astype(np.float32)
    _, expected = numpy_nt_xent(z1, z2, 0.5)
    assert 0 < expected < 1
    dataset = mirrored.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((z1, z2)).batch(8))

    @tf.function
    def step(batch):
        return mirrored.run(lambda a, b: ct.nt_xent_with_accuracy(a, b, 0.5)[1], batch)

    accuracies = [float(a) for batch in dataset
                  for a in mirrored.experimental_local_results(step(batch))]
    assert len(accuracies) == 2
    assert np.mean(accuracies) == pytest.approx(expected)


def test_global_negatives_across_replicas_match_single_replica(mirrored):
    """Loss and gradients under 2 replicas equal those on one device."""
    strategy = mirrored
    assert strategy.num_replicas_in_sync == 2
    rng = np.random.RandomState(3)
    n, dim, temperature = 8, 5, 0.3
    x1 = rng.normal(size=(n, dim)).astype(np.float32)
    x2 = rng.normal(size=(n, dim)).astype(np.float32)
    w0 = rng.normal(size=(dim, 4)).astype(np.float32)

    def loss_and_grad(w, a, b):
        with tf.GradientTape() as tape:
            loss = ct.nt_xent(tf.matmul(a, w), tf.matmul(b, w), temperature)
            scaled = ct.distribution.scale_loss_for_replicas(loss)
        return loss, tape.gradient(scaled, w)

    single_w = tf.Variable(w0)
    single_loss, single_grad = loss_and_grad(single_w, x1, x2)
    expected_loss, _ = numpy_nt_xent(x1 @ w0, x2 @ w0, temperature)
    np.testing.assert_allclose(float(single_loss), expected_loss, rtol=1e-5)

    with strategy.scope():
        mirrored_w = tf.Variable(w0)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x1, x2)).batch(n))

    @tf.function
    def step(batch):
        return strategy.run(lambda a, b: loss_and_grad(mirrored_w, a, b), batch)

    for batch in dataset:
        losses, grads = step(batch)
    local_losses = strategy.experimental_local_results(losses)
    assert len(local_losses) == 2
    assert all(l.shape == () for l in local_losses)
    global_loss = np.mean([float(l) for l in local_losses])
    global_grad = strategy.reduce(tf.distribute.ReduceOp.SUM, grads, axis=None)
    np.testing.assert_allclose(global_loss, float(single_loss), rtol=1e-5)
    np.testing.assert_allclose(global_grad.numpy(), single_grad.numpy(),
                               rtol=1e-4, atol=1e-6)
    # Each replica alone (local negatives only) would give a different loss:
    local_only, _ = numpy_nt_xent((x1 @ w0)[:4], (x2 @ w0)[:4], temperature)
    assert abs(float(local_losses[0]) - local_only) > 1e-3


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_distillation_loss_matches_numpy(temperature):
    rng = np.random.RandomState(1)
    teacher = rng.normal(size=(5, 7)).astype(np.float32)
    student = rng.normal(size=(5, 7)).astype(np.float32)

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_t = softmax(teacher.astype(np.float64) / temperature)
    log_p_s = np.log(softmax(student.astype(np.float64) / temperature))
    expected = -np.mean(np.sum(p_t * log_p_s, axis=1))
    got = ct.distillation_loss(teacher, student, temperature)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_distillation_loss_gives_teacher_no_gradient():
    teacher = tf.Variable(tf.random.normal((3, 4)))
    student = tf.Variable(tf.random.normal((3, 4)))
    with tf.GradientTape() as tape:
        loss = ct.distillation_loss(teacher, student)
    grad_teacher, grad_student = tape.gradient(loss, [teacher, student])
    assert grad_teacher is None or float(tf.reduce_max(tf.abs(grad_teacher))) == 0
    assert float(tf.reduce_max(tf.abs(grad_student))) > 0
