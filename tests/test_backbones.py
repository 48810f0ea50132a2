import numpy as np
import pytest
import keras

from contrastive_tf.method.backbones import resnet


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


# torchvision's published parameter counts minus the final fc layer
# (resnet18: 11,689,512 - 513,000; resnet34: 21,797,672 - 513,000;
#  resnet50: 25,557,032 - 2,049,000; resnet101: 44,549,160 - 2,049,000).
@pytest.mark.parametrize("depth, expected", [
    (18, 11_176_512), (34, 21_284_672), (50, 23_508_032), (101, 42_500_160)])
def test_parameter_counts_match_standard_architectures(depth, expected):
    model = resnet(depth, input_shape=(224, 224, 3))
    assert _trainable(model) == expected
    assert model.output_shape == (None, 512 if depth < 50 else 2048)


@pytest.mark.slow
def test_wide_and_selective_kernel_sizes_match_simclr_v2():
    # SimCLRv2 table: R50 (2x) about 94 M parameters, R50 (1x)+SK about 35 M.
    assert _trainable(resnet(50, 2)) == pytest.approx(94e6, rel=0.01)
    assert _trainable(resnet(50, sk_ratio=0.0625)) == pytest.approx(35e6, rel=0.02)


def test_cifar_stem_is_automatic_for_small_images():
    small = resnet(18, input_shape=(32, 32, 3), base_width=8)
    large = resnet(18, input_shape=(64, 64, 3), base_width=8)
    assert small.get_layer("stem_conv").kernel.shape[:2] == (3, 3)
    assert small.get_layer("stem_conv").strides == (1, 1)
    assert "stem_pool" not in [l.name for l in small.layers]
    assert large.get_layer("stem_conv").kernel.shape[:2] == (7, 7)
    assert "stem_pool" in [l.name for l in large.layers]
    forced = resnet(18, input_shape=(64, 64, 3), base_width=8, cifar_stem=True)
    assert forced.get_layer("stem_conv").strides == (1, 1)


def test_batch_norm_settings():
    model = resnet(18, input_shape=(32, 32, 3), base_width=8)
    norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and all(n.momentum == 0.9 and n.epsilon == 1e-5 for n in norms)
    assert not any(n.synchronized for n in norms)  # one replica
    synced = resnet(18, input_shape=(32, 32, 3), base_width=8, synchronized_bn=True)
    assert all(l.synchronized for l in synced.layers
               if isinstance(l, keras.layers.BatchNormalization))


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("sk_ratio", [0.0, 0.0625])
def test_forward_on_any_image_size_and_one_channel(depth, sk_ratio):
    model = resnet(depth, input_shape=(None, None, 1), base_width=4,
                   sk_ratio=sk_ratio, cifar_stem=False)
    for size in (40, 57):
        out = model(np.random.rand(2, size, size, 1).astype("float32"))
        assert out.shape == (2, model.output_shape[-1])
        assert np.all(np.isfinite(out))


def test_serialisation_round_trip_keeps_outputs(tmp_path):
    model = resnet(18, input_shape=(32, 32, 3), base_width=4, sk_ratio=0.25)
    path = tmp_path / "encoder.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    x = np.random.rand(2, 32, 32, 3).astype("float32")
    np.testing.assert_allclose(restored(x), model(x), atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(depth=20), "depth"),
    (dict(depth=18, width_multiplier=0), "width_multiplier"),
    (dict(depth=18, sk_ratio=-1), "sk_ratio"),
    (dict(depth=18, input_shape=(32, 32, 4)), "input_shape"),
])
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resnet(**kwargs)


@pytest.mark.parametrize("after_block, trains", [(-1, 5), (0, 4), (2, 2), (4, 0)])
def test_freeze_stages_leaves_the_later_stages_training(after_block, trains):
    from contrastive_tf.method.backbones import freeze_stages
    model = resnet(18, input_shape=(32, 32, 3), base_width=4)
    frozen = freeze_stages(model, after_block)
    training = {layer.name.split("_")[0] for layer in model.layers
                if layer.trainable_weights}
    assert len(training) == trains
    assert all(not name.startswith(f"stage{after_block + 1}_") for name in frozen)
    if after_block >= 0:
        assert "stem" not in training
        assert "stem_conv" in frozen and "stem_bn" in frozen
        # A frozen BN keeps its statistics: the moving mean does not move in training.
        bn = model.get_layer("stem_bn")
        before = np.array(bn.moving_mean)
        model(np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype("float32"),
              training=True)
        np.testing.assert_array_equal(np.array(bn.moving_mean), before)
    with pytest.raises(ValueError, match="after_block in \\[-1, 4\\]"):
        freeze_stages(model, 5)


def test_reference_layout_pads_and_projects_as_the_reference():
    """What layout="reference" changes, on shapes and layers (the numbers
    against the reference code itself: tests/test_simclr_import.py)."""
    default = resnet(18, input_shape=(64, 64, 3), base_width=8, sk_ratio=0.0625)
    reference = resnet(18, input_shape=(64, 64, 3), base_width=8, sk_ratio=0.0625,
                       layout="reference")
    names = {layer.name for layer in reference.layers}
    # A projection in the first block of stage 1 even though the shapes match,
    # with the stride-1 ResNet-D pool; basic blocks have no selective kernel.
    assert "stage1_block1_proj_conv" in names and "stage1_block1_proj_pool" in names
    assert "stage1_block1_proj_conv" not in {layer.name for layer in default.layers}
    assert not any("_sk" in name for name in names)
    # Strided convolutions pad (k - 1) // 2 before and the rest after.
    assert reference.get_layer("stem_a_conv_pad").padding == ((1, 1), (1, 1))
    assert reference.get_layer("stage2_block1_proj_pad").padding == ((0, 1), (0, 1))
    assert reference.output_shape == default.output_shape
    with pytest.raises(ValueError, match="layout in"):
        resnet(18, layout="tf1")
