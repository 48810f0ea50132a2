"""The SimCLR keras.Model: two views, encoder, projection head, NT-Xent."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from contrastive_tf.method import optim
from contrastive_tf.runtime import distribution
from contrastive_tf.method.losses import nt_xent_with_accuracy


@keras.saving.register_keras_serializable(package="contrastive_tf")
class SimCLR(distribution.BuiltAtInit, keras.Model):
    """SimCLR contrastive pretraining as a `keras.Model`.

    `fit` takes a dataset of images, or of `(images, labels)`. Each step
    draws two views with `augmenter`, encodes both in one 2N-image forward
    pass (so batch-norm statistics cover both views, as in the reference),
    projects them with `projection_head` and minimises NT-Xent with the
    negatives gathered from every replica. With labels and a `probe`, a
    linear classifier is trained online on `stop_gradient(h)`; it measures
    the representation and does not shape it.

    Args:
        encoder: a model from float images in [0, 1] to features h, e.g.
            `contrastive_tf.backbones.resnet(...)`.
        augmenter: a layer returning one random view per call with
            `training=True` and the evaluation preprocessing with
            `training=False`, e.g. `SimCLRAugmenter`.
        projection_head: a layer from h to z, e.g. `ProjectionHead`.
        temperature: NT-Xent temperature. Defaults to `0.1`.
        probe: optional layer from h to class logits (e.g.
            `keras.layers.Dense(num_classes)`). Defaults to `None`.

    Call arguments:
        images: a batch of images (uint8 or float in [0, 1]).

    `fit` also takes views cropped already, as `{"view1": ..., "view2": ...}`
    batches at the augmenter's size (`data.stream.view_stream`, which crops
    the whole decoded image of each file): the augmenter then applies the
    steps after the crop.

    Returns:
        `call` returns the features h of the evaluation-preprocessed images,
        so `model.predict(images)` gives embeddings.

    Metrics:
        `loss` (NT-Xent, paper definition), `contrastive_accuracy` and, with a
        probe and labels, `probe_loss` and `probe_accuracy`.

    Example:
    ```python
    encoder = backbones.resnet(18, input_shape=(32, 32, 3))
    model = SimCLR(encoder, SimCLRAugmenter(32), ProjectionHead(2),
                   temperature=0.5, probe=keras.layers.Dense(10))
    model.compile(optimizer=optim.LARS(learning_rate=1.0))
    model.fit(images_and_labels_dataset, epochs=100)
    ```

    References:
        - [Chen et al., 2020](https://arxiv.org/abs/2002.05709)
        - [Chen et al., 2020b](https://arxiv.org/abs/2006.10029)
    """

    def __init__(self, encoder: keras.Model, augmenter: keras.layers.Layer,
                 projection_head: keras.layers.Layer, temperature: float = 0.1,
                 probe: keras.layers.Layer | None = None, **kwargs):
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(
                f"Expected temperature > 0. Received: temperature={temperature}")
        if len(encoder.outputs) != 1 or len(encoder.output.shape) != 2:
            raise ValueError(
                "Expected an encoder with one (batch, features) output. "
                f"Received output shape {encoder.output_shape}")
        self.encoder = encoder
        self.augmenter = augmenter
        self.projection_head = projection_head
        self.temperature = float(temperature)
        self.probe = probe
        # Build every part now, so a reloaded model has all its weights.
        feature_shape = tuple(encoder.output.shape)
        if not projection_head.built:
            projection_head.build(feature_shape)
        if probe is not None and not probe.built:
            probe.build(feature_shape)

        self.built = True

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="contrastive_accuracy")
        self.probe_loss_tracker = keras.metrics.Mean(name="probe_loss")
        self.probe_accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(
            name="probe_accuracy")

    def compile(self, optimizer="rmsprop", **kwargs):
        """`keras.Model.compile`; then biases, batch-norm parameters and the
        online probe (a measurement, like the reference's supervised head)
        are kept out of weight decay and LARS adaptation."""
        super().compile(optimizer=optimizer, **kwargs)
        probe = self.probe.trainable_variables if self.probe is not None else []
        optim.exclude_from_decay(self.optimizer, self.trainable_variables, extra=probe)

    def compile_from_config(self, config):
        """Recompiles a loaded model through `compile` above (Keras skips a
        custom `compile` when loading unless this is overridden)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.accuracy_tracker]
        if self.probe is not None:
            trackers += [self.probe_loss_tracker, self.probe_accuracy_tracker]
        return trackers

    def call(self, images, training=False):
        return self.encoder(self.augmenter(images, training=False),
                            training=training)

    def _contrastive_forward(self, images, training):
        if isinstance(images, dict):  # two crops made by the input pipeline
            view1 = self.augmenter(images["view1"], training=True, cropped=True)
            view2 = self.augmenter(images["view2"], training=True, cropped=True)
        else:
            view1 = self.augmenter(images, training=True)
            view2 = self.augmenter(images, training=True)
        h = self.encoder(ops.concatenate([view1, view2], axis=0),
                         training=training)
        z = self.projection_head(h, training=training)
        z1, z2 = ops.split(z, 2, axis=0)
        loss, accuracy = nt_xent_with_accuracy(z1, z2, self.temperature)
        return h, loss, accuracy

    def _probe_loss(self, h, labels, training):
        logits = ops.cast(self.probe(ops.stop_gradient(h), training=training),
                          "float32")
        loss = ops.mean(keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))
        return logits, loss

    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        use_probe = self.probe is not None and labels is not None
        with tf.GradientTape() as tape:
            h, loss, accuracy = self._contrastive_forward(images, True)
            total = loss
            if use_probe:
                both_labels = ops.concatenate([labels, labels], axis=0)
                logits, probe_loss = self._probe_loss(h, both_labels, True)
                total = total + probe_loss
            if self.losses:
                total = total + ops.cast(ops.sum(self.losses), "float32")
            scaled = self.optimizer.scale_loss(
                distribution.scale_loss_for_replicas(total))
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
        self.optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])

        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(accuracy)
        if use_probe:
            self.probe_loss_tracker.update_state(probe_loss)
            self.probe_accuracy_tracker.update_state(both_labels, logits)
        return distribution.step_logs({m.name: m.result() for m in self.metrics})

    def test_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        _, loss, accuracy = self._contrastive_forward(images, False)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(accuracy)
        if self.probe is not None and labels is not None:
            h = self(images["view1"] if isinstance(images, dict) else images, training=False)
            logits, probe_loss = self._probe_loss(h, labels, False)
            self.probe_loss_tracker.update_state(probe_loss)
            self.probe_accuracy_tracker.update_state(labels, logits)
        return distribution.step_logs({m.name: m.result() for m in self.metrics})

    def get_config(self):
        config = super().get_config()
        serialize = keras.saving.serialize_keras_object
        config.update({
            "encoder": serialize(self.encoder),
            "augmenter": serialize(self.augmenter),
            "projection_head": serialize(self.projection_head),
            "temperature": self.temperature,
            "probe": serialize(self.probe) if self.probe is not None else None,
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        deserialize = keras.saving.deserialize_keras_object
        for key in ("encoder", "augmenter", "projection_head", "probe"):
            if config.get(key) is not None:
                config[key] = deserialize(config[key])
        return cls(**config)
