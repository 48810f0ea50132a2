"""Decoding one image file with Pillow, the way every path of the package
sees it: upright by its EXIF orientation, alpha on white, 16-bit scaled,
gray or RGB; and the random resized crops of the streaming path, drawn on
the whole decoded image (SimCLR's crop, with the distribution of
`method.crop.RandomResizedCrop`).

Files are read through `tf.io.gfile`, so any file system TensorFlow reaches
(local, `gs://`, `s3://` with the plugin, `ram://`) works. JPEGs are decoded
at the smallest DCT scale (1/2, 1/4, 1/8) that still gives every crop at
least the output size (Pillow's `draft`), which is where large photos save
most of their decoding.
"""

from __future__ import annotations

import io
import math
import threading

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
# EXIF orientations that swap width and height (rotated by 90 degrees).
_TRANSPOSED = (5, 6, 7, 8)
MAX_CROP_ATTEMPTS = 10


def read_bytes(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def open_image(path: str) -> Image.Image:
    """The file as a lazily decoded Pillow image."""
    return Image.open(io.BytesIO(read_bytes(path)))


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied, from the header."""
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def stored_shape(image: Image.Image) -> tuple[int, int, int]:
    """(width, height, channels) of a file as stored (channels by its mode)."""
    return (*image.size, 1 if image.mode in GRAY_MODES else 3)


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """A decoded, upright image as "L" (channels 1) or "RGB": 16-bit and
    32-bit integer images scaled to 8 bits, transparency on white."""
    if image.width == 0 or image.height == 0:
        raise OSError("zero-size image")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or wide.max() > 255 else 255.0
        image = Image.fromarray(np.clip(wide / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("L" if channels == 1 else "RGB")


def decode(image: Image.Image, channels: int, least_side: int | None = None) -> Image.Image:
    """Decodes a lazily opened image, upright, in "L"/"RGB". With
    `least_side`, a JPEG may be decoded at a reduced DCT scale that keeps its
    shorter side at least `least_side`."""
    if least_side and image.format == "JPEG":
        width, height = image.size
        scale = min(1.0, least_side / min(width, height))
        image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
    image.load()
    # Phones store photos as the sensor reads them, with an EXIF tag saying
    # how to turn them upright: applied, as image viewers do.
    return to_mode(ImageOps.exif_transpose(image), channels)


def square_image(path: str, size: int, channels: int) -> tuple[np.ndarray, tuple]:
    """The evaluation image of a file: its central square resized to `size`
    (bicubic), as `(size, size, channels)` uint8; and its stored
    (width, height, channels)."""
    with open_image(path) as image:
        stored = stored_shape(image)
        image = decode(image, channels)
        image = ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
    return array.reshape(size, size, channels), stored


def whole_image(path: str, channels: int, max_short_side: int) -> np.ndarray:
    """The whole upright image, its shorter side brought down to at most
    `max_short_side` (large enough for every crop the training takes; a
    JPEG is decoded at the DCT scale that allows), as (h, w, channels) uint8."""
    with open_image(path) as image:
        image = decode(image, channels, least_side=max_short_side)
        shorter = min(image.size)
        if shorter > max_short_side:
            scale = max_short_side / shorter
            image = image.resize((max(1, round(image.width * scale)),
                                  max(1, round(image.height * scale))),
                                 Image.Resampling.BICUBIC, reducing_gap=3.0)
        array = np.asarray(image, dtype=np.uint8)
    return array.reshape(array.shape[0], array.shape[1], channels)


def crop_boxes(rng: np.random.Generator, width: int, height: int, count: int,
               crop_area=(0.08, 1.0), aspect_ratio=(3 / 4, 4 / 3),
               flip: bool = True) -> list[tuple[float, float, float, float, bool]]:
    """`count` random resized crop boxes `(left, top, right, bottom, mirror)`
    in pixels of a `width` x `height` image.

    The distribution of `RandomResizedCrop`: area fraction U(`crop_area`),
    log-uniform aspect ratio (width / height) in `aspect_ratio`, redrawn up
    to `MAX_CROP_ATTEMPTS` times until the box fits, else the whole image
    cut to the nearest allowed aspect ratio, centred; placed uniformly;
    mirrored with p = 0.5 when `flip`.
    """
    boxes = []
    low, high = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
    for _ in range(count):
        area = rng.uniform(crop_area[0], crop_area[1], MAX_CROP_ATTEMPTS) * width * height
        ratio = np.exp(rng.uniform(low, high, MAX_CROP_ATTEMPTS))
        box_w, box_h = np.sqrt(area * ratio), np.sqrt(area / ratio)
        fits = np.flatnonzero((box_w <= width) & (box_h <= height))
        u = rng.uniform(size=2)
        mirror = bool(rng.uniform() < 0.5) and flip
        if fits.size:
            w, h = float(box_w[fits[0]]), float(box_h[fits[0]])
            left, top = u[0] * (width - w), u[1] * (height - h)
        else:
            w = min(width, height * aspect_ratio[1])
            h = min(height, width / aspect_ratio[0])
            left, top = (width - w) / 2, (height - h) / 2
        boxes.append((left, top, left + w, top + h, mirror))
    return boxes


def cut_views(image: np.ndarray, boxes, size: int) -> np.ndarray:
    """The crops `boxes` of `image` (h, w, c) resized to `size` and mirrored
    where the box says: (len(boxes), size, size, c). Bilinear, as the
    in-model crop (`RandomResizedCrop`), and antialiased when shrinking
    (Pillow's filter widens with the scale): half the time of bicubic, which
    at 28-64 px decides whether the input keeps up with the model."""
    channels = image.shape[-1]
    picture = Image.fromarray(image[..., 0] if channels == 1 else image)
    views = []
    for left, top, right, bottom, mirror in boxes:
        view = picture.resize((size, size), Image.Resampling.BILINEAR,
                              box=(left, top, right, bottom))
        if mirror:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views.append(np.asarray(view, dtype=np.uint8).reshape(size, size, channels))
    return np.stack(views)


class SkippedFiles:
    """Files a streaming pipeline could not decode: each named once in a
    warning by the pipeline and counted here (thread-safe), so a long run
    goes on and its summary says what it left out."""

    def __init__(self):
        self._lock = threading.Lock()
        self._problems: dict[str, str] = {}

    def add(self, path: str, problem: str) -> bool:
        """Records `path`; True the first time it is seen."""
        with self._lock:
            first = path not in self._problems
            self._problems.setdefault(path, problem)
            return first

    def items(self) -> dict[str, str]:
        with self._lock:
            return dict(self._problems)

    def summary(self, limit: int = 100) -> dict:
        """For a job's summary.json: how many files were skipped and the
        first `limit` of them with the reason ({} when none was)."""
        problems = self.items()
        if not problems:
            return {}
        return {"skipped_files": len(problems),
                "skipped": [f"{path} ({problem})"
                            for path, problem in sorted(problems.items())[:limit]]}

    def __len__(self) -> int:
        with self._lock:
            return len(self._problems)


# Every streaming pipeline of the process reports here; jobs read it for
# their summary.
SKIPPED = SkippedFiles()
