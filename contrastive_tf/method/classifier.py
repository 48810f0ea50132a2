"""A classifier on an encoder, as SimCLR fine-tunes it.

`build_classifier` puts a linear layer on the encoder's features (h, or a
projection-head layer as SimCLRv2 does), behind a check that its inputs are
float images in [0, 1]; `KeepBestEpoch` keeps the weights of the best
validation epoch while it trains.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="contrastive_tf")
class UnitRangeCheck(keras.layers.Layer):
    """Passes float images through, refusing values outside [0, 1].

    A classifier fed uint8 images (0-255) as floats would answer wrongly
    without a word; this says what it received instead.
    """

    def call(self, images):
        images = tf.convert_to_tensor(images)
        low, high = tf.reduce_min(images), tf.reduce_max(images)
        check = tf.debugging.Assert(
            tf.logical_and(low >= -1e-3, high <= 1.0 + 1e-3),
            ["classifier inputs must be float images in [0, 1] (uint8 images: divide by "
             "255); received values in", low, high])
        with tf.control_dependencies([check]):
            return tf.identity(images)

    def compute_output_shape(self, input_shape):
        return input_shape


def build_classifier(encoder: keras.Model, num_classes: int,
                     projection_head: keras.layers.Layer | None = None,
                     name: str = "classifier") -> keras.Model:
    """images in [0, 1] -> logits, through `encoder` (and the head up to its
    `ft_layer`); the encoder's and head's weights are shared, not copied.
    Inputs outside [0, 1] (uint8 images passed as numbers) are refused."""
    inputs = keras.Input(encoder.input.shape[1:], name="images")
    features = encoder(UnitRangeCheck(name="unit_range_check")(inputs))
    if projection_head is not None:
        features = projection_head.finetune_features(features)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(features)
    return keras.Model(inputs, logits, name=name)


class KeepBestEpoch(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the highest validation accuracy
    and restores them when training ends. Of equally good epochs the latest
    wins: it has trained longest down the schedule, and on a small
    validation set ties are common. With `patience` > 0, training stops
    once `patience` epochs in a row have not beaten the best."""

    def __init__(self, patience: int = 0):
        super().__init__()
        self.patience = patience

    def on_train_begin(self, logs=None):
        self.best, self.best_epoch, self.weights, self.waited = -1.0, 0, None, 0

    def on_epoch_end(self, epoch, logs=None):
        value = float(logs["val_accuracy"])
        self.waited = 0 if value > self.best else self.waited + 1
        if value >= self.best:
            self.best, self.best_epoch = value, epoch + 1
            self.weights = self.model.get_weights()
        if self.patience and self.waited >= self.patience:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)
