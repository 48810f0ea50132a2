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

from contrastive_tf import augment


class ExportError(RuntimeError):
    """An export that cannot be written as asked."""


# 64 megapixels: every phone and most camera photos; decoded and converted
# to float32 that is at most 0.8 GB (RGB) for one image.
DEFAULT_MAX_IMAGE_PIXELS = 1 << 26


def _unsigned(data, offset: int, length: int, big_endian: bool = False):
    digits = tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, length),
                                      tf.uint8), tf.int64)
    # Reversed in Python, not with a negative-stride slice: Grappler's
    # layout pass logged "layout failed: INVALID_ARGUMENT ... stride is
    # negative" for that slice on every call of an export.
    powers = [256 ** i for i in range(length)]
    return tf.reduce_sum(digits * tf.constant(powers[::-1] if big_endian else powers,
                                              tf.int64))


def encoded_image_size(data):
    """(height, width) from the header of PNG, JPEG, GIF, BMP or WebP bytes,
    without decoding the pixels; (0, 0) for anything else (the decoder then
    refuses it). A TF function of a scalar string, usable inside a graph."""
    data = tf.strings.join([data, tf.constant(b"\0" * 32)])  # short input: no range errors
    head = tf.strings.substr(data, 0, 4)
    webp = tf.logical_and(tf.equal(head, b"RIFF"),
                          tf.equal(tf.strings.substr(data, 8, 4), b"WEBP"))
    chunk = tf.strings.substr(data, 12, 4)
    lossless = _unsigned(data, 21, 4)
    bmp_height = _unsigned(data, 22, 4)
    bmp_height = tf.where(bmp_height >= 1 << 31, (1 << 32) - bmp_height, bmp_height)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 2), b"\xff\xd8")
    jpeg = tf.cond(is_jpeg, lambda: tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64),
                   lambda: tf.zeros([2], tf.int64))
    candidates = [  # (condition, height, width), the first match wins
        # A PNG's size is only read from a real IHDR chunk: a PNG signature
        # followed by garbage goes to the decoder, which refuses it.
        (tf.logical_and(tf.equal(tf.strings.substr(data, 0, 8), b"\x89PNG\r\n\x1a\n"),
                        tf.equal(tf.strings.substr(data, 12, 4), b"IHDR")),
         _unsigned(data, 20, 4, True), _unsigned(data, 16, 4, True)),
        (is_jpeg, jpeg[0], jpeg[1]),
        (tf.equal(head, b"GIF8"), _unsigned(data, 8, 2), _unsigned(data, 6, 2)),
        (tf.equal(tf.strings.substr(data, 0, 2), b"BM"), bmp_height, _unsigned(data, 18, 4)),
        (tf.logical_and(webp, tf.equal(chunk, b"VP8X")),
         _unsigned(data, 27, 3) + 1, _unsigned(data, 24, 3) + 1),
        (tf.logical_and(webp, tf.equal(chunk, b"VP8L")),
         (lossless // (1 << 14)) % (1 << 14) + 1, lossless % (1 << 14) + 1),
        (tf.logical_and(webp, tf.equal(chunk, b"VP8 ")),
         _unsigned(data, 28, 2) % (1 << 14), _unsigned(data, 26, 2) % (1 << 14)),
    ]
    height = width = tf.constant(0, tf.int64)
    for condition, h, w in reversed(candidates):
        height, width = tf.where(condition, h, height), tf.where(condition, w, width)
    return height, width


def _check_pixels(height, width, limit: int):
    return tf.debugging.Assert(
        tf.less_equal(tf.cast(height, tf.int64) * tf.cast(width, tf.int64), limit),
        ["image too large:", height, "x", width, "pixels; this model accepts at most",
         tf.constant(limit, tf.int64), "(height x width)"])


def versions(base: str) -> list[int]:
    """Integer versions present under `<export_root>/<model_name>`."""
    if not os.path.isdir(base):
        return []
    return sorted(int(name) for name in os.listdir(base)
                  if name.isdigit() and os.path.isdir(os.path.join(base, name)))


def _feature_model(encoder: keras.Model) -> keras.Model:
    """The encoder with its block-group outputs exposed by name."""
    outputs = {}
    for layer in encoder.layers:
        if layer.name.startswith("stage") and layer.name[5:].isdigit():
            outputs[f"block_group{layer.name[5:]}"] = layer.output
    outputs["embedding"] = encoder.output
    return keras.Model(encoder.inputs, outputs, name=f"{encoder.name}_features")


class _Servable:
    """The endpoints of an export, written through `keras.export.ExportArchive`.

    (A plain `tf.saved_model.save` of Keras 3 layers writes SavedModels whose
    variables the graph-mode loader used by TF Serving and `saved_model_cli
    run` cannot find; Keras' export archive tracks them the way it needs.)
    """

    def __init__(self, encoder, head, classifier, image_size, channels,
                 class_names, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, keras_copy=None):
        self.keras_copy = keras_copy
        self.features_model = _feature_model(encoder) if encoder is not None else None
        self.head = head
        self.classifier = classifier
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.crop_fraction = 1.0 if image_size <= 32 else 0.875
        self.class_names = tf.constant(list(class_names or []), tf.string)
        if int(max_image_pixels) < self.image_size ** 2:
            raise ExportError(f"max_image_pixels={max_image_pixels} is below the model's "
                              f"own input of {self.image_size}x{self.image_size}")
        self.max_image_pixels = int(max_image_pixels)

    def archive(self) -> keras.export.ExportArchive:
        archive = keras.export.ExportArchive()
        for part in (self.features_model, self.head, self.classifier):
            if part is not None:
                archive.track(part)
        float_spec = [tf.TensorSpec([None, None, None, self.channels], tf.float32, "images")]
        archive.add_endpoint("serving_default", self._serve_bytes,
                             [tf.TensorSpec([None], tf.string, "images")])
        archive.add_endpoint("predict_images", self._serve_floats, float_spec)
        if self.features_model is not None:
            archive.add_endpoint("features", lambda images: self._features(images, False),
                                 float_spec)
            archive.add_endpoint("features_training",
                                 lambda images: self._features(images, True), float_spec)
        return archive

    def _preprocess(self, images):
        shape = tf.shape(images)
        with tf.control_dependencies([_check_pixels(shape[1], shape[2],
                                                    self.max_image_pixels)]):
            images = tf.identity(images)
        images = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 1.0)
        return augment.center_crop_and_resize(
            images, (self.image_size, self.image_size), self.crop_fraction)

    def _decode(self, encoded):
        """(images, readable): each element decoded and preprocessed, or a
        blank image with readable False when its bytes are not an image of a
        known format (empty, garbage, a bare signature), so one bad element
        does not fail the others of its batch."""
        shape = [self.image_size, self.image_size, self.channels]

        def decode(data):
            image = tf.io.decode_image(data, channels=self.channels,
                                       expand_animations=False, dtype=tf.uint8)
            return self._preprocess(tf.cast(image, tf.float32)[None] / 255.0)[0]

        def decode_one(data):
            height, width = encoded_image_size(data)
            readable = tf.logical_and(height > 0, width > 0)
            with tf.control_dependencies([_check_pixels(height, width,
                                                        self.max_image_pixels)]):
                data = tf.identity(data)
            image = tf.cond(readable, lambda: decode(data), lambda: tf.zeros(shape))
            return image, readable

        return tf.map_fn(decode_one, encoded, fn_output_signature=(
            tf.TensorSpec(shape, tf.float32), tf.TensorSpec([], tf.bool)))

    def _outputs(self, images):
        if self.classifier is not None:
            logits = tf.cast(self.classifier(images, training=False), tf.float32)
            class_id = tf.argmax(logits, axis=-1, output_type=tf.int32)
            outputs = {"probabilities": tf.nn.softmax(logits), "class_id": class_id}
            if self.class_names.shape[0]:
                outputs["class_name"] = tf.gather(self.class_names, class_id)
            return outputs
        features = self.features_model(images, training=False)
        outputs = {"embedding": tf.cast(features["embedding"], tf.float32)}
        if self.head is not None:
            outputs["projection"] = tf.cast(self.head(features["embedding"],
                                                      training=False), tf.float32)
        return outputs

    def _serve_bytes(self, images):
        images, readable = self._decode(images)
        outputs = self._outputs(images)
        # An unreadable element answers readable=False, class_id -1 and
        # zeros, instead of failing the whole batch.
        for name, value in outputs.items():
            if name == "class_id":
                outputs[name] = tf.where(readable, value, -1)
            elif name == "class_name":
                outputs[name] = tf.where(readable, value, "")
            else:
                outputs[name] = tf.where(readable[:, None], value, tf.zeros_like(value))
        outputs["readable"] = readable
        return outputs

    def _serve_floats(self, images):
        return self._outputs(self._preprocess(images))

    def _features(self, images, training):
        outputs = dict(self.features_model(self._preprocess(images), training=training))
        if self.head is not None:
            hidden = self.head.hidden_outputs(outputs["embedding"], training=training)
            for index, value in enumerate(hidden[1:]):
                outputs[f"projection_layer{index + 1}"] = value
            outputs["finetune_features"] = hidden[self.head.ft_layer]
        return {name: tf.cast(value, tf.float32) for name, value in outputs.items()}


def _library_versions() -> dict:
    import keras_cv
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "keras_cv": keras_cv.__version__,
            "contrastive_tf": __import__("contrastive_tf").__version__}


def _write(servable: _Servable, export_root: str, model_name: str,
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
        with open(os.path.join(staging, "model_card.json"), "w") as f:
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


KERAS_COPY = os.path.join("assets.extra", "model.keras")


def read_card(path: str) -> dict:
    """The model card of an export version directory."""
    card_path = os.path.join(path, "model_card.json")
    if not (os.path.isfile(card_path) and os.path.isfile(os.path.join(path, "saved_model.pb"))):
        raise ExportError(f"{path} is not an export version directory (no saved_model.pb "
                          "and model_card.json; give e.g. exports/<name>/<version>)")
    with open(card_path) as f:
        return json.load(f)


def load_keras_copy(path: str) -> tuple[keras.Model, dict]:
    """The Keras model an export was written from, and its card: for an
    encoder a model `images -> {"h": features, "z": projection}` whose
    layers include the encoder and head by the card's names; for a
    classifier the classifier."""
    card = read_card(path)
    copy_path = os.path.join(path, KERAS_COPY)
    if not os.path.isfile(copy_path):
        raise ExportError(f"{path} has no Keras copy ({KERAS_COPY}): it was exported by an "
                          "older version; export it again with experiments.export")
    return keras.models.load_model(copy_path), card


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
    servable = _Servable(encoder, projection_head, None, size, channels, None,
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
    servable = _Servable(None, None, classifier, size, channels, class_names,
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
        self._track_variable(variable)


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
    with open(os.path.join(path, "model_card.json")) as f:
        card = json.load(f)
    size, channels = card["input"]["image_size"], card["input"]["channels"]
    inputs = keras.Input((size, size, channels), name="images")
    outputs = layer(inputs)
    if output not in outputs:
        raise ExportError(f"{path} has no output {output!r}; it has {sorted(outputs)}")
    return keras.Model(inputs, outputs[output], name="exported_encoder")
