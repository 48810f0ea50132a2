"""Data sources and tf.data pipelines.

One entry point, `load(spec, split)`, turns a dataset spec into a `Source`;
`pipeline(source, batch_size, ...)` turns a source into batches of uint8
images (and labels) for `model.fit` -- augmentation runs inside the model.

Specs:
    embedded                 ~10k/2k class-balanced Fashion-MNIST shipped in
                             the package (the default; no network, no install)
    fashion_mnist            the full 60k/10k set, found offline
    tfds:<name>[:<config>]   any TFDS image classification dataset
    folder:<path>            your own images: one subfolder per class, or a
                             flat folder of unlabelled images
Arrays: `from_arrays(images, labels)`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import logging
import os
import struct
from typing import Sequence

import numpy as np
import tensorflow as tf

from contrastive_tf.files import write_json

_HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_PATH = os.path.join(_HERE, "datasets", "fashion_mnist_embedded.npz")
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

log = logging.getLogger(__name__)
# ITU-R 601 luma weights, as tf.image.rgb_to_grayscale uses (augment.grayscale too).
LUMA = (0.2989, 0.5870, 0.1140)


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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labelled(self) -> bool:
        return self.labels is not None or (self.dataset is not None
                                           and self.num_classes > 0)

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        if self.images is not None:
            return tuple(self.images.shape[1:])
        spec = self.dataset.element_spec[0]
        return tuple(spec.shape)

    def subset(self, indices: Sequence[int]) -> "Source":
        """The in-memory examples at `indices`."""
        if self.images is None:
            raise DataError(f"{self.spec}: subsets need an in-memory source")
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self, images=self.images[indices],
            labels=None if self.labels is None else self.labels[indices],
            paths=tuple(self.paths[i] for i in indices) if self.paths else (),
            num_examples=len(indices))


# -- sources -----------------------------------------------------------------

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


def _decode_file(path: str, size: int, channels: int) -> tuple[np.ndarray, tuple]:
    """The image at `size` x `size` x `channels`, and its own
    (width, height, channels) as stored."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        if image.width == 0 or image.height == 0:
            raise OSError("zero-size image")
        stored = (image.width, image.height, 1 if image.mode in _GRAY_MODES else 3)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            wide = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or wide.max() > 255 else 255.0
            image = Image.fromarray(np.clip(wide / top * 255 + 0.5, 0, 255)
                                    .astype(np.uint8), "L")
        if image.mode in ("RGBA", "LA", "P", "PA"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("L" if channels == 1 else "RGB")
        image = ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
    return array.reshape(size, size, channels), stored


def _held_out(files: Sequence[str], root: str, groups: np.ndarray,
              test_fraction: float) -> np.ndarray:
    """Which files form the "test" split: in each class, the
    `round(test_fraction * n)` files whose relative paths hash lowest.

    The split depends on the file names only -- not on any run's seed -- so
    every job and every seed sees the same test images, and adding images
    to a folder moves few of the others between splits.
    """
    keys = np.array([int.from_bytes(hashlib.sha256(
        os.path.relpath(f, root).encode()).digest()[:8], "big") for f in files])
    test = np.zeros(len(files), bool)
    for label in np.unique(groups):
        members = np.flatnonzero(groups == label)
        count = int(round(test_fraction * len(members)))
        test[members[np.argsort(keys[members], kind="stable")[:count]]] = True
    return test


SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val", "validation")}
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def split_folders(path: str) -> dict[str, str]:
    """The split subfolders of a folder laid out as `train/` + `test/` (or
    `val/`): {"train": path/train, "test": path/test}; {} for any other
    folder (class subfolders, or a flat folder of images)."""
    if not os.path.isdir(path):
        return {}
    subdirs = {e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e))
               and not e.startswith(".")}
    known = {name for names in SPLIT_FOLDERS.values() for name in names}
    if "train" not in subdirs or len(subdirs) < 2 or not subdirs <= known:
        return {}
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            if name in subdirs:
                found[split] = os.path.join(path, name)
                break
    return found


def infer_channels(files: Sequence[str]) -> int:
    """1 if every readable image is grayscale (by its mode), else 3."""
    from PIL import Image

    for file in files:
        try:
            with Image.open(file) as image:
                if image.mode not in _GRAY_MODES:
                    return 3
        except Exception:  # unreadable files are reported by the loader
            continue
    return 1


def load_folder(path: str, image_size: int, channels: int = 0,
                split: str = "all", test_fraction: float = 0.0,
                strict: bool = False) -> Source:
    """Your own images: class subfolders (labelled) or a flat folder.

    Every image is decoded once (JPEG/PNG/BMP/GIF; gray, RGB, RGBA, palette,
    16-bit), centre-cropped to a square, resized to `image_size` and kept in
    memory as uint8. Files that cannot be decoded are skipped and named in a
    warning, or raise with `strict=True`.

    Args:
        path: the folder.
        image_size: side of the square images returned.
        channels: 1 or 3; 0 (the default) infers it: 1 when every image is
            grayscale, else 3.
        split: "all", or "train"/"test" for a split by `test_fraction`. A
            folder laid out as `train/` + `test/` (or `val/`) subfolders
            (`split_folders`) uses them instead: "train" and "all" read
            `train/`, "test" reads `test/`, each whole.
        test_fraction: share of each class held out as "test", chosen by a
            hash of each file's path (`_held_out`): the same for every seed.
        strict: raise on any undecodable file instead of skipping it.
    """
    if not os.path.isdir(path):
        raise DataError(f"folder:{path}: no such directory")
    if channels not in (0, 1, 3):
        raise DataError(f"folder:{path}: channels must be 1 or 3 (0: infer), got {channels}")
    if split not in ("all", "train", "test"):
        raise DataError(f"folder:{path}: unknown split {split!r}")
    layout = split_folders(path)
    if layout:
        wanted = "train" if split == "all" else split
        if wanted not in layout:
            raise DataError(f"folder:{path}: has train/ but no test/ or val/ subfolder "
                            f"for split {split!r}")
        source = load_folder(layout[wanted], image_size, channels, "all", strict=strict)
        return dataclasses.replace(source, spec=f"folder:{path}", split=split)
    class_names, files, labels = list_folder(path)
    channels = channels or infer_channels(files)
    images, stored, keep, bad = _decode_all(path, files, image_size, channels, strict)
    kept_labels = None if labels is None else np.asarray(labels, np.int32)[keep]
    kept_files = [files[i] for i in keep]
    if split != "all":
        groups = kept_labels if kept_labels is not None else np.zeros(len(keep), np.int32)
        test = _held_out(kept_files, path, groups, test_fraction)
        chosen = np.flatnonzero(test if split == "test" else ~test)
        if chosen.size == 0:
            raise DataError(f"folder:{path}: split {split!r} with test_fraction="
                            f"{test_fraction} is empty")
        images = images[chosen]
        kept_labels = None if kept_labels is None else kept_labels[chosen]
        kept_files = [kept_files[i] for i in chosen]
    source = from_arrays(images, kept_labels, class_names or None,
                         f"folder:{path}", split)
    return dataclasses.replace(source, skipped=tuple(bad), paths=tuple(kept_files),
                               stored_shapes=stored)


def list_folder(path: str) -> tuple[tuple, list, list | None]:
    """(class names, image files, labels) of a folder: class subfolders
    (sorted names, each with images) or a flat folder (no classes, labels
    None)."""
    subdirs = [e for e in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, e))
               and not e.startswith(".")]

    def images_in(directory):
        return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                      if f.lower().endswith(IMAGE_EXTENSIONS))

    class_names, files, labels = tuple(subdirs), [], []
    for index, name in enumerate(class_names):
        found = images_in(os.path.join(path, name))
        if not found:
            raise DataError(f"folder:{path}: class folder {name!r} has no "
                            f"images ({', '.join(IMAGE_EXTENSIONS)})")
        files += found
        labels += [index] * len(found)
    if not class_names:
        files, labels = images_in(path), None
    if not files:
        raise DataError(f"folder:{path}: no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}) found")
    return class_names, files, labels


def _decode_all(path: str, files: list, image_size: int, channels: int, strict: bool):
    """Decodes `files` on 4 threads; returns (images, the stored shapes seen,
    indices of the decoded files, messages for the others). Undecodable
    files are warned about, or raise with `strict`."""
    def decode(file):
        try:
            return _decode_file(file, image_size, channels), None
        except Exception as error:  # PIL raises many types for bad files
            return None, f"{file} ({type(error).__name__}: {error})"

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(decode, files))
    bad = [problem for _, problem in results if problem]
    if bad and strict:
        raise DataError(f"folder:{path}: {len(bad)} undecodable file(s):\n  "
                        + "\n  ".join(bad))
    if bad:
        log.warning("folder:%s: skipped %d undecodable file(s): %s", path,
                    len(bad), "; ".join(bad))
    keep = [i for i, (image, _) in enumerate(results) if image is not None]
    if not keep:
        raise DataError(f"folder:{path}: none of the {len(files)} files could "
                        "be decoded")
    images = np.stack([results[i][0][0] for i in keep])
    return images, frozenset(results[i][0][1] for i in keep), keep, bad


def load(spec: str, split: str = "train", data_dir: str | None = None,
         image_size: int | None = None, channels: int = 0,
         download: bool = False, strict: bool = False,
         test_fraction: float = 0.2) -> Source:
    """Loads a dataset split from a spec (see the module docstring).

    `image_size` and `channels` (0: inferred) apply to folders, which need a
    common size; other sources keep their images as they are (`conform`
    converts them).
    For folders, splits "train"/"test" hold out `test_fraction` per class,
    the same files whatever the run's seed (`load_folder`).
    """
    if spec == "embedded":
        return load_embedded(split)
    if spec == "fashion_mnist":
        return load_fashion_mnist(split, data_dir)
    if spec.startswith("tfds:"):
        return load_tfds(spec[len("tfds:"):], split, data_dir, download)
    if spec.startswith("folder:"):
        if image_size is None:
            raise DataError(f"{spec}: image_size is needed to load a folder")
        return load_folder(spec[len("folder:"):], image_size, channels,
                           split=split, test_fraction=test_fraction, strict=strict)
    raise DataError(f"unknown dataset spec {spec!r}; use 'embedded', "
                    "'fashion_mnist', 'tfds:<name>[:<config>]' or "
                    "'folder:<path>'")


def whole_split(spec: str, role: str = "train") -> str:
    """The split a job reads when it is given `spec` for `role` ("train":
    the images to learn from, labelled or not; "test"). A folder is used
    whole -- or its `train/` / `test/` subfolder when it is laid out that
    way; a named dataset (embedded, fashion_mnist, tfds:) gives that split."""
    if spec.startswith("folder:") and not split_folders(spec[len("folder:"):]):
        return "all"
    return role


def load_whole(spec: str, role: str = "train", *, data_dir: str | None = None,
               image_size: int | None = None, channels: int = 0,
               strict: bool = False) -> Source:
    """`load(spec, whole_split(spec, role))`: what a job reads for a role."""
    return load(spec, whole_split(spec, role), data_dir, image_size=image_size,
                channels=channels, strict=strict)


def to_memory(source: Source, image_size: int) -> Source:
    """A streaming source read into memory, each image brought to
    `image_size` (`square_resize`). For labelled sets and pools small
    enough to hold in memory."""
    if source.images is not None:
        return source
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


def conform(source: Source, image_size: int, channels: int) -> tuple[Source, str | None]:
    """Images brought to `image_size` x `image_size` x `channels`, as a
    model trained on such images needs them: resized (`square_resize`) and
    converted gray <-> RGB (luma, as `grayscale` weighs it). Returns the
    source and a sentence saying what was converted (None if nothing)."""
    if channels not in (1, 3):
        raise ValueError(f"Expected channels 1 or 3 (the model's). Received: channels={channels}")
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


# -- label fractions -----------------------------------------------------------

def class_balanced_indices(labels, fraction: float | None = None,
                           per_class: int | None = None,
                           seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced subset, the same for the same seed.

    Give `fraction` (e.g. 0.01, 0.1: that share of each class, at least one)
    or `per_class` (a count per class).
    """
    labels = np.asarray(labels)
    if (fraction is None) == (per_class is None):
        raise ValueError("Give exactly one of fraction and per_class. "
                         f"Received: fraction={fraction}, per_class={per_class}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"Expected 0 < fraction <= 1. Received: fraction={fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"Expected per_class >= 1. Received: per_class={per_class}")
    rng = np.random.RandomState(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = (per_class if per_class is not None
                 else max(1, int(round(fraction * len(members)))))
        if count > len(members):
            raise ValueError(f"Class {label} has {len(members)} examples, "
                             f"fewer than per_class={count}")
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen))


def write_indices(path: str, indices, **metadata) -> None:
    """Writes chosen indices (and how they were chosen) as JSON, atomically."""
    body = dict(metadata, count=int(len(indices)),
                indices=[int(i) for i in indices])
    body["sha256"] = hashlib.sha256(
        np.asarray(indices, np.int64).tobytes()).hexdigest()
    write_json(path, body, indent=None)


# -- pipelines -------------------------------------------------------------------

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
