"""The distillation job: a fine-tuned teacher labels unlabelled images for a
student (SimCLRv2's third step).

`distill` trains a student with `method.distiller.Distiller`; `run_distill`
is what experiments/distill.py runs: a teacher (run or export), the images
to distil on, and optionally a labelled set and a test set.
"""

from __future__ import annotations

import dataclasses
import time

import keras
import tensorflow as tf

from contrastive_tf import data
from contrastive_tf.jobs.config import DistillConfig
from contrastive_tf.jobs.finetune import evaluate_classifier
from contrastive_tf.jobs.models import build_student
from contrastive_tf.method import optim
from contrastive_tf.method.augment import finetune_augmenter
from contrastive_tf.method.backbones import resnet
from contrastive_tf.method.distiller import Distiller
from contrastive_tf.runs import artifacts
from contrastive_tf.runtime import distribution, precision, progress, seeds

log = progress.logger("distill")


def distill(teacher: keras.Model, student: keras.Model, pool: data.Source, *,
            labelled: data.Source | None = None, label_weight: float = 0.0,
            epochs: int = 20, batch_size: int = 256, learning_rate: float = 0.05,
            temperature: float = 1.0, crop_min_area: float = 0.3, weight_decay: float = 1e-4,
            policy: str = "float32", seed: int = 0, callbacks: list | None = None,
            verbose: int = 2, cache_dir: str | None = None,
            strategy: tf.distribute.Strategy | None = None) -> keras.Model:
    """Trains `student` (in place) to match `teacher` on `pool`'s images,
    without their labels (SimCLRv2): SGD with momentum, one epoch of warmup
    then cosine, crop + flip views, loss scaling under mixed_float16. With
    `labelled` and `label_weight` > 0 each step adds the cross-entropy of a
    labelled batch. Returns the student. A folder read file by file streams
    (crops of its whole images, `data.view_stream`; `cache_dir` keeps them
    decoded); teacher and student are made under `strategy` by the caller.
    """
    image_size = int(student.input.shape[1])
    augmenter = finetune_augmenter(image_size, crop_min_area, seed)
    strategy = strategy or tf.distribute.get_strategy()
    batch_size = min(batch_size, pool.num_examples)
    steps = max(pool.num_examples // batch_size, 1)
    with strategy.scope(), precision.policy_scope(policy):
        distiller = Distiller(teacher, student, augmenter,
                              temperature=temperature, label_weight=label_weight)
        optimizer = optim.make_optimizer(
            "sgd", optim.WarmupCosine(learning_rate, steps, steps * epochs), weight_decay)
        optim.exclude_from_decay(optimizer, student.trainable_variables)
        distiller.compile(optimizer=precision.loss_scaled(optimizer, policy))

    unlabelled = dataclasses.replace(pool, labels=None)
    labelled_batch = 0 if labelled is None or not label_weight else min(
        batch_size, labelled.num_examples)

    def labelled_stream(workers: int = 1, worker: int = 0) -> tf.data.Dataset:
        # This worker's share of the labelled batch, drawn with its own seed.
        if labelled.streams_files:
            return data.view_stream(
                labelled, labelled_batch // workers, image_size=image_size, views=1,
                crop_area=augmenter.crop_area, aspect_ratio=augmenter.aspect_ratio,
                seed=seed + worker, with_labels=True, strategy=tf.distribute.get_strategy())
        return data.training_stream(labelled, labelled_batch // workers, seed=seed + worker,
                                    with_labels=True)

    def with_labelled(dataset, worker, workers):
        return tf.data.Dataset.zip(dataset, labelled_stream(workers, worker))

    if pool.streams_files:
        stream = data.view_stream(
            unlabelled, batch_size, image_size=image_size, views=1,
            crop_area=augmenter.crop_area, aspect_ratio=augmenter.aspect_ratio, seed=seed,
            cache_dir=cache_dir, strategy=strategy,
            transform=with_labelled if labelled_batch else None)
    else:
        stream = data.training_stream(unlabelled, batch_size, seed=seed)
        if labelled_batch:
            stream = tf.data.Dataset.zip(stream, labelled_stream())
    distiller.fit(stream, steps_per_epoch=steps, epochs=epochs, verbose=verbose,
                  callbacks=callbacks, shuffle=False)
    return student


def job_student(config: DistillConfig, teacher: keras.Model,
                policy: str) -> tuple[keras.Model, str]:
    """The student a `DistillConfig` asks for, and a sentence describing it:
    from a pretrained encoder, a ResNet of the given size, or the teacher's
    own architecture freshly initialised (`models.build_student`)."""
    shape = tuple(teacher.input.shape[1:])
    source, why = config.student_encoder, ""
    if source == "auto" and not config.student_depth:
        source = artifacts.teacher_encoder(config.teacher)
        why = " (the encoder the teacher was fine-tuned from)"
        if source is None:
            log.info(f"the teacher's run does not name the encoder it was fine-tuned from: "
                     "the student is the teacher's architecture, freshly initialised "
                     "(give --student_encoder to start it from a pretrained encoder)")
    if source not in ("auto", "scratch", "", None):
        pretrained = artifacts.load_pretrained(source)
        if (pretrained.image_size, pretrained.image_size, pretrained.channels) != shape:
            raise artifacts.ModelSourceError(
                f"student_encoder {source} takes "
                f"{pretrained.image_size}x{pretrained.image_size}x{pretrained.channels} "
                f"images, the teacher {shape[0]}x{shape[1]}x{shape[2]}")
        return (build_student(teacher, (pretrained.encoder, pretrained.head)),
                f"from the pretrained encoder {source}{why}")
    if config.student_depth:
        width = config.student_base_width or 64
        with precision.policy_scope(policy):
            encoder = resnet(config.student_depth, base_width=width, input_shape=shape)
            student = build_student(teacher, (encoder, None))
        return student, f"ResNet-{config.student_depth} (base width {width}) from scratch"
    return (build_student(teacher, policy=policy),
            "the teacher's architecture, freshly initialised")


def run_distill(config: DistillConfig, verbose: int = 1) -> dict:
    """The distillation job: a fine-tuned teacher (run or export) labels
    `config.dataset`'s images (their own labels unused) for a student;
    writes classifier.keras, class_names.json and summary.json."""
    started = time.time()
    # The strategy first: a multi-worker one must exist before TensorFlow's runtime starts.
    strategy = distribution.make_strategy(config.strategy)
    chief = distribution.is_chief(strategy)  # the one worker that writes the outputs
    if chief:
        artifacts.claim_output_dir(config.output_dir, "distill", config.to_dict())
    choice = precision.resolve(config.precision)
    with strategy.scope():
        teacher, class_names = artifacts.load_classifier(config.teacher)
        precision.recast(teacher, choice.policy)
    size, channels = int(teacher.input.shape[1]), int(teacher.input.shape[-1])
    pool = data.load_images(config.dataset, "train", size, channels, config.data_dir)
    labelled = None
    if config.labelled_dataset:
        labelled = data.match_classes(data.load_labelled(
            config.labelled_dataset, "train", size, channels, config.data_dir), class_names)
    test = None
    if config.test_dataset:
        test = data.match_classes(data.load_labelled(
            config.test_dataset, "test", size, channels, config.data_dir), class_names)
    with seeds.seeded(config.seed):
        with strategy.scope():
            student, described = job_student(config, teacher, choice.policy)
            policy = choice.policy
            precision.recast(student, policy)
        labelled_term = (f", labelled term x{config.label_weight} on {labelled.num_examples} "
                         "images" if labelled is not None and config.label_weight else "")
        log.info(f"distilling {config.teacher} into a student ({described}, {policy}) on "
                 f"{pool.num_examples} images of {config.dataset}, {config.epochs} epochs"
                 f"{labelled_term}")
        distill(teacher, student, pool, labelled=labelled, label_weight=config.label_weight,
                epochs=config.epochs, batch_size=config.batch_size,
                learning_rate=config.learning_rate, temperature=config.temperature,
                crop_min_area=config.crop_min_area, weight_decay=config.weight_decay,
                policy=policy, seed=config.seed, verbose=2 if verbose else 0,
                cache_dir=config.cache_dir or None, strategy=strategy)
    if chief:
        artifacts.save_classifier(student, class_names, config.output_dir)
    summary = {"job": "distill", "teacher": config.teacher, "dataset": config.dataset,
               "num_images": pool.num_examples, "student": described, "precision": policy,
               "epochs": config.epochs, "wall_s": round(time.time() - started, 1),
               **data.SKIPPED.summary()}
    if test is not None:
        summary.update(test_accuracy=evaluate_classifier(student, test),
                       teacher_test_accuracy=evaluate_classifier(teacher, test),
                       num_test=test.num_examples, test_dataset=config.test_dataset)
        log.info(f"test accuracy: student {summary['test_accuracy']:.4f}, teacher "
                 f"{summary['teacher_test_accuracy']:.4f}")
    summary["wall_s"] = round(time.time() - started, 1)
    if chief:
        artifacts.write_summary(config.output_dir, summary)
    log.info(f"done: classifier.keras, class_names.json and summary.json in {config.output_dir} "
             f"({summary['wall_s']} s)")
    return summary
