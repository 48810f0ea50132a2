"""A classifier on an encoder, as SimCLR fine-tunes it.

`build_classifier` puts a linear layer on the encoder's features (h, or a
projection-head layer as SimCLRv2 does), behind a check that its inputs are
float images in [0, 1]; `KeepBestEpoch` keeps the weights of the best
validation epoch while it trains.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from contrastive_tf.runtime import distribution


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


@keras.saving.register_keras_serializable(package="contrastive_tf")
class ClassifierTrainer(distribution.BuiltAtInit, keras.Model):
    """Trains a classifier on augmented views of uint8 images.

    `fit` takes `(images, labels)` batches of images of any size (the
    augmenter crops them, e.g. `finetune_augmenter`'s crop + flip) or of
    `{"view": ...}` views the input pipeline cropped already
    (`data.view_stream`); evaluation and `call` use the augmenter's
    evaluation preprocessing. Loss: the mean sparse cross-entropy of the
    logits, over the global batch. Weights are the classifier's, shared.

    Args:
        classifier: images in [0, 1] -> logits (`build_classifier`).
        augmenter: view layer with a `cropped` call argument
            (`SimCLRAugmenter`).

    Metrics:
        `loss`, `accuracy`.
    """

    def __init__(self, classifier: keras.Model, augmenter: keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        self.classifier, self.augmenter = classifier, augmenter
        self.built = True
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy]

    def call(self, images, training=False):
        return self.classifier(self.augmenter(images, training=False), training=training)

    def _views(self, images):
        if isinstance(images, dict):  # crops made by the input pipeline
            return self.augmenter(images["view"], training=True, cropped=True)
        return self.augmenter(images, training=True)

    def _loss(self, labels, logits):
        return ops.mean(keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))

    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        views = self._views(images)
        with tf.GradientTape() as tape:
            logits = ops.cast(self.classifier(views, training=True), "float32")
            loss = self._loss(labels, logits)
            total = loss + (ops.cast(ops.sum(self.losses), "float32") if self.losses else 0.0)
            scaled = self.optimizer.scale_loss(distribution.scale_loss_for_replicas(total))
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self.loss_tracker.update_state(loss)
        self.accuracy.update_state(labels, logits)
        return distribution.step_logs({m.name: m.result() for m in self.metrics})

    def test_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits = ops.cast(self(images, training=False), "float32")
        self.loss_tracker.update_state(self._loss(labels, logits))
        self.accuracy.update_state(labels, logits)
        return distribution.step_logs({m.name: m.result() for m in self.metrics})

    def get_config(self):
        config = super().get_config()
        serialize = keras.saving.serialize_keras_object
        config.update({"classifier": serialize(self.classifier),
                       "augmenter": serialize(self.augmenter)})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("classifier", "augmenter"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


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
