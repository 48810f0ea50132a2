"""The fine-tuning job, and the training of every classifier.

`train_classifier` trains a classifier (`method.classifier.build_classifier`:
a linear layer on h, or on the first projection-head layer as SimCLRv2
does) with crop + flip augmentation, keeping its best epoch on a validation
split. The same function trains the supervised baseline from a freshly
initialised encoder, so the two differ only in their starting weights.
`run_finetune` is what experiments/finetune.py runs: a pretrained encoder
(run or export) and the labelled images a user has.
"""

from __future__ import annotations

import dataclasses
import os
import time

import keras
import tensorflow as tf

from contrastive_tf import data
from contrastive_tf.jobs.config import FinetuneConfig
from contrastive_tf.jobs.models import classifier_parts
from contrastive_tf.method import optim
from contrastive_tf.method.augment import finetune_augmenter
from contrastive_tf.method.backbones import freeze_stages
from contrastive_tf.method.classifier import ClassifierTrainer, KeepBestEpoch, build_classifier
from contrastive_tf.runs import artifacts
from contrastive_tf.runtime import distribution, precision, progress, seeds

log = progress.logger("finetune")


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    test_accuracy: float | None  # None without a test set
    val_accuracy: float
    epochs_run: int
    best_epoch: int


def train_classifier(classifier: keras.Model, train: data.Source,
                     val: data.Source, test: data.Source | None, *,
                     epochs: int = 100, batch_size: int = 64,
                     learning_rate: float = 0.1, weight_decay: float = 1e-4,
                     optimizer: str = "sgd", patience: int = 0,
                     crop_min_area: float = 0.08, min_steps: int = 0,
                     seed: int = 0, verbose: int = 0, policy: str | None = None,
                     callbacks: list | None = None,
                     strategy: tf.distribute.Strategy | None = None) -> FinetuneResult:
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
    loss. `callbacks` are passed to `fit`; the trainer is made under
    `strategy` (default: the current one), where the classifier must have
    been made too. A folder read file by file
    (`Source.streams_files`) trains on crops of its whole images
    (`data.view_stream`) and is evaluated as it streams.
    """
    if patience < 0:
        raise ValueError(f"Expected patience >= 0. Received: patience={patience}")
    with seeds.seeded(seed):
        image_size = int(classifier.input.shape[1])
        policy = policy or precision.precision_of(classifier)
        augmenter = finetune_augmenter(image_size, crop_min_area, seed)
        strategy = strategy or tf.distribute.get_strategy()
        batch_size = min(batch_size, train.num_examples)
        steps = max(train.num_examples // batch_size, min_steps, 1)
        with strategy.scope(), precision.policy_scope(policy):
            trainer = ClassifierTrainer(classifier, augmenter)
            schedule = optim.WarmupCosine(learning_rate, steps, steps * epochs)
            optimizer = optim.make_optimizer(optimizer, schedule, weight_decay)
            optim.exclude_from_decay(optimizer, trainer.trainable_variables)
            trainer.compile(optimizer=precision.loss_scaled(optimizer, policy))
        val_data = data.pipeline(val, 512, training=False)
        if train.streams_files:
            stream = data.view_stream(
                train, batch_size, image_size=image_size, views=1,
                crop_area=augmenter.crop_area, aspect_ratio=augmenter.aspect_ratio,
                seed=seed, with_labels=True, strategy=strategy)
        else:
            stream = data.training_stream(train, batch_size, seed=seed, with_labels=True)
        keeper = KeepBestEpoch(patience)
        with progress.evaluation_passes_end():  # the training stream is endless
            history = trainer.fit(stream, steps_per_epoch=steps, epochs=epochs,
                                  validation_data=val_data,
                                  callbacks=[keeper, *(callbacks or [])],
                                  shuffle=False, verbose=verbose)
        test_accuracy = None if test is None else evaluate_classifier(classifier, test)
    return FinetuneResult(test_accuracy=test_accuracy, val_accuracy=keeper.best,
                          epochs_run=len(history.history["val_accuracy"]),
                          best_epoch=keeper.best_epoch)


def evaluate_classifier(classifier: keras.Model, source: data.Source) -> float:
    """Accuracy of a float-input classifier on uint8 images (evaluation
    preprocessing: centre crop above 32 px, resize)."""
    evaluator = ClassifierTrainer(classifier, finetune_augmenter(int(classifier.input.shape[1])))
    evaluator.compile()
    with progress.evaluation_passes_end():
        return float(evaluator.evaluate(data.pipeline(source, 512, training=False), verbose=0,
                                        return_dict=True)["accuracy"])


# -- the fine-tuning job: a pretrained encoder and a labelled set you have ------

def finetune_data(config: FinetuneConfig, size: int, channels: int, write: bool = True):
    """The fine-tuning job's labelled images (or their class-balanced
    subset, written to labelled_subset.json), split into training and
    validation, and the optional test set; returns (labelled, train, val,
    test or None)."""
    labelled = data.load_labelled(config.dataset, "train", size, channels, config.data_dir)
    if config.labels_per_class or config.label_fraction:
        chosen = data.class_balanced_indices(
            labelled.labels, fraction=config.label_fraction or None,
            per_class=config.labels_per_class or None, seed=config.seed)
        if write:
            data.write_indices(os.path.join(config.output_dir, artifacts.LABELLED_SUBSET),
                               chosen, dataset=config.dataset, seed=config.seed,
                               labels_per_class=config.labels_per_class,
                               label_fraction=config.label_fraction)
        log.info(f"kept a class-balanced subset of {len(chosen)} of the {labelled.num_examples} "
                 "labelled images (labelled_subset.json)")
        labelled = labelled.subset(chosen)
    train, val, note = data.validation_split(labelled, config.val_fraction, config.seed)
    log.info(f"{config.dataset}: {labelled.num_examples} labelled images, "
             f"{labelled.num_classes} classes; {note}")
    test = None
    if config.test_dataset:
        test = data.match_classes(data.load_labelled(config.test_dataset, "test", size,
                                                     channels, config.data_dir),
                                  labelled.class_names)
    return labelled, train, val, test


def run_finetune(config: FinetuneConfig, verbose: int = 1) -> dict:
    """The fine-tuning job: every labelled image given (or a class-balanced
    subset), a validation part carved out for model selection, the
    pipeline's recipe; writes classifier.keras, class_names.json and
    summary.json into `config.output_dir`."""
    started = time.time()
    # The strategy first: a multi-worker one must exist before TensorFlow's runtime starts.
    strategy = distribution.make_strategy(config.strategy)
    chief = distribution.is_chief(strategy)  # the one worker that writes the outputs
    if chief:
        artifacts.claim_output_dir(config.output_dir, "finetune", config.to_dict())
    policy = precision.resolve(config.precision).policy
    with strategy.scope():
        pretrained = artifacts.load_pretrained(config.encoder)
    labelled, train, val, test = finetune_data(config, pretrained.image_size,
                                               pretrained.channels, write=chief)
    encoder, head = classifier_parts(pretrained, config.from_layer)
    with seeds.seeded(config.seed), strategy.scope(), precision.policy_scope(policy):
        classifier = precision.recast(build_classifier(encoder, labelled.num_classes, head),
                                      policy)
    frozen = freeze_stages(encoder, config.fine_tune_after_block)
    start = f"its head layer {head.ft_layer}" if head is not None else "h"
    if frozen:
        after = config.fine_tune_after_block
        stages = f" and stages 1-{after}" if after else ""
        start += f", the stem{stages} frozen ({len(frozen)} layers)"
    log.info(f"fine-tuning {config.encoder} from {start} for {config.epochs} epochs in {policy}"
             f" ({strategy.num_replicas_in_sync} replica(s))")
    result = train_classifier(
        classifier, train, val, test, epochs=config.epochs, batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        crop_min_area=config.crop_min_area, min_steps=config.min_steps, seed=config.seed,
        policy=policy, verbose=2 if verbose else 0, strategy=strategy)
    if chief:
        artifacts.save_classifier(classifier, labelled.class_names, config.output_dir)
    summary = {"job": "finetune", "encoder": config.encoder, "dataset": config.dataset,
               "num_labelled": labelled.num_examples, "num_train": train.num_examples,
               "num_val": val.num_examples, "num_classes": labelled.num_classes,
               "val_accuracy": result.val_accuracy, "best_epoch": result.best_epoch,
               "epochs_run": result.epochs_run, "precision": policy,
               "fine_tune_after_block": config.fine_tune_after_block,
               "wall_s": round(time.time() - started, 1), **data.SKIPPED.summary()}
    if test is not None:
        summary.update(test_accuracy=result.test_accuracy, num_test=test.num_examples,
                       test_dataset=config.test_dataset)
    if chief:
        artifacts.write_summary(config.output_dir, summary)
    shown = f", test {result.test_accuracy:.4f}" if test is not None else ""
    log.info(f"done: validation {result.val_accuracy:.4f} (best epoch {result.best_epoch}/"
             f"{result.epochs_run}){shown}; classifier.keras, class_names.json and summary.json "
             f"in {config.output_dir} ({summary['wall_s']} s)")
    return summary
