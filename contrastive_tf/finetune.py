"""Classifiers on a pretrained encoder: fine-tuning and the supervised baseline.

`build_classifier` puts a linear layer on the encoder's features (h, or the
first projection-head layer as SimCLRv2 does); `train_classifier` trains it
with crop + flip augmentation, keeping its best epoch on a validation split. The
same function trains the supervised baseline from a freshly initialised
encoder, so the two differ only in their starting weights.
"""

from __future__ import annotations

import dataclasses
import os
import time

import keras
import numpy as np
import tensorflow as tf

from contrastive_tf import data, optim, precision, progress, seeds
from contrastive_tf.augment import SimCLRAugmenter
from contrastive_tf.config import FinetuneConfig, claim_output_dir
from contrastive_tf.files import atomic_path, read_json, write_json

log = progress.logger("finetune")


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


def finetune_augmenter(image_size: int, crop_min_area: float = 0.08,
                       seed: int = 0) -> SimCLRAugmenter:
    """Crop + flip only, as SimCLR fine-tunes; centre crop at evaluation."""
    return SimCLRAugmenter(image_size, crop_area=(crop_min_area, 1.0),
                           color_strength=0.0, jitter_probability=0.0,
                           grayscale_probability=0.0, seed=seed)


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    test_accuracy: float | None  # None without a test set
    val_accuracy: float
    epochs_run: int
    best_epoch: int


def _trainer(classifier: keras.Model, augmenter: keras.layers.Layer) -> keras.Model:
    # Any image size: the augmenter crops and resizes to the classifier's input.
    channels = classifier.input.shape[-1]
    inputs = keras.Input((None, None, channels), dtype="uint8", name="images")
    return keras.Model(inputs, classifier(augmenter(inputs)), name="trainer")


def train_classifier(classifier: keras.Model, train: data.Source,
                     val: data.Source, test: data.Source | None, *,
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
    with seeds.seeded(seed):
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
        keeper = KeepBestEpoch(patience)
        history = trainer.fit(stream, steps_per_epoch=steps, epochs=epochs,
                              validation_data=val_data, callbacks=[keeper, *(callbacks or [])],
                              shuffle=False, verbose=verbose)
        test_accuracy = None if test is None else float(trainer.evaluate(
            data.pipeline(test, 512, training=False), verbose=0, return_dict=True)["accuracy"])
    return FinetuneResult(test_accuracy=test_accuracy, val_accuracy=keeper.best,
                          epochs_run=len(history.history["val_accuracy"]),
                          best_epoch=keeper.best_epoch)


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


def evaluate_classifier(classifier: keras.Model, source: data.Source) -> float:
    """Accuracy of a float-input classifier on uint8 images (evaluation
    preprocessing: centre crop above 32 px, resize)."""
    evaluator = _trainer(classifier, finetune_augmenter(int(classifier.input.shape[1])))
    evaluator.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    return float(evaluator.evaluate(data.pipeline(source, 512, training=False), verbose=0,
                                    return_dict=True)["accuracy"])


# -- the fine-tuning job: a pretrained encoder and a labelled set you have ------

class ModelSourceError(ValueError):
    """A path given as a model is not a run or an export of the right kind."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A pretrained encoder (and projection head) and where it came from."""
    encoder: keras.Model
    head: keras.layers.Layer | None
    source: str

    @property
    def image_size(self) -> int:
        return int(self.encoder.input.shape[1])

    @property
    def channels(self) -> int:
        return int(self.encoder.input.shape[-1])


def _export_copy(src: str, kind: str, instead: str):
    """The Keras copy of an export of `kind`, and its card."""
    from contrastive_tf import export

    try:
        copy, card = export.load_keras_copy(src)
    except export.ExportError as error:
        raise ModelSourceError(str(error)) from None
    if card.get("kind") != kind:
        raise ModelSourceError(f"{src} is an export of an {card.get('kind')}, not of "
                               f"{'an' if kind == 'encoder' else 'a'} {kind}; give {instead}")
    return copy, card


def load_pretrained(src: str) -> Pretrained:
    """The encoder and head of a pretraining run directory (simclr.keras) or
    of an encoder export version directory (its Keras copy)."""
    if os.path.isfile(os.path.join(src, "simclr.keras")):
        model = keras.models.load_model(os.path.join(src, "simclr.keras"))
        return Pretrained(model.encoder, model.projection_head, src)
    if os.path.isfile(os.path.join(src, "model_card.json")):
        copy, card = _export_copy(src, "encoder", "a pretraining run or an encoder export")
        head = card.get("projection_head")
        return Pretrained(copy.get_layer(card["encoder"]),
                          copy.get_layer(head["name"]) if head else None, src)
    if os.path.isfile(os.path.join(src, "classifier.keras")):
        raise ModelSourceError(f"{src} is a fine-tuning or distillation run, not a "
                               "pretrained encoder: give the pretraining run it came from")
    raise ModelSourceError(
        f"{src} is neither a pretraining run (a folder with simclr.keras, as "
        "experiments.pretrain writes) nor an encoder export (a version folder with "
        "saved_model.pb and model_card.json, as experiments.export writes)")


def load_classifier(src: str) -> tuple[keras.Model, tuple[str, ...]]:
    """A classifier and its class names, from a fine-tuning or distillation
    run directory (classifier.keras, class_names.json) or a classifier
    export version directory (its Keras copy)."""
    path = os.path.join(src, "classifier.keras")
    if os.path.isfile(path):
        names_path = os.path.join(src, "class_names.json")
        names = read_json(names_path) if os.path.exists(names_path) else None
        classifier = keras.models.load_model(path)
    elif os.path.isfile(os.path.join(src, "model_card.json")):
        classifier, card = _export_copy(src, "classifier",
                                        "a fine-tuning run or a classifier export")
        names = card.get("class_names")
    elif os.path.isfile(os.path.join(src, "simclr.keras")):
        raise ModelSourceError(f"{src} is a pretraining run, not a classifier: fine-tune it "
                               "first (experiments.finetune)")
    else:
        raise ModelSourceError(
            f"{src} is neither a fine-tuning / distillation run (a folder with "
            "classifier.keras) nor a classifier export (a version folder with saved_model.pb "
            "and model_card.json)")
    count = int(classifier.output.shape[-1])
    return classifier, tuple(names or (str(i) for i in range(count)))


def validation_split(source: data.Source, fraction: float,
                     seed: int = 0) -> tuple[data.Source, data.Source, str]:
    """Carves a class-balanced validation part out of a labelled set, for
    model selection: round(fraction x n) images of each class, at least one,
    and at least one left to train on. Returns (train, val, a sentence
    saying what was done)."""
    if not source.labelled:
        raise data.DataError(f"{source.spec}: fine-tuning needs labels (class subfolders)")
    if not 0 < fraction < 1:
        raise ValueError(f"Expected 0 < val_fraction < 1. Received: val_fraction={fraction}")
    counts = np.bincount(source.labels, minlength=source.num_classes)
    few = [f"{source.class_names[c]!r} ({counts[c]})" for c in range(source.num_classes)
           if counts[c] < 2]
    if few:
        raise data.DataError(
            f"{source.spec}: every class needs at least 2 labelled images (one to train on, "
            f"one to validate); these have fewer: {', '.join(few)}")
    rng = np.random.RandomState(seed)
    val_index = []
    for label in range(source.num_classes):
        members = np.flatnonzero(source.labels == label)
        take = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        val_index.append(rng.permutation(members)[:take])
    val_index = np.sort(np.concatenate(val_index))
    train_index = np.setdiff1d(np.arange(source.num_examples), val_index)
    per_class = np.bincount(source.labels[val_index], minlength=source.num_classes)
    note = (f"validation: {len(val_index)} of the {source.num_examples} labelled images "
            f"({per_class.min()}-{per_class.max()} per class), training: {len(train_index)}")
    if counts.min() * fraction < 1:
        note += (f"; with only {counts.min()} images in the smallest class, val_fraction="
                 f"{fraction:g} rounds to one validation image per class")
    if len(val_index) < 50:
        note += (f"; {len(val_index)} validation images make the choice of epoch noisy "
                 "(ties go to the latest epoch)")
    return source.subset(train_index), source.subset(val_index), note


def match_classes(source: data.Source, class_names: tuple[str, ...]) -> data.Source:
    """`source` with its labels renumbered to `class_names` (by name); a
    class the model does not know is an error naming it."""
    if not source.labelled:
        raise data.DataError(f"{source.spec}: an evaluation set needs labels (class "
                             "subfolders)")
    if tuple(source.class_names) == tuple(class_names):
        return source
    unknown = sorted(set(source.class_names) - set(class_names))
    if unknown:
        raise data.DataError(
            f"{source.spec}: classes {unknown} are not among the labelled set's "
            f"{list(class_names)}")
    mapping = np.array([class_names.index(name) for name in source.class_names], np.int32)
    return dataclasses.replace(source, labels=mapping[source.labels],
                               class_names=tuple(class_names))


def save_classifier(classifier: keras.Model, class_names, folder: str) -> None:
    """classifier.keras and class_names.json in `folder`, each written
    atomically."""
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, "classifier.keras")) as tmp:
        classifier.save(tmp)
    write_json(os.path.join(folder, "class_names.json"), list(class_names))


def load_images(spec: str, role: str, size: int, channels: int,
                data_dir: str | None = None) -> data.Source:
    """The images a job was given for `role`, whole, as a model of `size` x
    `size` x `channels` images needs them (converted, and said so)."""
    source = data.load_whole(spec, role, data_dir=data_dir, image_size=size,
                             channels=channels)
    source, note = data.conform(source, size, channels)
    if note:
        progress.logger("data").info(note)
    return source


def load_labelled(spec: str, role: str, size: int, channels: int,
                  data_dir: str | None = None) -> data.Source:
    """`load_images`, for a set that must be labelled."""
    source = load_images(spec, role, size, channels, data_dir)
    if not source.labelled:
        raise data.DataError(f"{spec}: needs labels (a folder with one subfolder per class, "
                             "or a labelled dataset)")
    return source


def finetune_data(config: FinetuneConfig, size: int, channels: int):
    """The fine-tuning job's labelled images (or their class-balanced
    subset, written to labelled_subset.json), split into training and
    validation, and the optional test set; returns (labelled, train, val,
    test or None)."""
    labelled = load_labelled(config.dataset, "train", size, channels, config.data_dir)
    if config.labels_per_class or config.label_fraction:
        chosen = data.class_balanced_indices(
            labelled.labels, fraction=config.label_fraction or None,
            per_class=config.labels_per_class or None, seed=config.seed)
        data.write_indices(os.path.join(config.output_dir, "labelled_subset.json"), chosen,
                           dataset=config.dataset, seed=config.seed,
                           labels_per_class=config.labels_per_class,
                           label_fraction=config.label_fraction)
        log.info(f"kept a class-balanced subset of {len(chosen)} of the {labelled.num_examples} "
                 "labelled images (labelled_subset.json)")
        labelled = labelled.subset(chosen)
    train, val, note = validation_split(labelled, config.val_fraction, config.seed)
    log.info(f"{config.dataset}: {labelled.num_examples} labelled images, "
             f"{labelled.num_classes} classes; {note}")
    test = None
    if config.test_dataset:
        test = match_classes(load_labelled(config.test_dataset, "test", size, channels,
                                           config.data_dir), labelled.class_names)
    return labelled, train, val, test


def run_finetune(config: FinetuneConfig, verbose: int = 1) -> dict:
    """The fine-tuning job: every labelled image given (or a class-balanced
    subset), a validation part carved out for model selection, the
    pipeline's recipe; writes classifier.keras, class_names.json and
    summary.json into `config.output_dir`."""
    started = time.time()
    claim_output_dir(config.output_dir, "finetune", config.to_dict())
    pretrained = load_pretrained(config.encoder)
    labelled, train, val, test = finetune_data(config, pretrained.image_size,
                                               pretrained.channels)
    head = pretrained.head if config.from_layer == "head" else None
    with seeds.seeded(config.seed):
        classifier = build_classifier(pretrained.encoder, labelled.num_classes, head)
    policy = precision.precision_of(classifier)
    start = f"its head layer {head.ft_layer}" if head is not None and head.ft_layer else "h"
    log.info(f"fine-tuning {config.encoder} from {start} for {config.epochs} epochs in {policy}")
    result = train_classifier(
        classifier, train, val, test, epochs=config.epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        crop_min_area=config.crop_min_area, min_steps=config.min_steps, seed=config.seed,
        policy=policy, verbose=2 if verbose else 0)
    save_classifier(classifier, labelled.class_names, config.output_dir)
    summary = {"job": "finetune", "encoder": config.encoder, "dataset": config.dataset,
               "num_labelled": labelled.num_examples, "num_train": train.num_examples,
               "num_val": val.num_examples, "num_classes": labelled.num_classes,
               "val_accuracy": result.val_accuracy, "best_epoch": result.best_epoch,
               "epochs_run": result.epochs_run, "precision": policy,
               "wall_s": round(time.time() - started, 1)}
    if test is not None:
        summary.update(test_accuracy=result.test_accuracy, num_test=test.num_examples,
                       test_dataset=config.test_dataset)
    write_json(os.path.join(config.output_dir, "summary.json"), summary)
    shown = f", test {result.test_accuracy:.4f}" if test is not None else ""
    log.info(f"done: validation {result.val_accuracy:.4f} (best epoch {result.best_epoch}/"
             f"{result.epochs_run}){shown}; classifier.keras, class_names.json and summary.json "
             f"in {config.output_dir} ({summary['wall_s']} s)")
    return summary
