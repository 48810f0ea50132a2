"""Compute precision: which policy a machine runs fastest, and using one
without leaking it.

`choose("auto")` picks mixed_bfloat16 where bfloat16 runs natively (a CPU
with AMX or AVX-512 BF16, a GPU of compute capability 8.0 or newer),
mixed_float16 on older GPUs and float32 elsewhere: on a CPU without native
bf16 (AVX2 only) bf16 is emulated and a training step runs several times
slower than in float32 (BENCHMARKS.md). An explicit precision is honoured, with a warning when it is
emulated on this machine.

`policy_scope(name)` sets Keras' global dtype policy for the models built
inside it and restores the previous one on exit, also on error;
`loss_scaled(optimizer, name)` wraps an optimizer in a `LossScaleOptimizer`
under mixed_float16, so every stage that trains in float16 scales its loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import keras

from contrastive_tf.runtime import compat

from contrastive_tf.runtime import progress

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
NATIVE_FP16_CPU_FLAGS = ("amx_fp16", "avx512_fp16")
# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) under which it has no bf16 kernels.
_ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2",
                             "AVX512_CORE", "AVX512_CORE_VNNI")

log = progress.logger("precision")


@dataclasses.dataclass(frozen=True)
class Choice:
    """A precision decision: the Keras policy, why, and a warning if any."""
    policy: str
    reason: str
    warning: str | None = None


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where it reports none),
    less the bf16 ones when `ONEDNN_MAX_CPU_ISA` caps oneDNN -- TensorFlow's
    CPU kernels -- below its bf16 instruction sets."""
    flags = frozenset()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_CAPS_WITHOUT_BF16:
        flags = flags - set(NATIVE_BF16_CPU_FLAGS) - set(NATIVE_FP16_CPU_FLAGS)
    return flags


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU model name Linux reports, or "unknown"."""
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return "unknown"


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """Compute capability of each GPU TensorFlow sees ((0, 0) if unknown)."""
    import tensorflow as tf

    capabilities = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capabilities.append(tuple(details.get("compute_capability") or (0, 0)))
    return capabilities


def choose(requested: str = "auto", flags: frozenset[str] | None = None,
           gpus: list[tuple[int, int]] | None = None) -> Choice:
    """The policy for `requested` on this machine (or on `flags` / `gpus`).

    Args:
        requested: "auto" or an explicit policy from `PRECISIONS`.
        flags: CPU feature flags. Defaults to this machine's.
        gpus: compute capabilities of the GPUs. Defaults to this machine's.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"Expected precision in {PRECISIONS}. Received: "
                         f"precision={requested!r}")
    flags = cpu_flags() if flags is None else frozenset(flags)
    gpus = gpu_compute_capabilities() if gpus is None else list(gpus)
    native = sorted(set(NATIVE_BF16_CPU_FLAGS) & flags)
    if gpus:
        oldest = min(gpus)
        device = f"GPU of compute capability {oldest[0]}.{oldest[1]}"
        bf16_native, fp16_native = oldest >= (8, 0), True
    else:
        device = "CPU"
        bf16_native = bool(native)
        fp16_native = bool(set(NATIVE_FP16_CPU_FLAGS) & flags)
    if requested == "auto":
        if bf16_native:
            why = f"{device} with {', '.join(native)}" if not gpus else device
            return Choice("mixed_bfloat16", f"auto: bfloat16 runs natively on this {why}")
        if gpus:
            return Choice("mixed_float16", f"auto: {device} has no native bfloat16; "
                          "float16 with loss scaling")
        return Choice("float32", "auto: this CPU has no native bfloat16 (no "
                      f"{' / '.join(NATIVE_BF16_CPU_FLAGS)}), where bf16 is emulated "
                      "and several times slower than float32")
    warning = None
    if requested == "mixed_bfloat16" and not bf16_native:
        warning = (f"precision mixed_bfloat16 was asked for, but this {device} has no "
                   "native bfloat16: it is emulated and a training step runs several times "
                   "slower than in float32 (use `precision` auto or float32)")
    elif requested == "mixed_float16" and not fp16_native:
        warning = ("precision mixed_float16 was asked for, but this CPU has no native "
                   "float16: it is emulated and slower than float32")
    return Choice(requested, f"asked for explicitly ({device})", warning)


def resolve(requested: str) -> Choice:
    """`choose(requested)` for this machine, logged (with its warning)."""
    choice = choose(requested)
    log.info(f"{choice.policy} ({choice.reason})")
    if choice.warning:
        log.warning(choice.warning)
    return choice


@contextlib.contextmanager
def policy_scope(policy: str):
    """Keras' global dtype policy is `policy` inside, the previous one after."""
    if policy == "auto":
        raise ValueError("policy_scope needs a concrete policy; resolve 'auto' "
                         "with precision.choose first")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def loss_scaled(optimizer: keras.optimizers.Optimizer,
                policy: str) -> keras.optimizers.Optimizer:
    """`optimizer` in a `LossScaleOptimizer` under mixed_float16 (float16
    gradients underflow without loss scaling); as it is otherwise."""
    if policy == "mixed_float16" and not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def precision_of(model: keras.Model) -> str:
    """The mixed policy a model computes in ("float32" if none): the first
    layer, nested models included, whose policy is mixed."""
    stack = [model]
    while stack:
        layer = stack.pop(0)
        name = layer.dtype_policy.name
        if name.startswith("mixed_"):
            return name
        stack.extend(getattr(layer, "layers", []))
    return "float32"


def recast(model: keras.Model, policy: str) -> keras.Model:
    """Makes a built (or loaded) model compute in `policy`, in place, and
    returns it: a model keeps the policy it was saved in, which must not
    decide the next job's precision (an encoder pretrained in bf16 on one
    machine would run emulated bf16 on a CPU without it). The layer that
    computes each (sub)model's single output keeps its own policy (the
    float32 features h and logits); weights are untouched (Keras keeps them
    in float32 under every mixed policy)."""
    if policy == "auto":
        raise ValueError("recast needs a concrete policy; resolve 'auto' first")
    outputs = {id(layer.layers[-1]) for layer in [model, *compat.all_layers(model)]
               if isinstance(layer, keras.Model) and len(layer.outputs) == 1 and layer.layers}
    for layer in [model, *compat.all_layers(model)]:
        if id(layer) not in outputs and layer.dtype_policy.name != policy:
            layer.dtype_policy = policy
    return model
