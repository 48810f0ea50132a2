"""Images brought to the size and channels a model needs: `square_resize`
(inside tf.data), `to_memory` (a streaming source read into arrays) and
`conform` (resize and gray <-> RGB, saying what it changed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from contrastive_tf.data import stream
from contrastive_tf.data.source import DataError, Source, from_arrays
from contrastive_tf.method.color import LUMA


def square_resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """A uint8 image of any size as `(size, size, channels)` uint8: the
    central square, resized (bicubic, antialiased) -- what `load_folder` does
    with Pillow, here inside tf.data for streaming sources."""
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    square = tf.image.crop_to_bounding_box(image, (shape[0] - side) // 2,
                                           (shape[1] - side) // 2, side, side)
    resized = tf.image.resize(square, [size, size], method="bicubic", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0, 255)), tf.uint8)


def to_memory(source: Source, image_size: int) -> Source:
    """A streaming source read into memory, each image brought to
    `image_size` (`square_resize`; a folder's files as `load_folder` reads
    them, undecodable ones skipped and named). For labelled sets and pools
    small enough to hold in memory."""
    if source.images is not None:
        return source
    if source.streams_files:
        return _files_to_memory(dataclasses.replace(source, image_size=image_size))
    images, labels = [], []
    for image, label in source.dataset.map(
            lambda x, y: (square_resize(x, image_size), y)).batch(256):
        images.append(image.numpy())
        labels.append(label.numpy())
    return dataclasses.replace(
        from_arrays(np.concatenate(images),
                    np.concatenate(labels) if source.num_classes else None,
                    source.class_names or None, source.spec, source.split),
        dataset=None)


def _files_to_memory(source: Source) -> Source:
    images, labels, paths = [], [], []
    for batch in stream.eval_stream(source, 256, with_labels=source.labelled,
                                    with_index=True):
        images.append(batch[0].numpy())
        if source.labelled:
            labels.append(batch[1].numpy())
        paths += [source.paths[i] for i in batch[-1].numpy()]
    if not images:
        raise DataError(f"{source.spec}: none of the {source.num_examples} files could be "
                        "decoded")
    held = from_arrays(np.concatenate(images), np.concatenate(labels) if labels else None,
                       source.class_names or None, source.spec, source.split)
    return dataclasses.replace(held, paths=tuple(paths))


def head(source: Source, count: int, image_size: int) -> Source:
    """The first `count` images of `source` in memory, at `image_size`; a
    streaming source is read only that far (a kNN bank or query set of a
    set too large to hold)."""
    count = min(count, source.num_examples)
    if source.images is not None:
        return source.subset(np.arange(count))
    if source.streams_files:
        return to_memory(source.subset(np.arange(count)), image_size)
    return to_memory(dataclasses.replace(source, dataset=source.dataset.take(count),
                                         num_examples=count), image_size)


def conform(source: Source, image_size: int, channels: int) -> tuple[Source, str | None]:
    """Images brought to `image_size` x `image_size` x `channels`, as a
    model trained on such images needs them: resized (`square_resize`) and
    converted gray <-> RGB (luma, as `grayscale` weighs it). Returns the
    source and a sentence saying what was converted (None if nothing)."""
    if channels not in (1, 3):
        raise ValueError(f"Expected channels 1 or 3 (the model's). Received: channels={channels}")
    if source.streams_files:
        # What was converted is known once the files have been read
        # (`conversion_note`).
        return dataclasses.replace(source, image_size=image_size, channels=channels), None
    source = to_memory(source, image_size)
    height, width, have = source.images.shape[1:]
    if (height, width, have) == (image_size, image_size, channels):
        return source, _files_note(source, image_size, channels)
    images = source.images
    if have != channels:
        if channels == 1:
            luma = images.astype(np.float32) @ np.array(LUMA, np.float32)
            images = np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
        else:
            images = np.repeat(images, 3, axis=-1)
    if (height, width) != (image_size, image_size):
        images = np.concatenate([
            _resize_batch(images[i:i + 512], image_size)
            for i in range(0, len(images), 512)])
    note = (f"{source.spec} ({source.split}): converted {source.num_examples} images from "
            f"{height}x{width}x{have} to {image_size}x{image_size}x{channels}, as the "
            "model was trained")
    return dataclasses.replace(source, images=images), note


def conversion_note(source: Source, count: int) -> str | None:
    """For a folder read file by file, after `count` of its evaluation
    images have streamed: what decoding them at the model's size and
    channels changed in its files, or None."""
    return _files_note(dataclasses.replace(
        source, stored_shapes=stream.STORED_SHAPES.of(source.spec), num_examples=count),
        source.image_size, source.channels)


def _files_note(source: Source, image_size: int, channels: int) -> str | None:
    """What reading a folder at `image_size` x `channels` changed in its
    files (other sizes, other channel counts), or None."""
    resized = sorted({f"{w}x{h}" for w, h, _ in source.stored_shapes
                      if (w, h) != (image_size, image_size)})
    recoloured = sorted({c for _, _, c in source.stored_shapes if c != channels})
    if not resized and not recoloured:
        return None
    changes = []
    if resized:
        changes.append(f"sizes {', '.join(resized[:3])}{' ...' if len(resized) > 3 else ''}"
                       f" -> {image_size}x{image_size} (central square)")
    if recoloured:
        changes.append(f"{'RGB' if recoloured[0] == 3 else 'grayscale'} -> "
                       f"{'grayscale' if channels == 1 else 'RGB'}")
    return (f"{source.spec}: converted {source.num_examples} images as the model was "
            f"trained ({'; '.join(changes)})")


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    return tf.map_fn(lambda x: square_resize(x, size), tf.constant(images),
                     fn_output_signature=tf.TensorSpec([size, size, images.shape[-1]],
                                                       tf.uint8)).numpy()
