import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from contrastive_tf import data
from contrastive_tf.data import builtin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sha256 of the embedded arrays (images, then int32 labels), as written by
# `python -m experiments.build_embedded_data` from Debian's dataset-fashion-mnist.
EMBEDDED_SHA256 = {
    "train": "d74cb56789cf7bacc69738d133d8268f6e9cf925fb8d5bf86a79bd720bf402b6",
    "test": "c50cf24c93c9fed6dd474d27e598534aa2c22140e602df78e649ef08895a5c58",
}
NEEDS_DEBIAN_SET = pytest.mark.skipif(
    not os.path.isdir(data.DEBIAN_FASHION_MNIST_DIR),
    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")


def _digest(source):
    h = hashlib.sha256()
    h.update(source.images.tobytes())
    h.update(source.labels.astype(np.int32).tobytes())
    return h.hexdigest()


def test_embedded_set_is_balanced_and_shaped():
    train, test = data.load("embedded", "train"), data.load("embedded", "test")
    assert train.images.shape == (10000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (2000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [1000] * 10
    assert np.bincount(test.labels).tolist() == [200] * 10
    assert train.class_names[0] == "t-shirt/top" and train.num_classes == 10
    assert os.path.exists(os.path.join(os.path.dirname(data.EMBEDDED_PATH),
                                       "LICENSE.fashion-mnist"))


def test_embedded_set_checksum():
    digests = {split: _digest(data.load("embedded", split)) for split in ("train", "test")}
    assert digests == EMBEDDED_SHA256


@NEEDS_DEBIAN_SET
def test_embedded_set_rebuilds_byte_for_byte(tmp_path):
    out = tmp_path / "rebuilt.npz"
    subprocess.run([sys.executable, "-m", "experiments.build_embedded_data",
                    f"--output={out}"], cwd=ROOT, check=True, capture_output=True)
    with np.load(out) as rebuilt, np.load(data.EMBEDDED_PATH) as shipped:
        for key in shipped.files:
            np.testing.assert_array_equal(rebuilt[key], shipped[key])


@NEEDS_DEBIAN_SET
def test_embedded_set_is_a_subset_of_the_full_set():
    full = data.load("fashion_mnist", "test")
    assert full.images.shape == (10000, 28, 28, 1)
    embedded = data.load("embedded", "test")
    index = {img.tobytes(): int(label) for img, label in zip(full.images, full.labels)}
    hits = [index.get(img.tobytes()) == int(label)
            for img, label in zip(embedded.images, embedded.labels)]
    assert all(hits)


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (2).to_bytes(4, "big") * 2
    path.write_bytes(header + bytes(7))
    with pytest.raises(data.DataError, match="truncated"):
        data.read_idx(str(path))


def test_fashion_mnist_missing_everywhere_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(data.DataError, match="dataset-fashion-mnist"):
        data.load_fashion_mnist("train", data_dir=str(tmp_path / "empty"))


def _write_images(folder, count, size=(20, 14), mode="RGB", fmt="PNG", seed=0):
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        if mode == "I;16":
            array = rng.randint(0, 65535, size[::-1]).astype(np.uint16)
            image = Image.fromarray(array)  # uint16 -> mode I;16
        else:
            array = rng.randint(0, 255, (*size[::-1], 3)).astype(np.uint8)
            image = Image.fromarray(array, "RGB").convert(mode)
        image.save(os.path.join(folder, f"img{i}.{fmt.lower()}"), fmt)


def test_folder_with_classes_mixed_formats_and_corrupt_files(tmp_path, caplog):
    root = tmp_path / "photos"
    _write_images(root / "cats", 3, mode="RGB", fmt="JPEG")
    _write_images(root / "cats", 2, size=(300, 7), mode="RGBA", fmt="PNG", seed=1)
    _write_images(root / "dogs", 2, mode="L", fmt="BMP", seed=2)
    _write_images(root / "dogs", 2, mode="P", fmt="GIF", seed=3)
    _write_images(root / "owls", 3, mode="I;16", fmt="PNG", seed=4)
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = root / "owls" / "img0.png"
    (root / "owls" / "truncated.png").write_bytes(good.read_bytes()[:60])
    (root / "owls" / "notes.txt").write_text("ignored")
    (root / "cats" / "empty.png").write_bytes(b"")  # zero bytes
    zero_width = bytearray(good.read_bytes())
    zero_width[16:20] = bytes(4)  # IHDR width 0: a zero-size image
    (root / "cats" / "zero_width.png").write_bytes(bytes(zero_width))
    source = data.load(f"folder:{root}", "all", image_size=16, channels=3)
    assert source.class_names == ("cats", "dogs", "owls")
    assert source.images.shape == (12, 16, 16, 3) and source.images.dtype == np.uint8
    assert np.bincount(source.labels).tolist() == [5, 4, 3]
    assert len(source.skipped) == 4
    for name in ("broken.jpg", "empty.png", "zero_width.png", "truncated.png"):
        assert sum(name in s for s in source.skipped) == 1, (name, source.skipped)
    assert "truncated.png" in caplog.text
    # 16-bit PNGs are scaled to 8 bits, not clipped to white.
    owls = source.images[source.labels == 2]
    assert 60 < owls.mean() < 200
    gray = data.load(f"folder:{root}", "all", image_size=8, channels=1)
    assert gray.images.shape == (12, 8, 8, 1)
    with pytest.raises(data.DataError, match="broken.jpg"):
        data.load(f"folder:{root}", "all", image_size=16, strict=True)


def test_flat_folder_is_unlabelled_and_splits_deterministically(tmp_path):
    _write_images(tmp_path / "flat", 10)
    source = data.load(f"folder:{tmp_path / 'flat'}", "all", image_size=8)
    assert source.labels is None and not source.labelled
    train = data.load(f"folder:{tmp_path / 'flat'}", "train", image_size=8, test_fraction=0.3)
    test = data.load(f"folder:{tmp_path / 'flat'}", "test", image_size=8, test_fraction=0.3)
    assert train.num_examples == 7 and test.num_examples == 3
    # The default split of a folder is "train": 80% by default.
    assert data.load(f"folder:{tmp_path / 'flat'}", image_size=8).num_examples == 8
    again = data.load(f"folder:{tmp_path / 'flat'}", "test", image_size=8, test_fraction=0.3)
    np.testing.assert_array_equal(test.images, again.images)
    train_rows = {img.tobytes() for img in train.images}
    assert not any(img.tobytes() in train_rows for img in test.images)


def test_folder_split_is_the_same_for_every_seed(tmp_path):
    # Regression: the held-out split used the run's seed, and through the
    # Python API PipelineConfig.seed and PretrainConfig.seed may differ, so
    # test images could enter pretraining. Now the split depends on file
    # names only: no test image is in any training split, whatever the seeds.
    from contrastive_tf.jobs import pipeline, pipeline_data
    from contrastive_tf.jobs.config import PipelineConfig, PretrainConfig
    for name in ("a", "b"):
        _write_images(tmp_path / "classes" / name, 10, seed=ord(name))
    spec = f"folder:{tmp_path / 'classes'}"
    test = {img.tobytes() for img in data.load(spec, "test", image_size=8).images}
    assert len(test) == 4  # 20% of each class of 10
    for seed in range(4):
        pre = PretrainConfig(model_dir="unused", dataset=spec, image_size=8, channels=3,
                             seed=seed)
        config = PipelineConfig(output_dir="unused", pretrain=pre, seed=seed + 7,
                                fractions=(0.2,), val_fraction=0.2)
        splits = pipeline_data.labelled_splits(config)
        assert {img.tobytes() for img in splits.test.images} == test
        # What the pipeline's pretraining stage reads.
        pretraining, _ = pipeline.pipeline_pretrain_config(config)
        train = data.load(pretraining.dataset, pretraining.splits()[0], image_size=8)
        assert train.num_examples == 16
        assert not test & {img.tobytes() for img in train.images}
        assert not test & {img.tobytes() for img in splits.full.images}


@pytest.mark.parametrize("setup, message", [
    (lambda p: os.makedirs(p), "no images"),
    (lambda p: (os.makedirs(p / "a"), _write_images(p / "b", 1)), "'a' has no images"),
])
def test_bad_folders_fail_clearly(tmp_path, setup, message):
    root = tmp_path / "bad"
    setup(root)
    with pytest.raises(data.DataError, match=message):
        data.load(f"folder:{root}", image_size=8)


def test_folder_of_only_corrupt_files(tmp_path):
    os.makedirs(tmp_path / "c")
    (tmp_path / "c" / "x.png").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="none of the 1 files"):
        data.load(f"folder:{tmp_path / 'c'}", image_size=8)


def test_unknown_specs_and_names_fail_fast():
    with pytest.raises(data.DataError, match="unknown dataset spec"):
        data.load("cifar-ten")
    started = time.time()
    with pytest.raises(data.DataError, match="no TFDS dataset"):
        data.load("tfds:not_a_dataset_xyz")
    assert time.time() - started < 30


def test_unprepared_tfds_dataset_fails_fast_with_instructions(tmp_path):
    started = time.time()
    with pytest.raises(data.DataError, match="tfds build cifar10"):
        data.load("tfds:cifar10", data_dir=str(tmp_path))
    assert time.time() - started < 30  # no network attempt


def test_tfds_dataset_through_mock_data():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=12):
        source = data.load_tfds("cifar10", "train", download=True)
        assert source.num_classes == 10
        batches = list(data.pipeline(source, 4, training=True, image_size=16))
    assert len(batches) == 3
    images, labels = batches[0]
    assert images.shape == (4, 16, 16, 3) and images.dtype == tf.uint8
    assert labels.dtype == tf.int32


def test_arrays_validate_labels_and_values():
    with pytest.raises(data.DataError, match=r"zero-size images.*\(4, 0, 8, 3\)"):
        data.from_arrays(np.zeros((4, 0, 8, 3), np.uint8))
    images = np.zeros((4, 8, 8), np.uint8)
    source = data.from_arrays(images, [0, 1, 2, 1])
    assert source.images.shape == (4, 8, 8, 1) and source.num_classes == 3
    with pytest.raises(data.DataError, match="out of range"):
        data.from_arrays(images, [0, 1, 5, 1], class_names=["a", "b"])
    with pytest.raises(data.DataError, match="out of range"):
        data.from_arrays(images, [0, -1, 0, 0])
    with pytest.raises(data.DataError, match=r"\[0, 1\]"):
        data.from_arrays(np.full((2, 4, 4, 3), 2.0), None)
    with pytest.raises(data.DataError, match="expected 4 labels"):
        data.from_arrays(images, [0, 1])


def test_pipeline_batches_uint8_and_rejects_tiny_datasets():
    source = data.from_arrays(np.zeros((10, 8, 8, 3), np.uint8), np.arange(10) % 2)
    batches = list(data.pipeline(source, 4, training=True))
    assert len(batches) == 2  # drop_remainder for training
    assert batches[0][0].dtype == tf.uint8
    assert len(list(data.pipeline(source, 4, training=False))) == 3
    images_only = next(iter(data.pipeline(source, 4, training=True, with_labels=False)))
    assert images_only.shape == (4, 8, 8, 3)
    with pytest.raises(data.DataError, match="fewer than one batch"):
        data.pipeline(source, 16, training=True)


def test_training_stream_resumes_at_the_same_batch():
    images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1)
    source = data.from_arrays(images)
    full = [b.numpy().ravel().tolist() for b in
            data.training_stream(source, 4, seed=3).take(12)]
    resumed = [b.numpy().ravel().tolist() for b in
               data.training_stream(source, 4, seed=3, start_step=7).take(5)]
    assert resumed == full[7:12]
    # each epoch (5 steps) is a permutation of all 20 images
    assert sorted(sum(full[:5], [])) == list(range(20))
    assert full[:5] != full[5:10]


def test_pipelines_run_without_the_autotuner():
    # With tf.data's autotuner on, `fit` can wait for its thread to wake up
    # before it returns (see data._options): every pipeline turns it off.
    images = np.arange(24, dtype=np.uint8).reshape(24, 1, 1, 1)
    memory = data.from_arrays(images, np.arange(24) % 2)
    streaming = data.Source(spec="stream", split="train", num_examples=24,
                            class_names=("a", "b"),
                            dataset=tf.data.Dataset.from_tensor_slices(
                                (images, np.arange(24, dtype=np.int32) % 2)))
    built = [data.pipeline(memory, 4, training=True), data.pipeline(memory, 4, training=False),
             data.pipeline(streaming, 4, training=False),
             data.training_stream(memory, 4), data.training_stream(streaming, 4),
             tf.data.Dataset.zip(data.training_stream(memory, 4),
                                 data.training_stream(memory, 4, with_labels=True))]
    for dataset in built:
        assert dataset.options().autotune.enabled is False
        first = tf.nest.flatten(next(iter(dataset)))
        assert [int(t.shape[0]) for t in first] == [4] * len(first)


@pytest.mark.parametrize("fraction, per_class", [(0.01, None), (0.1, None), (None, 7)])
def test_label_fractions_are_balanced_and_deterministic(fraction, per_class, tmp_path):
    labels = np.repeat(np.arange(10), 300)
    chosen = data.class_balanced_indices(labels, fraction, per_class, seed=1)
    expected = per_class or int(round(fraction * 300))
    assert np.bincount(labels[chosen]).tolist() == [expected] * 10
    np.testing.assert_array_equal(
        chosen, data.class_balanced_indices(labels, fraction, per_class, seed=1))
    assert not np.array_equal(
        chosen, data.class_balanced_indices(labels, fraction, per_class, seed=2))
    path = tmp_path / "subset.json"
    data.write_indices(str(path), chosen, fraction=fraction, seed=1)
    assert json.loads(path.read_text())["indices"] == chosen.tolist()


def test_label_fraction_errors():
    with pytest.raises(ValueError, match="exactly one"):
        data.class_balanced_indices([0, 1], 0.5, 1)
    with pytest.raises(ValueError, match="fewer than per_class"):
        data.class_balanced_indices([0, 0, 1], per_class=2)


def test_images_beside_class_subfolders_are_refused_by_name(tmp_path):
    # Five photos and a thumbnails/ folder were read as one class of one
    # image; now the mix is refused, naming both.
    _write_images(tmp_path / "photos", 5)
    _write_images(tmp_path / "photos" / "thumbnails", 1)
    with pytest.raises(data.DataError, match=r"5 image\(s\) at its top \(img0.png, img1.png, "
                                             r"img2.png and 2 more\) beside the subfolder\(s\) "
                                             r"thumbnails/"):
        data.load(f"folder:{tmp_path / 'photos'}", "all", image_size=8)


def test_webp_and_tiff_decode_and_other_files_are_named(tmp_path, caplog):
    for fmt in ("WEBP", "TIFF"):
        _write_images(tmp_path, 1, fmt=fmt, seed=len(fmt))
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level("INFO", logger="contrastive_tf.data"):
        source = data.load(f"folder:{tmp_path}", "all", image_size=8)
    assert source.num_examples == 2 and not source.skipped
    assert sorted(os.path.basename(p) for p in source.paths) == ["img0.tiff", "img0.webp"]
    assert "left out 1 file(s) that are not images by their name (notes.txt)" in caplog.text


@pytest.mark.parametrize("orientation, bright", [(1, "top"), (6, "right"), (8, "left"),
                                                 (3, "bottom")])
def test_exif_orientation_is_applied(tmp_path, orientation, bright):
    # A 16x16 JPEG stored with its top half white; the EXIF orientation tag
    # says how a viewer turns it upright (6: 90 degrees clockwise, 8: 90
    # counter-clockwise, 3: 180), and the loader must turn it the same way.
    array = np.zeros((16, 16), np.uint8)
    array[:8] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array, "L").save(tmp_path / "photo.jpg", "JPEG", exif=exif.tobytes(),
                                     quality=95)
    image = data.load(f"folder:{tmp_path}", "all", image_size=16).images[0, ..., 0]
    halves = {"top": image[:8].mean() - image[8:].mean(),
              "bottom": image[8:].mean() - image[:8].mean(),
              "left": image[:, :8].mean() - image[:, 8:].mean(),
              "right": image[:, 8:].mean() - image[:, :8].mean()}
    assert halves[bright] > 200, halves


def _banded(shape, centre, bands):
    """Images of `shape` (h, w): the central square `centre` colours, the
    rest `bands` colours (one row of each per image)."""
    height, width = shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    images = np.empty((len(centre), height, width, 3), np.uint8)
    images[:] = np.asarray(bands, np.uint8)[:, None, None]
    images[:, top:top + side, left:left + side] = np.asarray(centre, np.uint8)[:, None, None]
    return images


def test_tall_images_keep_their_central_square_and_black_stays_black():
    # Taller than wide: the square is cut from the middle of the height.
    # Luma 0 must stay 0 and 255 stay 255 (no clipping range shifted).
    centre = [[0, 0, 0], [255, 255, 255], [255, 0, 0]]
    bands = [[255, 255, 255], [0, 0, 0], [0, 255, 0]]
    tall = data.from_arrays(_banded((33, 18), centre, bands), [0, 1, 0])
    gray, note = data.conform(tall, 6, 1)
    assert note == ("arrays (train): converted 3 images from 33x18x3 to 6x6x1, as the "
                    "model was trained")
    luma = np.round(np.asarray(centre, np.float64) @ [0.299, 0.587, 0.114])
    np.testing.assert_array_equal(gray.images[..., 0], np.broadcast_to(
        luma[:, None, None], (3, 6, 6)))
    assert luma.tolist() == [0, 255, 76]


def test_sharp_edges_resize_within_the_uint8_range():
    # Bicubic overshoots at a 0 | 255 edge; the result is clipped, never
    # wrapped around (255.6 must not become 0).
    image = np.zeros((40, 40, 1), np.uint8)
    image[:, 20:] = 255
    resized = data.square_resize(image, 17).numpy()[..., 0].astype(int)
    assert resized[:, 9:].min() >= 250 and resized[:, :8].max() <= 5


def test_streaming_sources_are_read_into_memory_at_the_model_size():
    # A streaming source (as TFDS gives) of images of two sizes: each
    # image's central square, resized; labels and class names kept, in order.
    images = [_banded((20, 30), [[10, 20, 30]], [[200, 0, 0]])[0],
              _banded((30, 20), [[90, 80, 70]], [[0, 0, 200]])[0]]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(zip(images, [1, 0])), output_signature=(
            tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int32)))
    source = data.Source(spec="tfds:x", split="train", num_examples=2,
                         class_names=("a", "b"), dataset=dataset)
    converted, note = data.conform(source, 5, 3)
    assert converted.images.shape == (2, 5, 5, 3) and converted.dataset is None
    np.testing.assert_array_equal(converted.images[0], np.full((5, 5, 3), [10, 20, 30]))
    np.testing.assert_array_equal(converted.images[1], np.full((5, 5, 3), [90, 80, 70]))
    assert converted.labels.tolist() == [1, 0] and converted.class_names == ("a", "b")
    assert note is None
    first = data.head(source, 1, 5)
    assert first.num_examples == 1 and first.labels.tolist() == [1]


def test_a_folder_says_what_reading_it_changed(tmp_path):
    os.makedirs(tmp_path / "a")
    Image.fromarray(np.zeros((12, 20, 3), np.uint8), "RGB").save(tmp_path / "a" / "wide.png")
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(tmp_path / "a" / "small.png")
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(tmp_path / "a" / "same.png")
    source = data.load(f"folder:{tmp_path}", "all", image_size=8, channels=1)
    _, note = data.conform(source, 8, 1)
    assert note == (f"folder:{tmp_path}: converted 3 images as the model was trained "
                    "(sizes 20x12 -> 8x8 (central square); RGB -> grayscale)")
    os.remove(tmp_path / "a" / "wide.png")
    as_stored = data.load(f"folder:{tmp_path}", "all", image_size=8, channels=1)
    assert data.conform(as_stored, 8, 1)[1] is None  # nothing to say


def test_photo_folder_generator_writes_mixed_photos_reproducibly(tmp_path):
    def run(folder, count):
        result = subprocess.run(
            [sys.executable, "-m", "experiments.make_photo_folder", f"--output={folder}",
             f"--count={count}", "--side=80", "--seed=3"], cwd=ROOT, capture_output=True,
            text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    run(tmp_path / "a", 3)
    assert "4 photos (1 written now, 3 were there)" in run(tmp_path / "a", 4)  # completes a folder
    run(tmp_path / "b", 4)
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == [f"photo_{i:07d}.jpg" for i in range(4)] == sorted(os.listdir(tmp_path / "b"))
    for name in files:  # the same seed writes the same photos
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    sizes = [Image.open(tmp_path / "a" / name).size for name in files]
    assert all(64 <= max(s) <= 96 for s in sizes) and len(set(sizes)) > 1
    source = data.load(f"folder:{tmp_path / 'a'}", "all", image_size=16)
    assert source.num_examples == 4 and source.images.shape == (4, 16, 16, 3)


@NEEDS_DEBIAN_SET
def test_example_folders_from_the_full_set_leave_out_the_embedded_images(tmp_path):
    # --source=fashion_mnist: images no recipe was tuned on. Its PNG files
    # (lossless; every other file is a JPEG) hold none of the embedded images.
    out = tmp_path / "fresh"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.make_example_folders", f"--output={out}",
         "--source=fashion_mnist", "--unlabelled=400", "--labels_per_class=4",
         "--test_per_class=20"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-2000:]
    embedded = {image.tobytes() for split in ("train", "test")
                for image in data.load_embedded(split).images[..., 0]}
    pngs = list(out.rglob("*.png"))
    assert len(pngs) >= 200
    written = [np.asarray(Image.open(path)).tobytes() for path in pngs]
    assert not embedded & set(written)
    # the full set has them (the check can find one): the embedded subset is in it
    full = data.load_fashion_mnist("train")
    assert embedded & {image.tobytes() for image in full.images[:2000, ..., 0]}
    assert len(list((out / "labelled").rglob("*.*"))) == 40
    assert len(list((out / "test").rglob("*.*"))) == 200
