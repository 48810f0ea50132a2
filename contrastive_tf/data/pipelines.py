"""tf.data pipelines from a `Source`: batches of uint8 images (and labels)
for `model.fit`; augmentation runs inside the models, not here."""

from __future__ import annotations

import tensorflow as tf

from contrastive_tf.data import stream
from contrastive_tf.data.convert import square_resize
from contrastive_tf.data.source import DataError, Source


def _resized_stream(dataset: tf.data.Dataset, image_size: int | None) -> tf.data.Dataset:
    """`(image, label)` elements with images brought to one square size."""
    if image_size is None:
        return dataset
    return dataset.map(lambda x, y: (square_resize(x, image_size), y),
                       num_parallel_calls=tf.data.AUTOTUNE)


def _options(deterministic: bool = True) -> tf.data.Options:
    """Options of every pipeline this module builds.

    tf.data's autotuning is off: with it on, deleting an iterator (which
    `model.fit` does when it returns) waits for the autotuner's thread to
    wake from a sleep that grows while the iterator lives (TensorFlow 2.21;
    a race, so only sometimes), which can take as long again as the `fit`
    (BENCHMARKS.md, third session of 2026-11-29). Without it,
    `num_parallel_calls=AUTOTUNE` runs one call per core and the prefetch
    buffer still grows when the consumer waits. Datasets are sharded by
    data across replicas."""
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = deterministic
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return options


def pipeline(source: Source, batch_size: int, *, training: bool,
             with_labels: bool | None = None, seed: int = 0,
             image_size: int | None = None) -> tf.data.Dataset:
    """Batches of uint8 images (and int32 labels) for `model.fit`.

    Training pipelines shuffle with `seed` (reshuffled each epoch) and drop
    the last partial batch; `batch_size` is the global batch (Keras splits it
    across replicas). Streaming sources are brought to `image_size` when
    given (`square_resize`).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if training and source.num_examples < batch_size:
        raise DataError(
            f"{source.spec} ({source.split}) has {source.num_examples} images, "
            f"fewer than one batch of {batch_size}: lower `batch_size`")
    with_labels = source.labelled if with_labels is None else with_labels
    if with_labels and not source.labelled:
        raise DataError(f"{source.spec}: labels requested but the source is "
                        "unlabelled")
    if source.streams_files and not training:
        return stream.eval_stream(source, batch_size, with_labels=with_labels)
    if source.streams_files:
        raise DataError(f"{source.spec}: a folder read file by file trains through "
                        "data.view_stream (crops of the whole image)")
    if source.images is not None:
        tensors = ((source.images, source.labels) if with_labels
                   else source.images)
        dataset = tf.data.Dataset.from_tensor_slices(tensors)
        buffer = source.num_examples
    else:
        dataset = _resized_stream(source.dataset, image_size)
        if not with_labels:
            dataset = dataset.map(lambda x, y: x)
        dataset = dataset.cache() if source.num_examples <= 60000 else dataset
        buffer = min(source.num_examples, 10000)
    if training:
        dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=training,
                            num_parallel_calls=tf.data.AUTOTUNE)
    # Order within a batch may vary; batches do not.
    return dataset.with_options(_options(deterministic=False)).prefetch(tf.data.AUTOTUNE)


def training_stream(source: Source, batch_size: int, *, seed: int = 0,
                    start_step: int = 0, with_labels: bool = False,
                    image_size: int | None = None) -> tf.data.Dataset:
    """An endless stream of training batches that can resume mid-epoch.

    For in-memory sources each data epoch is a permutation drawn from
    `(seed, epoch)`, so the batch at any global step is fixed: a run resumed
    at `start_step` sees exactly the batches an uninterrupted run would.
    Streaming sources are shuffled with `seed`, skip the batches already
    seen in the current epoch (exact only up to tf.data's shuffle buffer),
    and are brought to `image_size` (`square_resize`) when given, since their
    images may differ in size.
    """
    if source.streams_files:
        raise DataError(f"{source.spec}: a folder read file by file trains through "
                        "data.view_stream (crops of the whole image)")
    if source.num_examples < batch_size:
        raise DataError(
            f"{source.spec} ({source.split}) has {source.num_examples} images, "
            f"fewer than one batch of {batch_size}: lower `batch_size`")
    if with_labels and not source.labelled:
        raise DataError(f"{source.spec}: labels requested but the source is unlabelled")
    steps_per_epoch = source.num_examples // batch_size
    options = _options()
    if source.images is None:
        dataset = _resized_stream(source.dataset, image_size)
        dataset = dataset if with_labels else dataset.map(lambda x, y: x)
        dataset = (dataset.shuffle(min(source.num_examples, 10000), seed=seed)
                   .repeat().batch(batch_size, drop_remainder=True)
                   .skip(start_step % steps_per_epoch))
        return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)

    images = tf.constant(source.images)
    labels = tf.constant(source.labels) if with_labels else None
    count, used = source.num_examples, steps_per_epoch * batch_size

    def epoch_order(epoch):
        noise = tf.random.stateless_uniform(
            [count], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(tf.argsort(noise)[:used])

    def gather(indices):
        if labels is None:
            return tf.gather(images, indices)
        return tf.gather(images, indices), tf.gather(labels, indices)

    first_epoch = start_step // steps_per_epoch
    dataset = (tf.data.Dataset.range(first_epoch, 2 ** 62)
               .flat_map(epoch_order)
               .skip((start_step % steps_per_epoch) * batch_size)
               .batch(batch_size, drop_remainder=True)
               .map(gather, num_parallel_calls=tf.data.AUTOTUNE))
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
