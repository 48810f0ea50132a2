"""One entry point from a dataset spec to a `Source` (`load`), what a job
reads for a role (`whole_split`, `load_whole`), and the images a model
needs, converted to its size and channels (`load_images`, `load_labelled`).
Specs are listed in the package docstring (contrastive_tf/data/__init__.py).
"""

from __future__ import annotations

from contrastive_tf.data.convert import conform
from contrastive_tf.data.builtin import load_embedded, load_fashion_mnist, load_tfds
from contrastive_tf.data.folders import load_folder, split_folders
from contrastive_tf.data.source import DataError, Source
from contrastive_tf.runtime import progress

log = progress.logger("data")


def load(spec: str, split: str = "train", data_dir: str | None = None,
         image_size: int | None = None, channels: int = 0,
         download: bool = False, strict: bool = False,
         test_fraction: float = 0.2, stream: bool = False) -> Source:
    """Loads a dataset split from a spec (see the module docstring).

    `image_size` and `channels` (0: inferred) apply to folders, which need a
    common size; other sources keep their images as they are (`conform`
    converts them).
    For folders, splits "train"/"test" hold out `test_fraction` per class,
    the same files whatever the run's seed (`load_folder`). With `stream`, a
    folder is listed, not decoded: a source of files that `data.stream`
    reads as it trains (what every job does, for folders of any size).
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
                           split=split, test_fraction=test_fraction, strict=strict,
                           stream=stream)
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
               strict: bool = False, stream: bool = False) -> Source:
    """`load(spec, whole_split(spec, role))`: what a job reads for a role."""
    return load(spec, whole_split(spec, role), data_dir, image_size=image_size,
                channels=channels, strict=strict, stream=stream)


def load_images(spec: str, role: str, size: int, channels: int,
                data_dir: str | None = None, stream: bool = True) -> Source:
    """The images a job was given for `role`, whole, as a model of `size` x
    `size` x `channels` images needs them (converted, and said so). A
    folder is a stream of files (`stream`, the default) decoded to that
    size and channels as it is read."""
    source = load_whole(spec, role, data_dir=data_dir, image_size=size,
                        channels=channels, stream=stream)
    source, note = conform(source, size, channels)
    if note:
        log.info(note)
    return source


def load_labelled(spec: str, role: str, size: int, channels: int,
                  data_dir: str | None = None, stream: bool = True) -> Source:
    """`load_images`, for a set that must be labelled."""
    source = load_images(spec, role, size, channels, data_dir, stream)
    if not source.labelled:
        raise DataError(f"{spec}: needs labels (a folder with one subfolder per class, "
                        "or a labelled dataset)")
    return source
