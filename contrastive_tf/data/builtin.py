"""The named datasets: `embedded` (the Fashion-MNIST subset shipped in
data/embedded/), `fashion_mnist` (the full set, found offline) and
`tfds:<name>` (any prepared TFDS image classification set, streaming)."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import tensorflow as tf

from contrastive_tf.data.source import DataError, Source, from_arrays


_HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_PATH = os.path.join(_HERE, "embedded", "fashion_mnist_embedded.npz")
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# How the embedded subset was chosen from the full set (experiments/build_embedded_data.py):
# class_balanced_indices(labels, per_class=EMBEDDED_PER_CLASS[split], seed=EMBEDDED_SEED).
EMBEDDED_PER_CLASS = {"train": 1000, "test": 200}
EMBEDDED_SEED = 0
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (as Fashion-MNIST ships it), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: expected {int(np.prod(dims))} values for "
                        f"shape {dims}, found {body.size} (truncated?)")
    return body.reshape(dims)


def read_fashion_mnist_dir(directory: str, split: str):
    """Images `(n, 28, 28, 1)` uint8 and labels of one split from IDX files."""
    if split not in _IDX_FILES:
        raise DataError(f"fashion_mnist: unknown split {split!r}; use "
                        f"{sorted(_IDX_FILES)}")
    paths = []
    for stem in _IDX_FILES[split]:
        found = [os.path.join(directory, stem + ext) for ext in (".gz", "")
                 if os.path.exists(os.path.join(directory, stem + ext))]
        if not found:
            raise DataError(f"fashion_mnist: {stem}[.gz] not found in {directory}")
        paths.append(found[0])
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"fashion_mnist: {images.shape[0]} images but "
                        f"{labels.shape[0]} labels in {directory}")
    return images[..., None], labels.astype(np.int32)


def load_embedded(split: str = "train") -> Source:
    """The class-balanced Fashion-MNIST subset shipped in the package."""
    if split not in ("train", "test"):
        raise DataError(f"embedded: unknown split {split!r}; use 'train' or 'test'")
    with np.load(EMBEDDED_PATH) as arrays:
        images = arrays[f"{split}_images"][..., None]
        labels = arrays[f"{split}_labels"].astype(np.int32)
    return from_arrays(images, labels, FASHION_MNIST_CLASSES, "embedded", split)


def _fashion_mnist_dirs(data_dir: str | None):
    if data_dir:
        yield data_dir
        yield os.path.join(data_dir, "fashion-mnist")
    yield DEBIAN_FASHION_MNIST_DIR
    yield os.path.join(os.path.expanduser("~"), ".keras", "datasets",
                       "fashion-mnist")


def load_fashion_mnist(split: str = "train", data_dir: str | None = None) -> Source:
    """The full Fashion-MNIST from the first place it is found.

    Looks in `data_dir`, Debian's `dataset-fashion-mnist` package, the Keras
    cache (`~/.keras/datasets/fashion-mnist`), then prepared TFDS data.
    """
    tried = []
    for directory in _fashion_mnist_dirs(data_dir):
        tried.append(directory)
        if os.path.isdir(directory):
            try:
                images, labels = read_fashion_mnist_dir(directory, split)
            except DataError:
                continue
            return from_arrays(images, labels, FASHION_MNIST_CLASSES,
                               "fashion_mnist", split)
    try:
        return load_tfds("fashion_mnist", split, data_dir=data_dir)
    except DataError as error:
        raise DataError(
            "fashion_mnist: not found. Looked in " + ", ".join(tried) +
            f" and TFDS ({error}). Install it with `apt-get install "
            "dataset-fashion-mnist` or pass data_dir= a folder with the four "
            "IDX files.") from None


def load_tfds(name: str, split: str = "train", data_dir: str | None = None,
              download: bool = False) -> Source:
    """A TFDS image classification dataset as a streaming source.

    Without `download=True` the data must already be prepared under
    `data_dir` (or TFDS' default folder): nothing is fetched, and a missing
    dataset fails at once with instructions.
    """
    import tensorflow_datasets as tfds

    dataset_name = name.split(":")[0]
    if dataset_name not in tfds.list_builders():
        raise DataError(f"tfds:{name}: no TFDS dataset called {dataset_name!r}")
    try:
        builder = tfds.builder(name.replace(":", "/"), data_dir=data_dir)
    except Exception as error:  # tfds raises several types for bad names
        raise DataError(f"tfds:{name}: {error}") from None
    if not download and not tf.io.gfile.exists(
            os.path.join(builder.data_dir, "dataset_info.json")):
        raise DataError(
            f"tfds:{name}: not prepared under {builder.data_dir}. On a machine "
            f"with network run `tfds build {dataset_name} --data_dir=DIR` (or "
            f"tfds.builder('{name}', data_dir=DIR).download_and_prepare()), "
            "copy DIR here and pass data_dir=DIR; or pass download=True.")
    if download:
        builder.download_and_prepare()
    features = builder.info.features
    if "image" not in features:
        raise DataError(f"tfds:{name}: has no 'image' feature")
    label_names = ()
    if "label" in features and hasattr(features["label"], "names"):
        label_names = tuple(features["label"].names)
    splits = builder.info.splits
    if splits and split not in splits:
        raise DataError(f"tfds:{name}: no split {split!r}; has {sorted(splits)}")
    num_examples = splits[split].num_examples if splits else None
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    if label_names:
        dataset = dataset.map(lambda e: (e["image"], tf.cast(e["label"], tf.int32)))
    else:
        dataset = dataset.map(lambda e: (e["image"], tf.constant(-1, tf.int32)))
    if num_examples is None:  # metadata without split sizes: count once
        num_examples = int(dataset.reduce(0, lambda count, _: count + 1))
    return Source(spec=f"tfds:{name}", split=split, num_examples=num_examples,
                  class_names=label_names, dataset=dataset)
