"""The endpoints of an export: encoded images in, predictions or features out.

`Servable` writes an encoder's or classifier's signatures through Keras'
export archive: `serving_default` takes encoded image bytes (decoded and
preprocessed inside the graph; an element that is not an image answers
readable=false instead of failing its batch), `predict_images` float
images, and encoders also `features` / `features_training`. An image's size
is read from its header (`encoded_image_size`) and refused above
`max_image_pixels` before it is decoded.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from contrastive_tf.method import augment


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


def check_pixels(height, width, limit: int):
    return tf.debugging.Assert(
        tf.less_equal(tf.cast(height, tf.int64) * tf.cast(width, tf.int64), limit),
        ["image too large:", height, "x", width, "pixels; this model accepts at most",
         tf.constant(limit, tf.int64), "(height x width)"])


def _feature_model(encoder: keras.Model) -> keras.Model:
    """The encoder with its block-group outputs exposed by name."""
    outputs = {}
    for layer in encoder.layers:
        if layer.name.startswith("stage") and layer.name[5:].isdigit():
            outputs[f"block_group{layer.name[5:]}"] = layer.output
    outputs["embedding"] = encoder.output
    return keras.Model(encoder.inputs, outputs, name=f"{encoder.name}_features")


class Servable:
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
        with tf.control_dependencies([check_pixels(shape[1], shape[2],
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
            with tf.control_dependencies([check_pixels(height, width,
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
