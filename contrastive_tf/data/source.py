"""What every loader returns: a `Source` (in-memory arrays or a streaming
tf.data.Dataset, with its labels and class names), `from_arrays`, and
`DataError`, the error every loader raises for data it cannot use."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf


class DataError(ValueError):
    """A dataset that cannot be used, with the reason and the place."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset split: in-memory arrays or a streaming tf.data.Dataset.

    Attributes:
        spec: the spec it was loaded from.
        split: the split name.
        num_examples: number of images.
        class_names: names of the classes, index = label; empty if unlabelled.
        images: `(n, h, w, c)` uint8, for in-memory sources.
        labels: `(n,)` int32 or None (unlabelled).
        dataset: unbatched `(image, label)` dataset for streaming sources.
        skipped: files that could not be decoded and were left out.
        paths: for folders, the file of each image (index = row).
        stored_shapes: for folders, the (width, height, channels) the files
            have before they are brought to one size.
        channels: for a folder read as a stream of files (`paths` set, no
            `images` or `dataset`), the channels its images are decoded to.
        image_size: for such a folder, the side of its evaluation images.
    """
    spec: str
    split: str
    num_examples: int
    class_names: tuple[str, ...] = ()
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    dataset: tf.data.Dataset | None = None
    skipped: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    stored_shapes: frozenset = frozenset()
    channels: int = 0
    image_size: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def streams_files(self) -> bool:
        """A folder read file by file (`data.stream`), never held whole."""
        return self.images is None and self.dataset is None and bool(self.paths)

    @property
    def labelled(self) -> bool:
        return self.labels is not None or (self.dataset is not None
                                           and self.num_classes > 0)

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        if self.images is not None:
            return tuple(self.images.shape[1:])
        if self.streams_files:
            return (self.image_size, self.image_size, self.channels)
        spec = self.dataset.element_spec[0]
        return tuple(spec.shape)

    def subset(self, indices: Sequence[int]) -> "Source":
        """The examples at `indices` (of an in-memory source or a folder
        read file by file)."""
        if self.images is None and not self.streams_files:
            raise DataError(f"{self.spec}: subsets need an in-memory source or a folder")
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self, images=None if self.images is None else self.images[indices],
            labels=None if self.labels is None else self.labels[indices],
            paths=tuple(self.paths[i] for i in indices) if self.paths else (),
            num_examples=len(indices))


def from_arrays(images, labels=None, class_names: Sequence[str] | None = None,
                spec: str = "arrays", split: str = "train") -> Source:
    """A source from NumPy arrays of images `(n, h, w[, c])` and labels."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{spec}: expected images of shape (n, h, w, 1 or 3), "
                        f"got {images.shape}")
    if images.shape[0] == 0:
        raise DataError(f"{spec}: no images")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"{spec}: zero-size images, shape {images.shape}")
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating):
            if images.min() < 0 or images.max() > 1:
                raise DataError(f"{spec}: float images must lie in [0, 1], got "
                                f"[{images.min()}, {images.max()}]")
            images = np.round(images * 255).astype(np.uint8)
        else:
            raise DataError(f"{spec}: expected uint8 or float images, got "
                            f"{images.dtype}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],):
            raise DataError(f"{spec}: expected {images.shape[0]} labels, got "
                            f"shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{spec}: labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int32)
        count = len(class_names) if class_names else int(labels.max()) + 1
        bad = labels[(labels < 0) | (labels >= count)]
        if bad.size:
            raise DataError(f"{spec}: labels out of range [0, {count}): "
                            f"{sorted(set(bad.tolist()))[:10]}")
        class_names = tuple(class_names or (str(i) for i in range(count)))
    return Source(spec=spec, split=split, num_examples=int(images.shape[0]),
                  class_names=tuple(class_names or ()), images=images,
                  labels=labels)
