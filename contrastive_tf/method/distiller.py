"""The distillation model: a frozen teacher labels views for a student
(SimCLRv2's third step), trained with `fit` like any Keras model."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from contrastive_tf.method.losses import distillation_loss
from contrastive_tf.runtime import distribution


@keras.saving.register_keras_serializable(package="contrastive_tf")
class Distiller(distribution.BuiltAtInit, keras.Model):
    """Trains `student` to match `teacher`'s softened predictions (SimCLRv2).

    Each step augments the batch once (the same view for both networks),
    and minimises `-sum_y P_T(y|x; t) log P_S(y|x; t)`; with labels and
    `label_weight > 0` it adds `label_weight` times the labelled
    cross-entropy -- of the same images' labels (`fit` on `(images,
    labels)`), or of a separate labelled batch (`fit` on `(images,
    (labelled_images, labels))`, as `distill` feeds it). The teacher is
    frozen (BN in inference mode). Views cropped by the input pipeline
    (`{"view": ...}` batches of `data.stream.view_stream`) are used as
    they come.

    Args:
        teacher: images in [0, 1] -> logits.
        student: images in [0, 1] -> logits, same classes.
        augmenter: view layer (crop + flip in SimCLRv2).
        temperature: softening temperature t. Defaults to `1.0`.
        label_weight: weight of the labelled loss. Defaults to `0.0`.

    References:
        - [Chen et al., 2020b](https://arxiv.org/abs/2006.10029), eq. 2.
    """

    def __init__(self, teacher: keras.Model, student: keras.Model,
                 augmenter: keras.layers.Layer, temperature: float = 1.0,
                 label_weight: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"Expected temperature > 0. Received: temperature={temperature}")
        if label_weight < 0:
            raise ValueError(f"Expected label_weight >= 0. Received: label_weight={label_weight}")
        if teacher.output.shape[-1] != student.output.shape[-1]:
            raise ValueError(f"Teacher has {teacher.output.shape[-1]} classes, student "
                             f"{student.output.shape[-1]}")
        self.teacher, self.student, self.augmenter = teacher, student, augmenter
        self.teacher.trainable = False
        self.temperature = float(temperature)
        self.label_weight = float(label_weight)
        self.built = True
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.agreement = keras.metrics.Mean(name="teacher_agreement")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.agreement, self.accuracy]

    def call(self, images, training=False):
        return self.student(self.augmenter(images, training=False), training=training)

    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        labelled_images = None
        if isinstance(labels, (tuple, list)):  # a separate labelled batch
            labelled_images, labels = labels
        views = self._views(images)
        teacher_logits = self.teacher(views, training=False)
        with tf.GradientTape() as tape:
            student_logits = ops.cast(self.student(views, training=True), "float32")
            loss = distillation_loss(teacher_logits, student_logits, self.temperature)
            if labels is not None and self.label_weight > 0:
                labelled_logits = student_logits
                if labelled_images is not None:
                    labelled_logits = ops.cast(self.student(
                        self._views(labelled_images), training=True), "float32")
                loss = loss + self.label_weight * ops.mean(
                    keras.losses.sparse_categorical_crossentropy(
                        labels, labelled_logits, from_logits=True))
            scaled = self.optimizer.scale_loss(distribution.scale_loss_for_replicas(loss))
        variables = self.student.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self.loss_tracker.update_state(loss)
        self.agreement.update_state(ops.cast(
            ops.argmax(student_logits, -1) == ops.argmax(teacher_logits, -1), "float32"))
        return distribution.step_logs({m.name: m.result() for m in self.metrics[:2]})

    def _views(self, images):
        if isinstance(images, dict):  # crops made by the input pipeline
            return self.augmenter(images["view"], training=True, cropped=True)
        return self.augmenter(images, training=True)

    def test_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits = self(images, training=False)
        if labels is not None:
            self.accuracy.update_state(labels, logits)
        return distribution.step_logs({"accuracy": self.accuracy.result()})

    def get_config(self):
        config = super().get_config()
        serialize = keras.saving.serialize_keras_object
        config.update({"teacher": serialize(self.teacher), "student": serialize(self.student),
                       "augmenter": serialize(self.augmenter),
                       "temperature": self.temperature, "label_weight": self.label_weight})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("teacher", "student", "augmenter"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
