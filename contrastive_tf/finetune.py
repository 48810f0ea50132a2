"""Classifiers on a pretrained encoder: fine-tuning and the supervised baseline.

`build_classifier` puts a linear layer on the encoder's features (h, or the
first projection-head layer as SimCLRv2 does); `train_classifier` trains it
with crop + flip augmentation, keeping its best epoch on a validation split. The
same function trains the supervised baseline from a freshly initialised
encoder, so the two differ only in their starting weights.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from contrastive_tf import data, optim, precision
from contrastive_tf.augment import SimCLRAugmenter


def build_classifier(encoder: keras.Model, num_classes: int,
                     projection_head: keras.layers.Layer | None = None,
                     name: str = "classifier") -> keras.Model:
    """images in [0, 1] -> logits, through `encoder` (and the head up to its
    `ft_layer`); the encoder's and head's weights are shared, not copied."""
    inputs = keras.Input(encoder.input.shape[1:], name="images")
    features = encoder(inputs)
    if projection_head is not None:
        features = projection_head.finetune_features(features)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(features)
    return keras.Model(inputs, logits, name=name)


def finetune_augmenter(image_size: int, crop_min_area: float = 0.08,
                       seed: int = 0) -> SimCLRAugmenter:
    """Crop + flip only, as SimCLR fine-tunes; centre crop at evaluation."""
    return SimCLRAugmenter(image_size, crop_area=(crop_min_area, 1.0),
                           color_strength=0.0, jitter_probability=0.0,
                           grayscale_probability=0.0, seed=seed)


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    test_accuracy: float
    val_accuracy: float
    epochs_run: int
    best_epoch: int


def _trainer(classifier: keras.Model, augmenter: keras.layers.Layer) -> keras.Model:
    # Any image size: the augmenter crops and resizes to the classifier's input.
    channels = classifier.input.shape[-1]
    inputs = keras.Input((None, None, channels), dtype="uint8", name="images")
    return keras.Model(inputs, classifier(augmenter(inputs)), name="trainer")


def train_classifier(classifier: keras.Model, train: data.Source,
                     val: data.Source, test: data.Source, *,
                     epochs: int = 100, batch_size: int = 64,
                     learning_rate: float = 0.1, weight_decay: float = 1e-4,
                     optimizer: str = "sgd", patience: int = 0,
                     crop_min_area: float = 0.08, min_steps: int = 0,
                     seed: int = 0, verbose: int = 0, policy: str | None = None,
                     callbacks: list | None = None) -> FinetuneResult:
    """Trains `classifier` on labelled `train`, keeps the weights of the best
    validation epoch, and reports test accuracy.

    Each "epoch" is max(one pass over `train`, `min_steps` steps), so tiny
    label fractions still get enough updates. The learning rate warms up for
    one epoch and decays by cosine over `epochs`. With `patience` 0 (the
    default) the whole schedule runs; otherwise training also stops once
    validation accuracy has not improved for `patience` epochs -- which cuts
    the cosine schedule short, before its low-learning-rate end, where
    accuracy usually rises most. Either way the weights of the best
    validation epoch are kept.

    `policy` is the compute precision (default: the classifier's own,
    `precision.precision_of`); under mixed_float16 the optimizer scales the
    loss. `callbacks` are passed to `fit`.
    """
    if patience < 0:
        raise ValueError(f"Expected patience >= 0. Received: patience={patience}")
    keras.utils.set_random_seed(seed)
    image_size = int(classifier.input.shape[1])
    policy = policy or precision.precision_of(classifier)
    with precision.policy_scope(policy):
        trainer = _trainer(classifier, finetune_augmenter(image_size, crop_min_area, seed))
    batch_size = min(batch_size, train.num_examples)
    steps = max(train.num_examples // batch_size, min_steps, 1)
    schedule = optim.WarmupCosine(learning_rate, steps, steps * epochs)
    optimizer = optim.make_optimizer(optimizer, schedule, weight_decay)
    optim.exclude_from_decay(optimizer, trainer.trainable_variables)
    trainer.compile(optimizer=precision.loss_scaled(optimizer, policy),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    stream = data.training_stream(train, batch_size, seed=seed, with_labels=True)
    val_data = data.pipeline(val, 512, training=False)
    # EarlyStopping restores the best epoch's weights at the end of training,
    # also when it never stops early (patience = epochs).
    stopper = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max",
                                            patience=patience or epochs,
                                            restore_best_weights=True)
    history = trainer.fit(stream, steps_per_epoch=steps, epochs=epochs,
                          validation_data=val_data, callbacks=[stopper, *(callbacks or [])],
                          verbose=verbose)
    val_accuracy = history.history["val_accuracy"]
    test_accuracy = trainer.evaluate(data.pipeline(test, 512, training=False),
                                     verbose=0, return_dict=True)["accuracy"]
    return FinetuneResult(test_accuracy=float(test_accuracy),
                          val_accuracy=float(max(val_accuracy)),
                          epochs_run=len(val_accuracy),
                          best_epoch=int(np.argmax(val_accuracy)) + 1)


def evaluate_classifier(classifier: keras.Model, source: data.Source) -> float:
    """Accuracy of a float-input classifier on uint8 images (evaluation
    preprocessing: centre crop above 32 px, resize)."""
    augmenter = finetune_augmenter(int(classifier.input.shape[1]))
    correct = 0
    for images, labels in data.pipeline(source, 512, training=False):
        logits = classifier(augmenter(images, training=False), training=False)
        correct += int(tf.reduce_sum(tf.cast(
            tf.argmax(logits, -1, output_type=tf.int32) == labels, tf.int32)))
    return correct / source.num_examples
