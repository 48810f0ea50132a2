"""Your own images: a folder of class subfolders (labelled), a flat folder
(unlabelled), or one laid out as train/ + test/; decoded with Pillow,
centre-cropped to a square and resized, held in memory as uint8."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from contrastive_tf.data import decode
from contrastive_tf.runtime import progress
from contrastive_tf.data.source import DataError, Source, from_arrays


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

log = progress.logger("data")


def _decode_file(path: str, size: int, channels: int) -> tuple[np.ndarray, tuple]:
    """The image at `size` x `size` x `channels` (its central square), and
    its own (width, height, channels) as stored."""
    return decode.square_image(path, size, channels)


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


def split_folders(path: str) -> dict[str, str]:
    """The split subfolders of a folder laid out as `train/` + `test/` (or
    `val/`): {"train": path/train, "test": path/test}; {} for any other
    folder (class subfolders, or a flat folder of images)."""
    if not is_dir(path):
        return {}
    subdirs = set(_entries(path)[0])
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
    for file in files:
        try:
            with decode.open_image(file) as image:
                if image.mode not in decode.GRAY_MODES:
                    return 3
        except Exception:  # unreadable files are reported by the loader
            continue
    return 1


def load_folder(path: str, image_size: int, channels: int = 0,
                split: str = "all", test_fraction: float = 0.0,
                strict: bool = False, stream: bool = False) -> Source:
    """Your own images: class subfolders (labelled) or a flat folder.

    Every image is decoded once (JPEG/PNG/BMP/GIF/WebP/TIFF, upright by
    its EXIF orientation; gray, RGB, RGBA, palette,
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
        stream: list the files only (a source `data.stream` reads file by
            file, for folders of any size): nothing is decoded here, and
            `channels` 0 is inferred from up to `CHANNEL_SAMPLE` files
            spread over the folder.
    """
    if not is_dir(path):
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
        source = load_folder(layout[wanted], image_size, channels, "all", strict=strict,
                             stream=stream)
        return dataclasses.replace(source, spec=f"folder:{path}", split=split)
    class_names, files, labels = list_folder(path)
    if stream:
        return _file_source(path, image_size, channels, split, test_fraction,
                            class_names, files, labels)
    channels = channels or infer_channels(files)
    images, stored, keep, bad = _decode_all(path, files, image_size, channels, strict)
    kept_labels = None if labels is None else np.asarray(labels, np.int32)[keep]
    kept_files = [files[i] for i in keep]
    if split != "all":
        chosen = _split_rows(path, kept_files, kept_labels, split, test_fraction)
        images = images[chosen]
        kept_labels = None if kept_labels is None else kept_labels[chosen]
        kept_files = [kept_files[i] for i in chosen]
    source = from_arrays(images, kept_labels, class_names or None,
                         f"folder:{path}", split)
    return dataclasses.replace(source, skipped=tuple(bad), paths=tuple(kept_files),
                               stored_shapes=stored)


def _split_rows(path, files, labels, split, test_fraction) -> np.ndarray:
    """The rows of `files` in `split` ("train"/"test", `_held_out`)."""
    groups = labels if labels is not None else np.zeros(len(files), np.int32)
    test = _held_out(files, path, groups, test_fraction)
    chosen = np.flatnonzero(test if split == "test" else ~test)
    if chosen.size == 0:
        raise DataError(f"folder:{path}: split {split!r} with test_fraction="
                        f"{test_fraction} is empty")
    return chosen


# A streaming folder infers its channels from this many files, spread over it.
CHANNEL_SAMPLE = 200


def _file_source(path, image_size, channels, split, test_fraction, class_names, files,
                 labels) -> Source:
    """A folder as a list of files (`Source.streams_files`)."""
    if not channels:
        picks = np.unique(np.linspace(0, len(files) - 1, min(len(files), CHANNEL_SAMPLE))
                          .astype(int))
        channels = infer_channels([files[i] for i in picks])
    labels = None if labels is None else np.asarray(labels, np.int32)
    if split != "all":
        chosen = _split_rows(path, files, labels, split, test_fraction)
        files = [files[i] for i in chosen]
        labels = None if labels is None else labels[chosen]
    return Source(spec=f"folder:{path}", split=split, num_examples=len(files),
                  class_names=tuple(class_names), labels=labels, paths=tuple(files),
                  channels=channels, image_size=image_size)


def list_folder(path: str) -> tuple[tuple, list, list | None]:
    """(class names, image files, labels) of a folder: class subfolders
    (sorted names, each with images) or a flat folder (no classes, labels
    None)."""
    subdirs = _entries(path)[0]
    ignored = []

    def images_in(directory):
        names = _entries(directory)[1]
        ignored.extend(os.path.join(directory, f) for f in names
                       if not f.lower().endswith(IMAGE_EXTENSIONS))
        return [os.path.join(directory, f) for f in names
                if f.lower().endswith(IMAGE_EXTENSIONS)]

    top = images_in(path)
    if subdirs and top:
        raise DataError(
            f"folder:{path}: has {len(top)} image(s) at its top ({_few(top)}) beside the "
            f"subfolder(s) {', '.join(s + '/' for s in subdirs[:5])}: give a folder of class "
            "subfolders only (images inside them), or a flat folder of images only")
    class_names, files, labels = tuple(subdirs), [], []
    for index, name in enumerate(class_names):
        found = images_in(os.path.join(path, name))
        if not found:
            raise DataError(f"folder:{path}: class folder {name!r} has no "
                            f"images ({', '.join(IMAGE_EXTENSIONS)})")
        files += found
        labels += [index] * len(found)
    if not class_names:
        files, labels = top, None
    if not files:
        raise DataError(f"folder:{path}: no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}) found")
    if ignored:
        log.info(f"folder:{path}: left out {len(ignored)} file(s) that are not images by "
                 f"their name ({_few(ignored)}); images end in {', '.join(IMAGE_EXTENSIONS)}")
    return class_names, files, labels


def is_dir(path: str) -> bool:
    return tf.io.gfile.isdir(path) if "://" in path else os.path.isdir(path)


def _entries(path: str) -> tuple[list[str], list[str]]:
    """(subfolder names, file names) in `path`, sorted, hidden ones left
    out; local folders through os.scandir (one call for 200,000 files),
    others through tf.io.gfile (buckets, ram://)."""
    folders, files = [], []
    if "://" in path:
        for name in tf.io.gfile.listdir(path):
            name = name.rstrip("/")
            if not name.startswith("."):
                (folders if tf.io.gfile.isdir(os.path.join(path, name)) else files).append(name)
    else:
        with os.scandir(path) as entries:
            for entry in entries:
                if not entry.name.startswith("."):
                    (folders if entry.is_dir() else files if entry.is_file() else []).append(
                        entry.name)
    return sorted(folders), sorted(files)


def _few(paths: list, count: int = 3) -> str:
    names = [os.path.basename(p) for p in paths[:count]]
    return ", ".join(names) + (f" and {len(paths) - count} more" if len(paths) > count else "")


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
        log.warning(f"folder:{path}: skipped {len(bad)} undecodable file(s): "
                    f"{'; '.join(bad)}")
    keep = [i for i, (image, _) in enumerate(results) if image is not None]
    if not keep:
        raise DataError(f"folder:{path}: none of the {len(files)} files could "
                        "be decoded")
    images = np.stack([results[i][0][0] for i in keep])
    return images, frozenset(results[i][0][1] for i in keep), keep, bad
