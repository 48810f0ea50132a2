"""Representation quality: weighted kNN and linear probes on frozen features."""

from __future__ import annotations

import sys

import numpy as np
import keras
import tensorflow as tf

from contrastive_tf.runtime import progress

log = progress.logger("evaluation")


def embed(encoder_fn, images, batch_size: int = 256) -> np.ndarray:
    """L2-normalised features of uint8 images, batch by batch."""
    outputs = []
    for start in range(0, len(images), batch_size):
        features = encoder_fn(images[start:start + batch_size])
        outputs.append(tf.math.l2_normalize(
            tf.cast(features, tf.float32), axis=-1).numpy())
    return np.concatenate(outputs, axis=0)


def knn_predict(bank_features, bank_labels, query_features, num_classes: int,
                k: int = 200, temperature: float = 0.1,
                chunk: int = 1024) -> np.ndarray:
    """Weighted kNN (Wu et al., 2018): each of the k most cosine-similar bank
    items votes for its class with weight exp(similarity / temperature).

    Features must be L2-normalised. Returns predicted labels.
    """
    if k < 1:
        raise ValueError(f"Expected k >= 1. Received: k={k}")
    if temperature <= 0:
        raise ValueError(f"Expected temperature > 0. Received: temperature={temperature}")
    k = min(k, len(bank_features))
    bank = tf.constant(bank_features, tf.float32)
    bank_labels = tf.constant(bank_labels, tf.int32)
    predictions = []
    for start in range(0, len(query_features), chunk):
        query = tf.constant(query_features[start:start + chunk], tf.float32)
        similarity = tf.matmul(query, bank, transpose_b=True)
        top_sim, top_index = tf.math.top_k(similarity, k=k)
        votes = tf.one_hot(tf.gather(bank_labels, top_index), num_classes)
        weights = tf.exp(top_sim / temperature)[..., None]
        predictions.append(tf.argmax(tf.reduce_sum(votes * weights, axis=1),
                                     axis=-1).numpy())
    return np.concatenate(predictions)


def knn_accuracy(bank_features, bank_labels, query_features, query_labels,
                 num_classes: int, k: int = 200, temperature: float = 0.1) -> float:
    predicted = knn_predict(bank_features, bank_labels, query_features,
                            num_classes, k, temperature)
    return float(np.mean(predicted == np.asarray(query_labels)))


def linear_probe(train_features, train_labels, test_features, test_labels,
                 num_classes: int, steps: int = 1000, learning_rate: float = 0.01,
                 weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Test accuracy of a softmax classifier trained on frozen features.

    Features are standardised with the training set's statistics; the
    classifier is fitted full-batch (the features fit in memory) with Adam
    for `steps` steps, L2 `weight_decay`, in float32.
    """
    mean = train_features.mean(axis=0, keepdims=True)
    std = train_features.std(axis=0, keepdims=True) + 1e-6
    x_train = tf.constant((train_features - mean) / std, tf.float32)
    x_test = tf.constant((test_features - mean) / std, tf.float32)
    y_train = tf.constant(np.asarray(train_labels), tf.int32)
    rng = np.random.RandomState(seed)
    dim = x_train.shape[1]
    kernel = tf.Variable(rng.normal(0, 0.01, (dim, num_classes)).astype(np.float32))
    bias = tf.Variable(np.zeros(num_classes, np.float32))
    optimizer = keras.optimizers.Adam(learning_rate)

    @tf.function
    def fit():
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                logits = tf.matmul(x_train, kernel) + bias
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    y_train, logits)) + weight_decay * tf.reduce_sum(tf.square(kernel))
            optimizer.apply(tape.gradient(loss, [kernel, bias]), [kernel, bias])

    fit()
    predicted = np.argmax((tf.matmul(x_test, kernel) + bias).numpy(), axis=1)
    return float(np.mean(predicted == np.asarray(test_labels)))


class KNNMonitor(keras.callbacks.Callback):
    """Logs weighted-kNN accuracy of the encoder every `every_epochs` data
    epochs (the most useful sign that pretraining works).

    Args:
        bank: `(images, labels)` of labelled training images (the memory bank).
        query: `(images, labels)` of held-out images.
        num_classes: number of classes.
        steps_per_epoch: training steps in one pass over the data.
        every_epochs: how often, in data epochs; None measures only when
            `measure()` is called (e.g. at the end of training).
        k, temperature: kNN settings (200 and 0.1, as in the literature).
    """

    def __init__(self, bank, query, num_classes, steps_per_epoch,
                 every_epochs=1, k=200, temperature=0.1, writer=None):
        super().__init__()
        self.bank, self.query = bank, query
        self.num_classes = num_classes
        self.every_steps = (max(1, int(every_epochs * steps_per_epoch))
                            if every_epochs else None)
        self.k, self.temperature = k, temperature
        self.writer = writer
        self.history = []

    def measure(self) -> float:
        encode = lambda x: self.model(x, training=False)  # noqa: E731
        bank = embed(encode, self.bank[0])
        query = embed(encode, self.query[0])
        return knn_accuracy(bank, self.bank[1], query, self.query[1],
                            self.num_classes, self.k, self.temperature)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if self.every_steps is None or step % self.every_steps:
            return
        accuracy = self.measure()
        self.history.append((step, accuracy))
        if logs is not None:
            logs["knn_accuracy"] = accuracy
        # On a terminal Keras' progress bar is mid-line here.
        newline = "\n" if sys.stdout.isatty() else ""
        log.info(f"{newline}step {step}: kNN accuracy {accuracy:.4f}")
        if self.writer is not None:
            with self.writer.as_default():
                tf.summary.scalar("knn_accuracy", accuracy, step=step)
