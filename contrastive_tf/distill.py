"""Distillation: a fine-tuned teacher labels unlabelled images for a student."""

from __future__ import annotations

import dataclasses
import os
import time

import keras
import tensorflow as tf
from keras import ops

from contrastive_tf import data, distribution, optim, precision, progress, seeds
from contrastive_tf.losses import distillation_loss

log = progress.logger("distill")


@keras.saving.register_keras_serializable(package="contrastive_tf")
class Distiller(distribution.BuiltAtInit, keras.Model):
    """Trains `student` to match `teacher`'s softened predictions (SimCLRv2).

    Each step augments the batch once (the same view for both networks),
    and minimises `-sum_y P_T(y|x; t) log P_S(y|x; t)`; with labels and
    `label_weight > 0` it adds `label_weight` times the labelled
    cross-entropy -- of the same images' labels (`fit` on `(images,
    labels)`), or of a separate labelled batch (`fit` on `(images,
    (labelled_images, labels))`, as `distill` feeds it). The teacher is
    frozen (BN in inference mode).

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
        views = self.augmenter(images, training=True)
        teacher_logits = self.teacher(views, training=False)
        with tf.GradientTape() as tape:
            student_logits = ops.cast(self.student(views, training=True), "float32")
            loss = distillation_loss(teacher_logits, student_logits, self.temperature)
            if labels is not None and self.label_weight > 0:
                labelled_logits = student_logits
                if labelled_images is not None:
                    labelled_logits = ops.cast(self.student(
                        self.augmenter(labelled_images, training=True), training=True),
                        "float32")
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


def distill(teacher: keras.Model, student: keras.Model, pool: data.Source, *,
            labelled: data.Source | None = None, label_weight: float = 0.0,
            epochs: int = 6, batch_size: int = 256, learning_rate: float = 0.05,
            temperature: float = 1.0, crop_min_area: float = 0.3, policy: str = "float32",
            seed: int = 0, callbacks: list | None = None, verbose: int = 2) -> keras.Model:
    """Trains `student` (in place) to match `teacher` on `pool`'s images,
    without their labels (SimCLRv2): SGD with momentum, one epoch of warmup
    then cosine, crop + flip views, loss scaling under mixed_float16. With
    `labelled` and `label_weight` > 0 each step adds the cross-entropy of a
    labelled batch. Returns the student."""
    from contrastive_tf.finetune import finetune_augmenter

    image_size = int(student.input.shape[1])
    with precision.policy_scope(policy):
        distiller = Distiller(teacher, student,
                              finetune_augmenter(image_size, crop_min_area, seed),
                              temperature=temperature, label_weight=label_weight)
    batch_size = min(batch_size, pool.num_examples)
    steps = max(pool.num_examples // batch_size, 1)
    optimizer = optim.make_optimizer(
        "sgd", optim.WarmupCosine(learning_rate, steps, steps * epochs), 1e-4)
    optim.exclude_from_decay(optimizer, student.trainable_variables)
    distiller.compile(optimizer=precision.loss_scaled(optimizer, policy))
    unlabelled = dataclasses.replace(pool, labels=None)
    stream = data.training_stream(unlabelled, batch_size, seed=seed)
    if labelled is not None and label_weight > 0:
        labelled_stream = data.training_stream(
            labelled, min(batch_size, labelled.num_examples), seed=seed, with_labels=True)
        stream = tf.data.Dataset.zip(stream, labelled_stream)
    distiller.fit(stream, steps_per_epoch=steps, epochs=epochs, verbose=verbose,
                  callbacks=callbacks, shuffle=False)
    return student


def build_student(config, teacher: keras.Model, policy: str) -> tuple[keras.Model, str]:
    """The student a `DistillConfig` asks for, and a sentence describing it:
    from a pretrained encoder, a ResNet of the given size, or the teacher's
    own architecture freshly initialised."""
    from contrastive_tf import finetune
    from contrastive_tf.backbones import resnet

    num_classes = int(teacher.output.shape[-1])
    shape = tuple(teacher.input.shape[1:])
    if config.student_encoder:
        pretrained = finetune.load_pretrained(config.student_encoder)
        if (pretrained.image_size, pretrained.image_size, pretrained.channels) != shape:
            raise finetune.ModelSourceError(
                f"student_encoder {config.student_encoder} takes "
                f"{pretrained.image_size}x{pretrained.image_size}x{pretrained.channels} "
                f"images, the teacher {shape[0]}x{shape[1]}x{shape[2]}")
        student = finetune.build_classifier(pretrained.encoder, num_classes,
                                            pretrained.head, name="student")
        return student, f"from the pretrained encoder {config.student_encoder}"
    with precision.policy_scope(policy):
        if config.student_depth:
            width = config.student_base_width or 64
            encoder = resnet(config.student_depth, base_width=width, input_shape=shape)
            student = finetune.build_classifier(encoder, num_classes, name="student")
            return student, f"ResNet-{config.student_depth} (base width {width}) from scratch"
        student = keras.models.clone_model(teacher)
    return student, "the teacher's architecture, freshly initialised"


def run_distill(config, verbose: int = 1) -> dict:
    """The distillation job: a fine-tuned teacher (run or export) labels
    `config.dataset`'s images (their own labels unused) for a student;
    writes classifier.keras, class_names.json and summary.json."""
    from contrastive_tf import finetune
    from contrastive_tf.config import claim_output_dir
    from contrastive_tf.files import write_json

    started = time.time()
    claim_output_dir(config.output_dir, "distill", config.to_dict())
    teacher, class_names = finetune.load_classifier(config.teacher)
    size, channels = int(teacher.input.shape[1]), int(teacher.input.shape[-1])
    pool = finetune.load_images(config.dataset, "train", size, channels, config.data_dir)
    labelled = None
    if config.labelled_dataset:
        labelled = finetune.match_classes(finetune.load_labelled(
            config.labelled_dataset, "train", size, channels, config.data_dir),
            class_names)
    test = None
    if config.test_dataset:
        test = finetune.match_classes(finetune.load_labelled(
            config.test_dataset, "test", size, channels, config.data_dir), class_names)
    choice = precision.resolve(config.precision)
    with seeds.seeded(config.seed):
        student, described = build_student(config, teacher, choice.policy)
        policy = precision.precision_of(student)
        log.info(f"distilling {config.teacher} into a student ({described}, {policy}) on "
                 f"{pool.num_examples} images of {config.dataset}, {config.epochs} epochs"
                 + (f", labelled term x{config.label_weight} on {labelled.num_examples} images"
                    if labelled is not None and config.label_weight else ""))
        distill(teacher, student, pool, labelled=labelled, label_weight=config.label_weight,
                epochs=config.epochs, batch_size=config.batch_size,
                learning_rate=config.learning_rate, temperature=config.temperature,
                crop_min_area=config.crop_min_area, policy=policy, seed=config.seed,
                verbose=2 if verbose else 0)
    finetune.save_classifier(student, class_names, config.output_dir)
    summary = {"job": "distill", "teacher": config.teacher, "dataset": config.dataset,
               "num_images": pool.num_examples, "student": described, "precision": policy,
               "epochs": config.epochs, "wall_s": round(time.time() - started, 1)}
    if test is not None:
        summary.update(test_accuracy=finetune.evaluate_classifier(student, test),
                       teacher_test_accuracy=finetune.evaluate_classifier(teacher, test),
                       num_test=test.num_examples, test_dataset=config.test_dataset)
        log.info(f"test accuracy: student {summary['test_accuracy']:.4f}, teacher "
                 f"{summary['teacher_test_accuracy']:.4f}")
    summary["wall_s"] = round(time.time() - started, 1)
    write_json(os.path.join(config.output_dir, "summary.json"), summary)
    log.info(f"done: classifier.keras, class_names.json and summary.json in {config.output_dir} "
             f"({summary['wall_s']} s)")
    return summary
