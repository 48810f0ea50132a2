"""Property-based tests (hypothesis) for the augmenter and the loss."""

import numpy as np
from hypothesis import HealthCheck, example, given, settings, strategies as st

import contrastive_tf as ct
from tests.testing import numpy_nt_xent

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(batch=st.integers(1, 6), height=st.integers(1, 40), width=st.integers(1, 40),
       channels=st.sampled_from([1, 3]), dtype=st.sampled_from(["uint8", "uint16", "float32"]),
       size=st.integers(4, 24), blur=st.booleans(), strength=st.floats(0.0, 1.5),
       seed=st.integers(0, 2 ** 16))
# Found by hypothesis: a blurred value 1.0000002 (the kernel sums to 1 only up to rounding).
@example(batch=3, height=1, width=1, channels=3, dtype="uint8", size=4, blur=True,
         strength=1.0, seed=80)
def test_augmenter_never_crashes_and_stays_in_range(batch, height, width, channels, dtype,
                                                    size, blur, strength, seed):
    rng = np.random.RandomState(seed)
    if dtype == "float32":
        images = rng.rand(batch, height, width, channels).astype(dtype)
    else:
        images = rng.randint(0, np.iinfo(dtype).max, (batch, height, width, channels)).astype(dtype)
    augmenter = ct.SimCLRAugmenter(size, blur=blur, color_strength=strength,
                                   solarize_probability=0.2, seed=seed)
    for training in (True, False):
        out = augmenter(images, training=training).numpy()
        assert out.shape == (batch, size, size, channels)
        assert np.all(np.isfinite(out))
        assert out.min() >= 0.0 and out.max() <= 1.0


@SETTINGS
@given(n=st.integers(1, 12), dim=st.integers(1, 16), temperature=st.floats(0.05, 5.0),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2 ** 16))
def test_nt_xent_is_finite_non_negative_and_matches_numpy(n, dim, temperature, scale, seed):
    rng = np.random.RandomState(seed)
    z1 = (rng.normal(size=(n, dim)) * scale).astype(np.float32)
    z2 = (rng.normal(size=(n, dim)) * scale).astype(np.float32)
    loss, accuracy = ct.nt_xent_with_accuracy(z1, z2, temperature)
    assert np.isfinite(float(loss)) and float(loss) >= 0.0
    assert 0.0 <= float(accuracy) <= 1.0
    expected, _ = numpy_nt_xent(z1, z2, temperature)
    assert abs(float(loss) - expected) <= 1e-4 * max(1.0, abs(expected))
