"""A folder as a stream of files: decoded by tf.data's parallel calls, cropped
on the whole image for training, never held whole in memory.

`view_stream` feeds training: each element is one or two random resized
crops of an image, drawn on the whole decoded, upright image from (seed,
epoch, file) -- so the batch at any step is fixed and a resumed run sees
what an uninterrupted one would -- and the file list is split between the
workers of a multi-worker strategy (each decodes only its own share).
`eval_stream` feeds evaluation and prediction: the central square at the
model's size, in file order. A file that cannot be decoded is named once,
counted in `decode.SKIPPED` and left out (in a training batch, its place
taken by another image of the batch); the run goes on.

Decoded images are kept for later epochs in `ImageStore`: in memory up to
`MEMORY_BUDGET_BYTES`, and whole in a decoded cache on disk (`DiskCache`,
`cache_dir`) when asked for -- where decoding, not the model, would set the
pace (small models, small images, many epochs).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import tensorflow as tf

from contrastive_tf.data import decode
from contrastive_tf.data.cache import DiskCache
from contrastive_tf.data.source import DataError, Source
from contrastive_tf.runtime import progress

log = progress.logger("data")

# Decoded training images kept in memory for the next epochs, at most.
MEMORY_BUDGET_BYTES = 1 << 30


def short_side_for(image_size: int, crop_area: tuple) -> int:
    """The shorter side a training image needs so that its smallest crop
    (area `crop_area[0]`) still has `image_size` pixels a side."""
    return math.ceil(image_size / math.sqrt(crop_area[0]))


# -- decoded images for training crops ----------------------------------------

class ImageStore:
    """Whole training images of a file source by index: from the disk cache
    when there is one, else decoded from the file and kept in memory while
    `memory_budget` bytes allow."""

    def __init__(self, source: Source, short_side: int, cache_dir: str | None = None,
                 memory_budget: int = MEMORY_BUDGET_BYTES):
        self.paths, self.channels, self.short_side = source.paths, source.channels, short_side
        self.memory_budget = memory_budget
        self._held: dict[int, np.ndarray] = {}
        self._held_bytes = 0
        self._lock = threading.Lock()
        self.cache = None
        if cache_dir:
            self.cache = DiskCache(cache_dir, self.paths, self.channels, short_side)
            self.cache.build(self.decode)

    def decode(self, index: int) -> np.ndarray:
        return decode.whole_image(self.paths[index], self.channels, self.short_side)

    def get(self, index: int) -> np.ndarray:
        if self.cache is not None:
            return self.cache.get(index)
        image = self._held.get(index)
        if image is not None:
            return image
        image = self.decode(index)
        with self._lock:
            if self._held_bytes + image.nbytes <= self.memory_budget:
                self._held[index] = image
                self._held_bytes += image.nbytes
        return image

    def describe(self) -> str:
        if self.cache is not None:
            return f"decoded cache {self.cache.directory}"
        return (f"decoded on the fly, up to {self.memory_budget / 2 ** 30:.1f} GB of them kept "
                "in memory for later epochs")


class StoredShapes:
    """The (width, height, channels) the files of each folder had as stored,
    seen while they streamed (a few distinct values per folder), so a job
    can say afterwards what it converted."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: dict[str, set] = {}

    def add(self, spec: str, shape: tuple) -> None:
        with self._lock:
            self._seen.setdefault(spec, set()).add(tuple(shape))

    def of(self, spec: str) -> frozenset:
        with self._lock:
            return frozenset(self._seen.get(spec, ()))


STORED_SHAPES = StoredShapes()


def _skip(path: str, error: Exception) -> None:
    if decode.SKIPPED.add(path, f"{type(error).__name__}: {error}"):
        log.warning(f"skipped {path}: cannot decode it ({type(error).__name__}: {error}); "
                    f"{len(decode.SKIPPED)} file(s) skipped so far")


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.autotune.enabled = False  # see pipelines._options
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options


def view_stream(source: Source, batch_size: int, *, image_size: int, views: int = 2,
                crop_area=(0.08, 1.0), aspect_ratio=(3 / 4, 4 / 3), flip: bool = True,
                seed: int = 0, start_step: int = 0, with_labels: bool = False,
                cache_dir: str | None = None, strategy: tf.distribute.Strategy | None = None,
                transform=None, memory_budget: int = MEMORY_BUDGET_BYTES):
    """An endless stream of training batches of a folder read file by file.

    Elements are `{"view1": ..., "view2": ...}` (`views=2`, SimCLR's pair)
    or `{"view": ...}` (`views=1`, the crop + flip of fine-tuning and
    distillation): uint8 `(batch, image_size, image_size, channels)` random
    resized crops of the whole image, with labels as `(views, labels)`.
    Each data epoch visits the files in a permutation drawn from (seed,
    epoch) and each file's crops come from (seed, epoch, file): the batches
    after `start_step` are those an uninterrupted run sees. Under a
    multi-worker strategy each worker decodes only its share of every epoch
    (a `tf.distribute.DistributedDataset` is returned); `batch_size` is the
    global batch. Decoded images are kept for later epochs in `cache_dir`
    or, up to `memory_budget` bytes, in memory (`ImageStore`).
    `transform(dataset, worker, workers)`, if given, is applied to each
    worker's batched dataset before it is distributed (to
    reshape elements, or zip another stream of the worker's batch size).
    """
    if not source.streams_files:
        raise DataError(f"{source.spec}: view_stream needs a folder read file by "
                        "file")
    if with_labels and not source.labelled:
        raise DataError(f"{source.spec}: labels requested but the source is unlabelled")
    count = source.num_examples
    if count < batch_size:
        raise DataError(f"{source.spec} ({source.split}) has {count} images, fewer than one "
                        f"batch of {batch_size}: lower `batch_size`")
    steps_per_epoch = count // batch_size
    store = ImageStore(source, short_side_for(image_size, crop_area), cache_dir, memory_budget)
    labels = source.labels if with_labels else None
    shape = (views, image_size, image_size, source.channels)

    def load(indices, epoch):
        """The views of a batch of files; a file that cannot be decoded is
        named, counted and replaced by another image of its batch."""
        out = np.zeros((len(indices), *shape), np.uint8)
        ok = np.zeros(len(indices), bool)
        for row, index in enumerate(indices):
            index = int(index)
            try:
                image = store.get(index)
            except Exception as error:  # Pillow raises many types for bad files
                _skip(source.paths[index], error)
                continue
            rng = np.random.default_rng([seed, int(epoch), index])
            boxes = decode.crop_boxes(rng, image.shape[1], image.shape[0], views,
                                      crop_area, aspect_ratio, flip)
            out[row], ok[row] = decode.cut_views(image, boxes, image_size), True
        if not ok.all():
            if not ok.any():
                raise DataError(f"{source.spec}: no file of a batch could be decoded "
                                f"({source.paths[int(indices[0])]} ...)")
            good = np.flatnonzero(ok)
            out[~ok] = out[good[np.arange((~ok).sum()) % len(good)]]
        return out

    def batch(indices, epochs):
        cropped = tf.numpy_function(load, [indices, epochs[0]], tf.uint8)
        cropped.set_shape((None, *shape))
        named = ({"view1": cropped[:, 0], "view2": cropped[:, 1]} if views == 2
                 else {"view": cropped[:, 0]})
        if labels is not None:
            return named, tf.gather(labels, indices)
        return named

    def per_worker(workers: int, worker: int, local_batch: int) -> tf.data.Dataset:
        used = steps_per_epoch * batch_size

        def epoch_order(epoch):
            noise = tf.random.stateless_uniform(
                [count], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
            order = tf.argsort(noise)[:used][worker::workers]
            return tf.data.Dataset.from_tensor_slices(
                (tf.cast(order, tf.int64), tf.fill(tf.shape(order), epoch)))

        first_epoch = start_step // steps_per_epoch
        dataset = (tf.data.Dataset.range(first_epoch, 2 ** 62)
                   .flat_map(epoch_order)
                   .skip((start_step % steps_per_epoch) * local_batch)
                   .batch(local_batch, drop_remainder=True)
                   .map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
        if transform is not None:
            dataset = transform(dataset, worker, workers)
        return dataset.with_options(_options()).prefetch(2)

    log.info(f"{source.spec}: streaming {count} files, random resized crops of the whole "
             f"image ({store.describe()})")
    strategy = strategy or tf.distribute.get_strategy()
    workers = _input_pipelines(strategy)
    if workers == 1:
        return per_worker(1, 0, batch_size)
    if batch_size % strategy.num_replicas_in_sync:
        raise DataError(f"batch_size={batch_size} does not divide among "
                        f"{strategy.num_replicas_in_sync} replicas")

    def dataset_fn(context: tf.distribute.InputContext):
        log.info(f"worker {context.input_pipeline_id} of {context.num_input_pipelines}: "
                 f"decodes its {steps_per_epoch * batch_size // context.num_input_pipelines} "
                 "files of every epoch")
        return per_worker(context.num_input_pipelines, context.input_pipeline_id,
                          context.get_per_replica_batch_size(batch_size))

    return strategy.distribute_datasets_from_function(dataset_fn)


def _input_pipelines(strategy: tf.distribute.Strategy) -> int:
    """How many processes feed `strategy` (workers of a multi-worker one)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 1
    jobs = resolver.cluster_spec().as_dict()
    return sum(len(jobs.get(name, ())) for name in ("chief", "worker"))


def eval_stream(source: Source, batch_size: int, *, with_labels: bool | None = None,
                with_index: bool = False) -> tf.data.Dataset:
    """Batches of evaluation images of a folder read file by file, in file
    order: the central square at `source.image_size` (as the in-memory
    loader makes them), with labels and/or the file's index (the row of
    `source.paths`) when asked; undecodable files are skipped and named."""
    if not source.streams_files:
        raise DataError(f"{source.spec}: eval_stream needs a folder read file by file")
    with_labels = source.labelled if with_labels is None else with_labels
    size, channels = source.image_size, source.channels

    def load(index):
        index = int(index)
        try:
            image, stored = decode.square_image(source.paths[index], size, channels)
            STORED_SHAPES.add(source.spec, stored)
            return image, True
        except Exception as error:  # Pillow raises many types for bad files
            _skip(source.paths[index], error)
            return np.zeros((size, size, channels), np.uint8), False

    def element(index):
        image, ok = tf.numpy_function(load, [index], (tf.uint8, tf.bool))
        image.set_shape((size, size, channels))
        parts = [image]
        if with_labels:
            parts.append(tf.gather(source.labels, index))
        if with_index:
            parts.append(index)
        return tuple(parts) if len(parts) > 1 else image, ok

    options = _options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    dataset = (tf.data.Dataset.range(source.num_examples)
               .map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .filter(lambda value, ok: ok)
               .map(lambda value, ok: value)
               .batch(batch_size))
    return dataset.with_options(options).prefetch(2)
