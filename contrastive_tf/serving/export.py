"""SavedModel export in TF Serving's layout, and loading exports back.

An export is `<export_root>/<model_name>/<version>/` holding a SavedModel and
`model_card.json`. Its endpoints:

    serving_default  (tensorflow/serving/predict)  images: string[batch]
                     JPEG/PNG/BMP/GIF bytes, decoded and preprocessed inside
                     the graph (base64 `{"b64": ...}` in TF Serving's REST JSON)
    predict_images   images: float32[batch, height, width, channels] in [0, 1]
    features         images: float32[...] -> named intermediates, BN in
                     inference mode
    features_training  the same with BN in training mode (for fine-tuning)

Encoders return `embedding` (h) and, with a projection head, `projection`
(z); classifiers return `probabilities`, `class_id` and `class_name`.
Versions are written to a temporary, non-integer directory and renamed into
place when complete (an overwrite swaps the two directories atomically), so
TF Serving never sees half a model. Encoded images larger than
`max_image_pixels` (read from the file header, before decoding) are refused
with an error, so one request cannot exhaust the server's memory.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import shutil
import uuid
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from contrastive_tf.runs.artifacts import KERAS_COPY, MODEL_CARD, read_card
from contrastive_tf.runtime import compat
from contrastive_tf.serving.signatures import DEFAULT_MAX_IMAGE_PIXELS, ExportError, Servable
from contrastive_tf.version import __version__


def versions(base: str) -> list[int]:
    """Integer versions present under `<export_root>/<model_name>`."""
    if not os.path.isdir(base):
        return []
    return sorted(int(name) for name in os.listdir(base)
                  if name.isdigit() and os.path.isdir(os.path.join(base, name)))


def _library_versions() -> dict:
    import keras_cv
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "keras_cv": keras_cv.__version__,
            "contrastive_tf": __version__}


def _write(servable: Servable, export_root: str, model_name: str,
           version: int | None, overwrite: bool, card: dict) -> str:
    base = os.path.join(export_root, model_name)
    os.makedirs(base, exist_ok=True)
    _remove_abandoned(base)
    if version is None:
        version = (versions(base) or [0])[-1] + 1
    if int(version) < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    target = os.path.join(base, str(int(version)))
    if os.path.exists(target) and not overwrite:
        raise ExportError(f"{target} exists; set `overwrite` to "
                          "replace it, or leave the version unset for the next one")
    staging = os.path.join(base, f".tmp-{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        servable.archive().write_out(staging, verbose=False)
        if servable.keras_copy is not None:
            # TF Serving ignores assets.extra/; the jobs fine-tune, distil and
            # predict from this Keras copy of the exported weights.
            os.makedirs(os.path.join(staging, "assets.extra"), exist_ok=True)
            servable.keras_copy.save(os.path.join(staging, KERAS_COPY))
        card = dict(card, version=int(version),
                    exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    libraries=_library_versions(),
                    input={"serving_default": "string[batch]: encoded image bytes",
                           "predict_images": f"float32[batch, h, w, {servable.channels}] in [0, 1]",
                           "image_size": servable.image_size,
                           "channels": servable.channels,
                           "max_image_pixels": servable.max_image_pixels})
        with open(os.path.join(staging, MODEL_CARD), "w") as f:
            json.dump(card, f, indent=2, sort_keys=True, default=str)
        _sync_tree(staging)
        if os.path.exists(target):
            # overwrite: swap old and new in one step, then delete the old
            _exchange(staging, target)
        else:
            os.rename(staging, target)
        _fsync(base)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _encoder_and_head(encoder: keras.Model, head) -> keras.Model:
    inputs = keras.Input(encoder.input.shape[1:], name="images")
    features = encoder(inputs)
    outputs = {"h": features}
    if head is not None:
        outputs["z"] = head(features)
    return keras.Model(inputs, outputs, name="encoder_and_head")


def _sync_tree(folder: str) -> None:
    """Flushes every file under `folder` to disk before it is renamed into
    place, so a power cut cannot leave a version of empty files."""
    for directory, _, files in os.walk(folder):
        for name in files:
            _fsync(os.path.join(directory, name))
        _fsync(directory)


def _fsync(path: str) -> None:
    """fsync of a file or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(new: str, old: str) -> None:
    """Atomically swaps two directories (Linux renameat2 RENAME_EXCHANGE), so
    `old`'s path always holds a complete model; elsewhere, or where the file
    system lacks it, two renames with the old one kept aside in between
    (`_remove_abandoned` puts it back if the process dies there)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.renameat2(-100, os.fsencode(new), -100, os.fsencode(old), 2) == 0:
            return  # -100: AT_FDCWD; 2: RENAME_EXCHANGE
    except (OSError, AttributeError):
        pass
    version = os.path.basename(old)
    aside = os.path.join(os.path.dirname(old), f".old-{version}-{os.getpid()}-"
                         f"{uuid.uuid4().hex[:8]}")
    os.rename(old, aside)
    os.rename(new, old)
    os.rename(aside, new)  # removed by the caller with the staging folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, owned by another user
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_abandoned(base: str) -> None:
    """Cleans up after exports killed part-way: a version moved aside by an
    interrupted overwrite goes back into place; staging folders of processes
    no longer running are deleted. Folders of live exports are left alone."""
    for name in sorted(os.listdir(base)):
        parts = name.split("-")
        if not (name.startswith((".tmp-", ".old-")) and len(parts) == 4
                and parts[2].isdigit()):
            continue
        if _alive(int(parts[2])):
            continue
        path, version = os.path.join(base, name), os.path.join(base, parts[1])
        if name.startswith(".old-") and not os.path.exists(version):
            os.rename(path, version)
        else:
            shutil.rmtree(path, ignore_errors=True)


def export_encoder(encoder: keras.Model, export_root: str, model_name: str, *,
                   projection_head: keras.layers.Layer | None = None,
                   version: int | None = None, overwrite: bool = False,
                   card: dict | None = None,
                   max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """Exports an encoder (and optionally its projection head).

    Args:
        encoder: image -> features model, e.g. `SimCLR.encoder`; its input
            size is the serving image size.
        export_root: folder holding one subfolder per model name.
        model_name: the TF Serving model name.
        projection_head: adds `projection` and the head's layers.
        version: integer version. Defaults to the next free one.
        overwrite: replace an existing version.
        card: extra model-card fields (training data, metrics, ...).
        max_image_pixels: largest height x width a request may send; larger
            images are refused from their header, before decoding.

    Returns:
        The version directory written.
    """
    size, channels = int(encoder.input.shape[1]), int(encoder.input.shape[-1])
    servable = Servable(encoder, projection_head, None, size, channels, None,
                        max_image_pixels, _encoder_and_head(encoder, projection_head))
    card = dict(card or {}, kind="encoder", encoder=encoder.name,
                encoder_config=_encoder_summary(encoder),
                projection_head=(projection_head.get_config()
                                 if projection_head is not None else None))
    return _write(servable, export_root, model_name, version, overwrite, card)


def export_classifier(classifier: keras.Model, export_root: str, model_name: str,
                      *, class_names: Sequence[str] | None = None,
                      version: int | None = None, overwrite: bool = False,
                      card: dict | None = None,
                      max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """Exports a classifier (images in [0, 1] -> logits); arguments as
    `export_encoder`'s."""
    size, channels = int(classifier.input.shape[1]), int(classifier.input.shape[-1])
    num_classes = int(classifier.output.shape[-1])
    if class_names is not None and len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names for {num_classes} outputs")
    servable = Servable(None, None, classifier, size, channels, class_names,
                        max_image_pixels, classifier)
    card = dict(card or {}, kind="classifier", classifier=classifier.name,
                num_classes=num_classes, class_names=list(class_names or []))
    return _write(servable, export_root, model_name, version, overwrite, card)


def _encoder_summary(encoder: keras.Model) -> dict:
    return {"input_shape": list(encoder.input.shape[1:]),
            "feature_dim": int(encoder.output.shape[-1]),
            "parameters": int(sum(np.prod(v.shape) for v in encoder.weights))}


class _ExportedFeatures(keras.layers.TFSMLayer):
    """`TFSMLayer` whose weights get names Keras optimisers accept.

    TFSMLayer names each weight after its TF variable ("conv/kernel:0" ->
    "conv_kernel:0"); optimisers such as Adam then fail to name their slots
    (":" is not allowed in a scope). The weights still wrap the SavedModel's
    own variables, so training updates the export's variables.
    """

    def _add_existing_weight(self, weight):
        variable = keras.Variable(
            initializer=weight, trainable=weight.trainable, dtype=weight.dtype,
            shape=weight.shape,
            name=weight.name.split(":")[0].replace("/", "_"))
        compat.track_variable(self, variable)


def load_for_finetuning(path: str, output: str = "finetune_features",
                        trainable: bool = True) -> keras.Model:
    """A Keras model from float images to one output of an encoder export.

    The SavedModel's own variables are the model's weights: fine-tuning
    trains them (BN uses the `features_training` endpoint when training).

    Args:
        path: a version directory of an encoder export.
        output: which output of the features endpoint, e.g. "embedding",
            "finetune_features" (the head layer fine-tuning starts from) or
            "block_group4".
        trainable: whether the loaded variables train.
    """
    layer = _ExportedFeatures(path, call_endpoint="features",
                              call_training_endpoint="features_training",
                              trainable=trainable)
    card = read_card(path)
    size, channels = card["input"]["image_size"], card["input"]["channels"]
    inputs = keras.Input((size, size, channels), name="images")
    outputs = layer(inputs)
    if output not in outputs:
        raise ExportError(f"{path} has no output {output!r}; it has {sorted(outputs)}")
    return keras.Model(inputs, outputs[output], name="exported_encoder")
