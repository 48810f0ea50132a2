import keras
import pytest

from contrastive_tf.runtime import precision

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512bw", "avx512_bf16"}
AMX = AVX2 | {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize("flags,gpus,policy", [
    (AVX2, [], "float32"),                        # AVX2-only CPU: bf16 is emulated
    (AVX2 | {"avx512f"}, [], "float32"),          # AVX-512 without BF16
    (AVX512_BF16, [], "mixed_bfloat16"),
    (AMX, [], "mixed_bfloat16"),
    (AVX2, [(8, 0)], "mixed_bfloat16"),           # A100
    (AVX2, [(9, 0), (9, 0)], "mixed_bfloat16"),   # H100s
    (AVX512_BF16, [(7, 0)], "mixed_float16"),     # V100: the GPU decides
    (AVX2, [(8, 6), (7, 5)], "mixed_float16"),    # the oldest GPU decides
    (frozenset(), [], "float32"),                 # no /proc/cpuinfo (macOS, ...)
])
def test_auto_decision_table(flags, gpus, policy):
    choice = precision.choose("auto", flags=flags, gpus=gpus)
    assert choice.policy == policy
    assert choice.reason.startswith("auto: ")
    assert choice.warning is None


@pytest.mark.parametrize("requested,flags,gpus,warns", [
    ("mixed_bfloat16", AVX2, [], "emulated"),
    ("mixed_bfloat16", AVX512_BF16, [], None),
    ("mixed_bfloat16", AVX2, [(7, 0)], "emulated"),
    ("mixed_bfloat16", AVX2, [(8, 0)], None),
    ("mixed_float16", AVX512_BF16, [], "emulated"),
    ("mixed_float16", AVX2, [(7, 0)], None),
    ("float32", AVX2, [], None),
    ("float32", AMX, [], None),
])
def test_explicit_precision_is_honoured_with_a_warning_when_emulated(
        requested, flags, gpus, warns):
    choice = precision.choose(requested, flags=flags, gpus=gpus)
    assert choice.policy == requested
    if warns:
        assert warns in choice.warning
    else:
        assert choice.warning is None


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision='fp8'"):
        precision.choose("fp8", flags=AVX2, gpus=[])


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Some CPU\n"
                    "flags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2\n")
    assert precision.cpu_flags(str(path)) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert precision.cpu_model(str(path)) == "Some CPU"
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_onednn_isa_cap_below_bf16_means_no_native_bf16(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert precision.cpu_flags(str(path)) == {"fpu", "avx2", "avx512f"}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert "avx512_bf16" in precision.cpu_flags(str(path))


def test_policy_scope_restores_the_previous_policy_on_error():
    assert keras.mixed_precision.global_policy().name == "float32"
    with pytest.raises(RuntimeError):
        with precision.policy_scope("mixed_bfloat16"):
            assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
            raise RuntimeError("boom")
    assert keras.mixed_precision.global_policy().name == "float32"
    with pytest.raises(ValueError, match="auto"):
        with precision.policy_scope("auto"):
            pass


def test_loss_scaling_only_under_float16():
    sgd = keras.optimizers.SGD(0.1)
    assert precision.loss_scaled(sgd, "mixed_bfloat16") is sgd
    assert precision.loss_scaled(sgd, "float32") is sgd
    wrapped = precision.loss_scaled(sgd, "mixed_float16")
    assert isinstance(wrapped, keras.optimizers.LossScaleOptimizer)
    assert precision.loss_scaled(wrapped, "mixed_float16") is wrapped


def test_recast_makes_a_saved_precision_not_leak(tmp_path):
    import keras
    import numpy as np
    from contrastive_tf.method.classifier import build_classifier
    from contrastive_tf.method.heads import ProjectionHead
    from contrastive_tf.runtime import compat, precision
    from tests.testing import tiny_encoder

    def classifier():
        keras.utils.set_random_seed(0)
        encoder = tiny_encoder(16, 3)
        head = ProjectionHead(2, 8, ft_layer=1)
        head.build(encoder.output.shape)
        return build_classifier(encoder, 3, head)

    with precision.policy_scope("mixed_bfloat16"):
        trained_in_bf16 = classifier()
    path = str(tmp_path / "bf16.keras")
    trained_in_bf16.save(path)
    loaded = keras.models.load_model(path)
    assert precision.precision_of(loaded) == "mixed_bfloat16"
    precision.recast(loaded, "float32")
    assert precision.precision_of(loaded) == "float32"
    reference = classifier()  # built in float32, given the same weights
    reference.set_weights(loaded.get_weights())
    images = np.random.default_rng(0).random((4, 16, 16, 3), np.float32)
    np.testing.assert_array_equal(loaded(images).numpy(), reference(images).numpy())
    # The other way, the output layers keep float32 (features h, logits).
    precision.recast(reference, "mixed_bfloat16")
    assert precision.precision_of(reference) == "mixed_bfloat16"
    assert reference.get_layer("logits").dtype_policy.name == "float32"
    assert reference(images).dtype == "float32"
    features = [layer for layer in compat.all_layers(reference) if layer.name == "features"]
    assert features and all(layer.dtype_policy.name == "float32" for layer in features)
