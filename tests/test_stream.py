"""Folders as streams of files: crops of the whole image, evaluation images
as the in-memory loader makes them, resumable order, skipped files, the
decoded cache, EXIF, remote file systems (ram://), precision recast."""

import io
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from contrastive_tf import data
from contrastive_tf.data import decode, stream


def _write(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _banded(width=120, height=40):
    """A wide image: red left third, green middle, blue right third."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :width // 3, 0] = 255
    image[:, width // 3:2 * width // 3, 1] = 255
    image[:, 2 * width // 3:, 2] = 255
    return image


@pytest.fixture
def banded_folder(tmp_path):
    for i in range(12):
        _write(str(tmp_path / "flat" / f"img{i:02d}.png"), _banded())
    return str(tmp_path / "flat")


def test_crop_boxes_follow_the_spec_distribution():
    rng = np.random.default_rng(0)
    boxes = decode.crop_boxes(rng, 400, 300, 4000, (0.08, 1.0), (3 / 4, 4 / 3), True)
    left, top, right, bottom, mirror = (np.array(v, float) for v in zip(*boxes))
    width, height = right - left, bottom - top
    assert (left >= 0).all() and (top >= 0).all()
    assert (right <= 400 + 1e-9).all() and (bottom <= 300 + 1e-9).all()
    area = width * height / (400 * 300)
    assert area.min() >= 0.08 - 1e-9 and area.max() <= 1 + 1e-9
    ratio = width / height
    assert ratio.min() >= 3 / 4 - 1e-9 and ratio.max() <= 4 / 3 + 1e-9
    assert abs(mirror.mean() - 0.5) < 0.03
    # Where every draw fits (areas up to 0.3 of a 4:3 image), the area is
    # U(0.08, 0.3), log(aspect) U(log 3/4, log 4/3), placement uniform.
    boxes = decode.crop_boxes(rng, 400, 300, 4000, (0.08, 0.3), (3 / 4, 4 / 3), False)
    left, top, right, bottom, mirror = (np.array(v, float) for v in zip(*boxes))
    area = (right - left) * (bottom - top) / (400 * 300)
    log_ratio = np.log((right - left) / (bottom - top))
    assert abs(area.mean() - 0.19) < 0.005 and abs(area.std() - 0.22 / math.sqrt(12)) < 0.004
    assert abs(log_ratio.mean()) < 0.012
    assert abs(log_ratio.std() - 2 * math.log(4 / 3) / math.sqrt(12)) < 0.006
    assert not mirror.any()
    free = 400 - (right - left)
    assert abs((left / free).mean() - 0.5) < 0.015
    # A crop area range no box fits in falls back to the whole image at an
    # allowed aspect ratio, centred (as RandomResizedCrop does).
    (box,) = decode.crop_boxes(rng, 400, 100, 1, (1.0, 1.0), (3 / 4, 4 / 3), False)
    assert box[:4] == pytest.approx((400 / 2 - 100 * 4 / 3 / 2, 0, 400 / 2 + 100 * 4 / 3 / 2,
                                     100))


def test_cut_views_resizes_and_mirrors_like_numpy():
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    whole = decode.cut_views(image, [(0, 0, 8, 8, False), (0, 0, 8, 8, True)], 8)
    np.testing.assert_array_equal(whole[0], image)
    np.testing.assert_array_equal(whole[1], image[:, ::-1])
    # A 4x4 corner at 4x4 pixels is that corner.
    corner = decode.cut_views(image, [(4, 0, 8, 4, False)], 4)[0]
    np.testing.assert_array_equal(corner, image[0:4, 4:8])


def test_training_crops_cover_the_whole_image_not_its_central_square(banded_folder):
    source = data.load(f"folder:{banded_folder}", "all", image_size=16, stream=True)
    assert source.streams_files and source.num_examples == 12 and source.channels == 3
    batches = stream.view_stream(source, 4, image_size=16, crop_area=(0.08, 1.0), seed=3)
    seen = np.concatenate([np.concatenate([b["view1"], b["view2"]])
                           for b in batches.take(12).as_numpy_iterator()])
    assert seen.shape == (12 * 8, 16, 16, 3) and seen.dtype == np.uint8
    # The central square of a 120x40 image is green only; crops of the
    # whole image reach the red and blue bands.
    red = (seen[..., 0] > 200) & (seen[..., 1] < 50)
    blue = (seen[..., 2] > 200) & (seen[..., 1] < 50)
    assert red.any(axis=(1, 2)).mean() > 0.2 and blue.any(axis=(1, 2)).mean() > 0.2
    square = data.load_folder(banded_folder, 16).images
    assert not ((square[..., 0] > 200) & (square[..., 1] < 50)).any()


def test_stream_order_is_fixed_by_seed_and_resumes_mid_run(banded_folder):
    source = data.load(f"folder:{banded_folder}", "all", image_size=8, stream=True)

    def batches(start_step, count, seed=1):
        ds = stream.view_stream(source, 4, image_size=8, seed=seed, start_step=start_step)
        return [b["view1"] for b in ds.take(count).as_numpy_iterator()]

    run = batches(0, 7)
    np.testing.assert_array_equal(np.stack(batches(0, 7)), np.stack(run))
    # Resumed at step 4 (the second epoch's first step): the same batches.
    np.testing.assert_array_equal(np.stack(batches(4, 3)), np.stack(run[4:]))
    assert not np.array_equal(np.stack(batches(0, 7, seed=2)), np.stack(run))


def test_evaluation_images_are_the_in_memory_loaders(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        for i in range(3):
            _write(str(tmp_path / label / f"{i}.jpg"),
                   rng.integers(0, 255, (30 + 7 * i, 50, 3), dtype=np.uint8), quality=90)
    held = data.load_folder(str(tmp_path), 24)
    source = data.load(f"folder:{tmp_path}", "all", image_size=24, stream=True)
    images, labels = zip(*[(x, y) for x, y in data.pipeline(source, 4, training=False)
                           .unbatch().as_numpy_iterator()])
    np.testing.assert_array_equal(np.stack(images), held.images)
    np.testing.assert_array_equal(np.array(labels), held.labels)
    np.testing.assert_array_equal(data.to_memory(source, 24).images, held.images)


def test_a_corrupt_file_met_mid_epoch_is_skipped_named_and_counted(banded_folder):
    bad = os.path.join(banded_folder, "img05.png")
    with open(bad, "r+b") as f:
        f.truncate(60)
    decode.SKIPPED._problems.clear()
    source = data.load(f"folder:{banded_folder}", "all", image_size=8, stream=True)
    batches = list(stream.view_stream(source, 4, image_size=8).take(6).as_numpy_iterator())
    assert len(batches) == 6 and all(b["view1"].shape == (4, 8, 8, 3) for b in batches)
    summary = data.SKIPPED.summary()
    assert summary["skipped_files"] == 1 and summary["skipped"][0].startswith(bad)
    rows = list(data.pipeline(source, 5, training=False).unbatch().as_numpy_iterator())
    assert len(rows) == 11
    decode.SKIPPED._problems.clear()


def test_exif_orientation_is_applied_on_every_path(tmp_path):
    upright = np.zeros((20, 40, 3), np.uint8)  # landscape, red on the left
    upright[:, :10, 0] = 255
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = str(tmp_path / "phone.jpg")
    _write(path, stored, exif=exif, quality=95)
    whole = decode.whole_image(path, 3, 1000)
    assert whole.shape == (20, 40, 3)
    assert whole[:, :8, 0].mean() > 200 and whole[:, 12:, 0].mean() < 60


def test_folders_on_tensorflow_file_systems_ram(tmp_path):
    root = "ram://photos_test"
    rng = np.random.default_rng(1)
    for i in range(6):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(buffer, "PNG")
        with tf.io.gfile.GFile(f"{root}/img{i}.png", "wb") as f:
            f.write(buffer.getvalue())
    source = data.load(f"folder:{root}", "all", image_size=12, stream=True)
    assert source.num_examples == 6 and source.paths[0] == f"{root}/img0.png"
    batch = next(iter(stream.view_stream(source, 3, image_size=12)))
    assert batch["view2"].shape == (3, 12, 12, 3)
    assert data.to_memory(source, 12).images.shape == (6, 12, 12, 3)


def test_decoded_cache_is_built_once_resumed_and_rebuilt_when_files_change(
        banded_folder, tmp_path):
    cache_root = str(tmp_path / "cache")
    source = data.load(f"folder:{banded_folder}", "all", image_size=8, stream=True)
    side = stream.short_side_for(8, (0.5, 1.0))
    store = stream.ImageStore(source, side, cache_root)
    directory = store.cache.directory
    assert os.path.exists(os.path.join(directory, "complete.json"))
    for i in range(source.num_examples):
        np.testing.assert_array_equal(
            store.get(i), decode.whole_image(source.paths[i], 3, side))
    # A build killed midway keeps its finished chunks: only what is missing
    # is decoded again.
    os.remove(os.path.join(directory, "complete.json"))
    stamp = os.path.getmtime(os.path.join(directory, "chunk_00000.bin"))
    again = stream.ImageStore(source, side, cache_root)
    assert again.cache.directory == directory and again.cache.complete
    assert os.path.getmtime(os.path.join(directory, "chunk_00000.bin")) == stamp
    # A changed file changes the key: a new cache beside the old one.
    _write(source.paths[0], _banded(90, 40))
    changed = stream.ImageStore(source, side, cache_root)
    assert changed.cache.directory != directory
    assert changed.get(0).shape[1] != store.get(0).shape[1]
    meta = json.load(open(os.path.join(changed.cache.directory, "complete.json")))
    assert meta["images"] == 12 and meta["bytes"] > 0


def test_short_side_keeps_the_smallest_crop_at_full_resolution():
    assert stream.short_side_for(64, (0.08, 1.0)) == math.ceil(64 / math.sqrt(0.08))
