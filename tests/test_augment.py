import numpy as np
import pytest
import tensorflow as tf
import keras

from contrastive_tf.method import color
from contrastive_tf.method.crop import RandomResizedCrop
from contrastive_tf.method.augment import SimCLRAugmenter

SIZE = 16
DRAWS = 2000  # images per statistic; binomial sd at p=0.5 is about 0.011


def _coordinate_images(count, size=SIZE):
    """Channel 0 holds the column, channel 1 the row, both in [0, 1]."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    cols, rows = np.meshgrid(ramp, ramp)
    image = np.stack([cols, rows, np.full_like(cols, 0.5)], axis=-1)
    return np.repeat(image[None], count, axis=0)


def _colourful(count, size=SIZE, seed=0):
    return np.random.RandomState(seed).uniform(
        0.1, 0.9, (count, size, size, 3)).astype(np.float32)


def _no_colour(**kwargs):
    return SimCLRAugmenter(SIZE, jitter_probability=0.0,
                           grayscale_probability=0.0, **kwargs)


def test_output_range_shape_and_dtype():
    images = np.random.RandomState(0).randint(0, 256, (8, 24, 24, 3)).astype(np.uint8)
    views = SimCLRAugmenter(SIZE, blur=True, solarize_probability=0.5,
                            color_strength=1.0, seed=1)(images)
    assert views.shape == (8, SIZE, SIZE, 3)
    assert views.dtype == tf.float32
    assert float(tf.reduce_min(views)) >= 0.0
    assert float(tf.reduce_max(views)) <= 1.0


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "float16"])
def test_accepts_channels_and_dtypes(channels, dtype):
    rng = np.random.RandomState(0)
    if dtype.startswith("uint"):
        images = rng.randint(0, np.iinfo(dtype).max, (4, 20, 20, channels)).astype(dtype)
    else:
        images = rng.uniform(0, 1, (4, 20, 20, channels)).astype(dtype)
    augmenter = SimCLRAugmenter(SIZE, blur=True, seed=0)
    for training in (True, False):
        out = augmenter(images, training=training)
        assert out.shape == (4, SIZE, SIZE, channels)
        assert out.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(out)) <= float(tf.reduce_max(out)) <= 1.0


def test_uint8_scaling_is_exact():
    images = np.full((2, SIZE, SIZE, 3), 51, np.uint8)
    out = SimCLRAugmenter(SIZE)(images, training=False)
    np.testing.assert_allclose(out.numpy(), 51 / 255, rtol=1e-6)


def test_two_calls_give_different_views():
    images = _colourful(16)
    augmenter = SimCLRAugmenter(SIZE, seed=3)
    view1, view2 = augmenter(images), augmenter(images)
    per_image = tf.reduce_mean(tf.abs(view1 - view2), axis=[1, 2, 3]).numpy()
    assert np.all(per_image > 1e-3)


def test_inside_tf_function_each_call_draws_new_randomness():
    augmenter = SimCLRAugmenter(SIZE, seed=3)
    step = tf.function(lambda x: augmenter(x))
    images = _colourful(4)
    first, second = step(images), step(images)
    assert float(tf.reduce_max(tf.abs(first - second))) > 1e-3


def _box_shapes(views):
    """Width, height (fractions of the image) of each crop, read from the
    coordinate channels of views of `_coordinate_images`."""
    width = views[:, 0, -1, 0] - views[:, 0, 0, 0]
    height = views[:, -1, 0, 1] - views[:, 0, 0, 1]
    return width, height


def test_crop_areas_within_range():
    # With flip and colour off, the output's coordinate channels reveal the
    # crop box of each image.
    views = _no_colour(flip=False, crop_area=(0.08, 1.0), seed=2)(
        _coordinate_images(DRAWS)).numpy()
    width, height = _box_shapes(views)
    # Pixel centres: a box of fraction w spans (w * SIZE - 1) / (SIZE - 1).
    width, height = (width * (SIZE - 1) + 1) / SIZE, (height * (SIZE - 1) + 1) / SIZE
    area = width * height
    assert area.min() >= 0.08 - 1e-3 and area.max() <= 1.0 + 1e-3
    aspect = width / height
    assert aspect.min() >= 0.75 - 1e-3 and aspect.max() <= 4 / 3 + 1e-3


def _reference_crops(count, rng, area_range=(0.08, 1.0), ratio_range=(3 / 4, 4 / 3),
                     image_aspect=1.0, attempts=10):
    """NumPy rejection sampler: redraw (area, log-uniform aspect) until the
    box fits, as the reference does; returns accepted (area, aspect)."""
    areas, ratios = [], []
    for _ in range(count):
        for _ in range(attempts):
            area = rng.uniform(*area_range)
            ratio = np.exp(rng.uniform(np.log(ratio_range[0]), np.log(ratio_range[1])))
            w, h = np.sqrt(area * ratio / image_aspect), np.sqrt(area / ratio * image_aspect)
            if w <= 1 and h <= 1:
                areas.append(area)
                ratios.append(ratio)
                break
    return np.array(areas), np.array(ratios)


def _ks_distance(a, b):
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.max(np.abs(cdf(a) - cdf(b))))


@pytest.mark.parametrize("height,width", [(32, 32), (24, 48)])
def test_crop_area_and_aspect_follow_the_spec_with_redraws(height, width):
    # Boxes that do not fit are redrawn, not clipped: no crop is full-width or
    # full-height unless its draw fitted, and area / aspect follow the spec's
    # distribution restricted to fitting boxes (NumPy rejection sampler).
    crop = RandomResizedCrop(16, flip=False, seed=3)
    boxes = crop.get_random_transformation_batch(
        4000, images=tf.zeros((1, height, width, 1))).numpy()
    w, h = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    image_aspect = width / height
    area, aspect = w * h, (w * width) / (h * height)
    assert np.all(boxes >= -1e-6) and np.all(boxes <= 1 + 1e-6)
    ref_area, ref_aspect = _reference_crops(4000, np.random.RandomState(0),
                                            image_aspect=image_aspect)
    # KS two-sample critical distance at alpha 0.001 for n = m = 4000: 0.044.
    assert _ks_distance(area, ref_area) < 0.044
    assert _ks_distance(aspect, ref_aspect) < 0.044
    # Clipping made ~14% of boxes span the whole width or height; redrawing
    # leaves only those whose draw fitted at (almost) full size.
    full = np.mean((w > 0.999) | (h > 0.999))
    assert full < 0.01
    assert np.all(aspect >= 0.75 - 1e-4) and np.all(aspect <= 4 / 3 + 1e-4)


def test_crop_falls_back_to_the_centre_when_nothing_fits():
    # A 1:4 image with aspect ratios 3/4-4/3 and area 1: no draw fits, so the
    # box is the centred full-width box of the nearest allowed ratio.
    crop = RandomResizedCrop(8, crop_area=(1.0, 1.0), flip=False, seed=0)
    boxes = crop.get_random_transformation_batch(
        16, images=tf.zeros((1, 40, 10, 1))).numpy()
    expected_height = (10 / 40) / 0.75  # width 1, pixel aspect 3/4
    np.testing.assert_allclose(boxes[:, 1], 0.0, atol=1e-6)
    np.testing.assert_allclose(boxes[:, 3], 1.0, atol=1e-6)
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], expected_height, rtol=1e-5)
    np.testing.assert_allclose(boxes[:, 0], (1 - expected_height) / 2, rtol=1e-5)


def _view_decisions(augmenter, images):
    """The recorded random decisions of one augmenter call, drawn exactly as
    `SimCLRAugmenter.call` draws them (crop layer, then the view's own)."""
    batch = images.shape[0]
    boxes = augmenter._crop.get_random_transformation_batch(batch, images=images).numpy()
    decisions = {k: v.numpy() for k, v in augmenter._draw_decisions(batch, 3).items()}
    y1, x1, y2, x2 = boxes.T
    width, height = np.abs(x2 - x1), y2 - y1
    left = np.minimum(x1, x2)
    recorded = {
        "crop_top": y1 / np.maximum(1 - height, 1e-6),
        "crop_left": left / np.maximum(1 - width, 1e-6),
        "crop_area": width * height,
        "crop_aspect": np.log(width / height),
        "flip": (x1 > x2).astype(float),
        "jitter": decisions["jitter"].astype(float),
        "brightness": decisions["factors"][0],
        "contrast": decisions["factors"][1],
        "saturation": decisions["factors"][2],
        "hue": decisions["hue_shifts"],
        "grayscale": decisions["grayscale"].astype(float),
        "blur": decisions["blur"].astype(float),
        "sigma": decisions["sigma"],
        "solarize": decisions["solarize"].astype(float),
    }
    for op in range(3):  # where each op stands in the random order
        recorded[f"order_of_op{op}"] = np.argmax(decisions["order"] == op, axis=1).astype(float)
    return recorded


def _correlation(a, b):
    """Pearson correlation (the phi coefficient for two on/off decisions)."""
    return float(np.corrcoef(a, b)[0, 1])


# Pairs that are dependent by design: the crop's area and aspect ratio through
# the fit constraint (as in the reference), and positions in one permutation.
_DEPENDENT = {frozenset(("crop_area", "crop_aspect"))} | {
    frozenset((f"order_of_op{a}", f"order_of_op{b}")) for a in range(3) for b in range(3)}


def test_every_random_decision_of_a_view_is_independent():
    # Regression: the crop layer and the augmenter drew from the same seed
    # and counter, so jitter on/off reused the crop's vertical offset,
    # grayscale its horizontal offset and blur sigma its flip number.
    # The correlation of independent samples has sd 1/sqrt(n) = 0.016 here;
    # the coinciding draws gave |r| of 0.4 and more.
    count, limit = 4000, 0.08
    images = tf.zeros((count, SIZE, SIZE, 3))
    augmenter = SimCLRAugmenter(SIZE, blur=True, solarize_probability=0.3,
                                color_strength=1.0, seed=7)
    view1 = _view_decisions(augmenter, images)  # a SimCLR step: two calls
    view2 = _view_decisions(augmenter, images)
    worst = []
    for i, a in enumerate(view1):
        for b in list(view1)[i + 1:]:
            if frozenset((a, b)) not in _DEPENDENT:
                worst.append((abs(_correlation(view1[a], view1[b])), a, b, "same view"))
        for b in view2:
            worst.append((abs(_correlation(view1[a], view2[b])), a, b, "other view"))
    worst.sort(reverse=True)
    assert worst[0][0] < limit, worst[:5]


def test_recorded_decisions_are_the_ones_a_call_uses():
    images = tf.constant(_colourful(64))
    kwargs = dict(blur=True, solarize_probability=0.3, color_strength=1.0, seed=9)
    recorder, augmenter = SimCLRAugmenter(SIZE, **kwargs), SimCLRAugmenter(SIZE, **kwargs)
    boxes = recorder._crop.get_random_transformation_batch(64, images=images)
    decisions = recorder._draw_decisions(64, 3)
    crops = tf.clip_by_value(recorder._crop.augment_images(images, boxes), 0.0, 1.0)
    expected = recorder._apply_decisions(crops, decisions)
    np.testing.assert_allclose(augmenter(images).numpy(), expected.numpy(), atol=1e-6)


def test_replicas_draw_independent_decisions(mirrored):
    with mirrored.scope():
        augmenter = SimCLRAugmenter(SIZE, blur=True, seed=1)
    draw = tf.function(lambda: augmenter._draw_decisions(2000, 3))
    per_replica = mirrored.experimental_local_results(mirrored.run(draw))
    for name in ("jitter", "grayscale", "blur", "sigma", "hue_shifts"):
        first, second = (np.ravel(d[name].numpy()).astype(float) for d in per_replica)
        assert abs(_correlation(first, second)) < 0.1, name
        assert np.mean(first != second) > 0.1, name


def test_full_crop_without_flip_is_identity():
    images = _colourful(4)
    views = _no_colour(flip=False, crop_area=(1.0, 1.0),
                       aspect_ratio=(1.0, 1.0))(images)
    np.testing.assert_allclose(views.numpy(), images, atol=1e-5)


def test_flip_rate_is_one_half():
    images = _coordinate_images(DRAWS)
    views = _no_colour(crop_area=(1.0, 1.0), aspect_ratio=(1.0, 1.0),
                       seed=4)(images).numpy()
    flipped = np.all(np.abs(views - images[:, :, ::-1]) < 1e-5, axis=(1, 2, 3))
    unchanged = np.all(np.abs(views - images) < 1e-5, axis=(1, 2, 3))
    assert np.all(flipped ^ unchanged)
    assert abs(flipped.mean() - 0.5) < 0.05


def test_grayscale_rate_is_one_fifth():
    augmenter = SimCLRAugmenter(SIZE, jitter_probability=0.0, seed=5)
    views = augmenter(_colourful(DRAWS)).numpy()
    gray = np.all(np.ptp(views, axis=-1) < 1e-6, axis=(1, 2))
    assert abs(gray.mean() - 0.2) < 0.04


def test_jitter_rate_is_four_fifths():
    images = _colourful(DRAWS)
    augmenter = SimCLRAugmenter(SIZE, crop_area=(1.0, 1.0),
                                aspect_ratio=(1.0, 1.0), flip=False,
                                grayscale_probability=0.0, color_strength=1.0,
                                seed=6)
    views = augmenter(images).numpy()
    changed = np.max(np.abs(views - images), axis=(1, 2, 3)) > 1e-3
    assert abs(changed.mean() - 0.8) < 0.04


def test_grayscale_images_are_jittered_but_keep_one_channel():
    images = _colourful(DRAWS)[..., :1]
    augmenter = SimCLRAugmenter(SIZE, crop_area=(1.0, 1.0),
                                aspect_ratio=(1.0, 1.0), flip=False,
                                color_strength=1.0, seed=7)
    views = augmenter(images).numpy()
    assert views.shape[-1] == 1
    changed = np.max(np.abs(views - images), axis=(1, 2, 3)) > 1e-3
    assert abs(changed.mean() - 0.8) < 0.04


def test_one_channel_images_pass_grayscale_unchanged_and_floats_are_clipped():
    gray = np.random.RandomState(1).rand(2, 4, 4, 1).astype(np.float32)
    np.testing.assert_array_equal(color.grayscale(tf.constant(gray)).numpy(), gray)
    floats = np.array([[-0.5, 0.25], [1.0, 1.75]], np.float32)
    np.testing.assert_array_equal(color.to_float_images(floats).numpy(),
                                  [[0.0, 0.25], [1.0, 1.0]])
    np.testing.assert_allclose(color.to_float_images(np.array([0, 51, 255], np.uint8)),
                               [0.0, 0.2, 1.0])


def test_grayscale_matches_luma_formula():
    images = _colourful(3)
    expected = images @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    got = color.grayscale(tf.constant(images)).numpy()
    for c in range(3):
        np.testing.assert_allclose(got[..., c], expected, rtol=1e-5)


def test_shift_hue_matches_colorsys():
    import colorsys
    rng = np.random.RandomState(3)
    images = rng.uniform(0, 1, (4, 6, 7, 3)).astype(np.float32)
    images[0, 0, :3] = [[0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]  # no chroma
    images[0, 1, :3] = [[0.9, 0.9, 0.2], [0.3, 0.8, 0.8], [0.7, 0.1, 0.7]]  # tied maxima
    images[0, 2, :2] = [[1.0, 0.0, 0.0], [0.2, 0.1, 0.1]]  # hue 0: wraps both ways
    shifts = np.array([0.1, -0.1, 0.45, -0.5], np.float32)
    got = color.shift_hue(tf.constant(images), tf.constant(shifts)).numpy()
    expected = np.empty_like(images)
    for n, shift in enumerate(shifts):
        for i in range(images.shape[1]):
            for j in range(images.shape[2]):
                h, s, v = colorsys.rgb_to_hsv(*images[n, i, j].astype(np.float64))
                expected[n, i, j] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    np.testing.assert_allclose(got, expected, atol=2e-6)


def _numpy_jitter(image, factors, hue_shift, order):
    """One image's colour jitter by NumPy and colorsys, op by op."""
    import colorsys
    luma = np.array([0.2989, 0.5870, 0.1140])
    x = image.astype(np.float64)
    for op in order:
        if op == 0:
            x = x * factors[0]
        elif op == 1:
            mean = x.mean(axis=(0, 1))
            x = (x - mean) * factors[1] + mean
        elif op == 2:
            gray = (x @ luma)[..., None]
            x = gray + (x - gray) * factors[2]
        else:
            x = np.array([[colorsys.hsv_to_rgb((h + hue_shift) % 1.0, s, v)
                           for h, s, v in (colorsys.rgb_to_hsv(*p) for p in row)]
                          for row in x])
        x = np.clip(x, 0.0, 1.0)
    return x


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_matches_numpy_in_each_images_order(channels):
    rng = np.random.RandomState(4)
    count = 4 if channels == 3 else 2
    images = rng.uniform(0, 1, (24, 5, 6, channels)).astype(np.float32)
    factors = rng.uniform(0.2, 1.8, (3, 24)).astype(np.float32)
    hue_shifts = rng.uniform(-0.2, 0.2, 24).astype(np.float32)
    order = np.stack([rng.permutation(count) for _ in range(24)]).astype(np.int32)
    got = color.color_jitter(tf.constant(images), tf.constant(factors),
                             tf.constant(hue_shifts), tf.constant(order)).numpy()
    for n in range(24):
        np.testing.assert_allclose(
            got[n], _numpy_jitter(images[n], factors[:, n], hue_shifts[n], order[n]),
            atol=2e-5, err_msg=f"image {n}, order {order[n]}")


def _numpy_blur(image, sigma, radius):
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)),
                    mode="reflect")
    h, w, _ = image.shape
    rows = sum(kernel[k] * padded[k:k + h, :, :] for k in range(2 * radius + 1))
    return sum(kernel[k] * rows[:, k:k + w, :] for k in range(2 * radius + 1))


def test_gaussian_blur_matches_numpy_per_image_sigma():
    augmenter = SimCLRAugmenter(40, blur=True)
    assert augmenter.blur_radius == 2  # kernel of 5 taps, ~10% of 40 px
    images = _colourful(3, size=40)
    sigmas = np.array([0.1, 0.8, 2.0], np.float32)
    got = augmenter._gaussian_blur(tf.constant(images), tf.constant(sigmas))
    for image, sigma, out in zip(images, sigmas, got.numpy()):
        np.testing.assert_allclose(out, _numpy_blur(image, sigma, 2), atol=1e-5)


def test_eval_preprocessing_center_crops_large_images_only():
    large = SimCLRAugmenter(64)
    assert large.eval_crop_fraction == 0.875
    small = SimCLRAugmenter(32)
    assert small.eval_crop_fraction == 1.0
    images = _coordinate_images(2, size=64)
    out = large(images, training=False).numpy()
    # A central 0.875 crop spans columns 4..59 of 0..63.
    assert out[0, 0, 0, 0] == pytest.approx(4 / 63, abs=0.01)
    assert out[0, 0, -1, 0] == pytest.approx(59 / 63, abs=0.01)


def test_serialisation_round_trip():
    augmenter = SimCLRAugmenter((24, 20), crop_area=(0.2, 0.9), blur=True,
                                color_strength=0.7, solarize_probability=0.1,
                                seed=9)
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(augmenter))
    assert isinstance(restored, SimCLRAugmenter)
    assert restored.get_config() == augmenter.get_config()


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=0), "image_size"),
    (dict(image_size=8, crop_area=(0.5, 0.1)), "crop_area"),
    (dict(image_size=8, crop_area=(0.0, 1.0)), "crop_area"),
    (dict(image_size=8, jitter_probability=1.5), "jitter_probability"),
    (dict(image_size=8, color_strength=-1), "color_strength"),
])
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimCLRAugmenter(**kwargs)


def test_rejects_bad_channel_count():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        SimCLRAugmenter(8)(np.zeros((2, 8, 8, 4), np.uint8))


def test_random_stream_continues_after_checkpoint_restore(tmp_path):
    images = _colourful(4)
    augmenter = SimCLRAugmenter(SIZE, seed=11, blur=True)
    augmenter(images)
    checkpoint = tf.train.Checkpoint(augmenter=augmenter)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    expected = augmenter(images).numpy()  # the draw after the checkpoint
    fresh = SimCLRAugmenter(SIZE, seed=11, blur=True)
    assert not np.allclose(fresh(images).numpy(), expected)  # its first draw
    tf.train.Checkpoint(augmenter=fresh).restore(path).assert_existing_objects_matched()
    np.testing.assert_allclose(fresh(images).numpy(), expected)


def test_replicas_draw_different_views(mirrored):
    strategy = mirrored
    with strategy.scope():
        augmenter = SimCLRAugmenter(SIZE, seed=1)
    images = np.repeat(_colourful(1), 8, axis=0)  # 4 identical images per replica
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(images).batch(8))
    batch = next(iter(dataset))
    views = strategy.experimental_local_results(
        strategy.run(tf.function(lambda x: augmenter(x)), (batch,)))
    assert float(tf.reduce_max(tf.abs(views[0] - views[1]))) > 1e-2


@pytest.mark.parametrize("strength", [0.5, 1.0, 1.5])
def test_decisions_follow_the_spec_distributions(strength):
    # The spec's numbers, drawn for 20,000 images: jitter with p 0.8,
    # brightness / contrast / saturation factors U(max(0, 1 - 0.8s), 1 + 0.8s),
    # hue shifts U(-0.2s, 0.2s), blur with p 0.5 and sigma U(0.1, 2.0), a random
    # order of the 4 colour ops (2 for grayscale). Ranges must be reached at
    # both ends, not only respected.
    n = 20000
    augmenter = SimCLRAugmenter(SIZE, color_strength=strength, blur=True, seed=4)
    rgb = {k: v.numpy() for k, v in augmenter._draw_decisions(n, 3).items()}
    low, high = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    factors = rgb["factors"]
    assert factors.shape == (3, n)
    assert low <= factors.min() < low + 0.01 and high - 0.01 < factors.max() <= high
    np.testing.assert_allclose(factors.mean(axis=1), (low + high) / 2, atol=0.02)
    hue = rgb["hue_shifts"]
    assert -0.2 * strength <= hue.min() < -0.2 * strength + 0.005
    assert 0.2 * strength - 0.005 < hue.max() <= 0.2 * strength
    assert 0.1 <= rgb["sigma"].min() < 0.11 and 1.99 < rgb["sigma"].max() <= 2.0
    for name, p in (("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5), ("solarize", 0.0)):
        assert abs(rgb[name].mean() - p) < 0.015, name
    np.testing.assert_array_equal(np.sort(rgb["order"], axis=1),
                                  np.broadcast_to(np.arange(4), (n, 4)))
    # Each op comes first in about a quarter of the images.
    np.testing.assert_allclose(np.bincount(rgb["order"][:, 0], minlength=4) / n, 0.25,
                               atol=0.015)
    gray = augmenter._draw_decisions(100, 1)["order"].numpy()
    np.testing.assert_array_equal(np.sort(gray, axis=1),
                                  np.broadcast_to(np.arange(2), (100, 2)))
