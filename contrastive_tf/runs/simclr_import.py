"""The published SimCLR / SimCLRv2 models, as this package's own Keras models.

google-research/simclr released its ImageNet models as TF2 SavedModels (the
`simclr-checkpoints-tf2` folders: `<model>/saved_model/<step>/`), written by
its TF2 code (`tf2/run.py`), which also writes training checkpoints. Both hold
the variables under the object graph of that code's Keras 2 model:
`model/resnet_model/...`, `model/_projection_head/...`,
`model/supervised_head/...`. `import_simclr` reads that graph and the
architecture it describes (depth, width multiplier, selective kernels, head
layers, classes; `simclr_source`) and copies every variable into `resnet(layout="reference")`,
a `ProjectionHead` and a classifier built by this package: the result trains,
saves, exports and serves like any other model here, in any precision. No
part of the SavedModel is wrapped or run in the result.

Every variable of the source is used, or named as deliberately skipped
(optimizer slots and state, step and save counters, moving-average copies);
anything else, or a shape that does not fit, is an error naming it. A
SavedModel source is also run on a probe batch beside the imported model and
the largest differences recorded (`ImportedSimCLR.check`).
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from contrastive_tf.method.backbones import resnet
from contrastive_tf.method.classifier import build_classifier
from contrastive_tf.method.heads import ProjectionHead
from contrastive_tf.runs.simclr_source import (Architecture, SimCLRImportError, Variables,
                                               find_root, indices, read_architecture,
                                               resolve_source)

BN_MOMENTUM = 0.9  # the reference's batch_norm_decay
BN_EPSILON = 1e-5  # the reference's BATCH_NORM_EPSILON
__all__ = ["Architecture", "ImportedSimCLR", "SimCLRImportError", "import_simclr",
           "probe_batch", "resolve_source"]


@dataclasses.dataclass
class ImportedSimCLR:
    """An imported model: `encoder` (images in [0, 1] -> h), `projection_head`
    (h -> z; None where the source has none) and `classifier` (images ->
    logits; None without a supervised head)."""
    encoder: keras.Model
    projection_head: ProjectionHead | None
    classifier: keras.Model | None
    architecture: Architecture
    source: str
    source_kind: str  # "saved_model" or "checkpoint"
    skipped: dict  # reason -> number of source entries deliberately not used
    check: dict  # the probe comparison with the source (SavedModels)


# -- copying the variables ------------------------------------------------------------------

def _assign(variable, value, path):
    if tuple(variable.shape) != tuple(value.shape):
        raise SimCLRImportError(f"{path}: shape {tuple(value.shape)} in the source, "
                                f"{tuple(variable.shape)} in the architecture it describes")
    variable.assign(value.astype(np.float32))


def _conv(source, model, layer_name, path):
    _assign(model.get_layer(layer_name).kernel, source.take(f"{path}/conv2d/kernel"), path)


def _bn(layer, source, path):
    for attribute in ("gamma", "beta", "moving_mean", "moving_variance"):
        variable = getattr(layer, attribute, None)
        if variable is None:
            continue
        _assign(variable, source.take(f"{path}/{attribute}"), f"{path}/{attribute}")


def _conv_bn(source, model, name, conv_path, bn_path):
    _conv(source, model, f"{name}_conv", conv_path)
    _bn(model.get_layer(f"{name}_bn"), source, f"{bn_path}/bn")


def _listed(source, path):
    """(conv entries, BN entries) of a reference layer list, in order."""
    return indices(source, path, "conv2d"), indices(source, path, "bn")


def _copy_encoder(source, encoder, base, arch):
    stem = f"{base}/initial_conv_relu_max_pool"
    convs, norms = _listed(source, stem)
    names = ["stem_a", "stem_b", "stem_c"] if len(convs) == 3 else ["stem"]
    for name, conv, norm in zip(names, convs, norms):
        _conv_bn(source, encoder, name, f"{stem}/{conv}", f"{stem}/{norm}")
    kind = "bottleneck" if arch.depth >= 50 else "basic"
    for group in range(4):
        blocks = sorted(int(b) for b in source.children(f"{base}/block_groups/{group}/layers")
                        if b.isdigit())
        for block in blocks:
            path = f"{base}/block_groups/{group}/layers/{block}"
            name = f"stage{group + 1}_block{block + 1}"
            shortcut = "projection_layers" if kind == "bottleneck" else "shortcut_layers"
            convs, norms = _listed(source, f"{path}/{shortcut}")
            if convs:
                _conv_bn(source, encoder, f"{name}_proj", f"{path}/{shortcut}/{convs[0]}",
                         f"{path}/{shortcut}/{norms[0]}")
            body = f"{path}/conv_relu_dropblock_layers" if kind == "bottleneck" \
                else f"{path}/conv2d_bn_layers"
            convs, norms = _listed(source, body)
            selective = indices(source, body, "conv2d_0")
            if kind == "basic":
                for step, (conv, norm) in enumerate(zip(convs, norms)):
                    _conv_bn(source, encoder, f"{name}_{step + 1}", f"{body}/{conv}",
                             f"{body}/{norm}")
                continue
            plain = list(zip(convs, norms))
            steps = [1, 3] if selective else [1, 2, 3]
            for step, (conv, norm) in zip(steps, plain):
                _conv_bn(source, encoder, f"{name}_{step}", f"{body}/{conv}", f"{body}/{norm}")
            if selective:
                sk = f"{body}/{selective[0]}"
                _conv_bn(source, encoder, f"{name}_2_sk", f"{sk}/conv2d_fixed_padding",
                         f"{sk}/batch_norm_relu")
                _assign(encoder.get_layer(f"{name}_2_sk_fc_conv").kernel,
                        source.take(f"{sk}/conv2d_0/kernel"), f"{sk}/conv2d_0/kernel")
                _bn(encoder.get_layer(f"{name}_2_sk_fc_bn"), source, f"{sk}/batch_norm_relu_1/bn")
                _assign(encoder.get_layer(f"{name}_2_sk_attn_conv").kernel,
                        source.take(f"{sk}/conv2d_1/kernel"), f"{sk}/conv2d_1/kernel")


def _copy_head(source, head, path):
    for index, entry in enumerate(indices(source, path, "dense")):
        _assign(getattr(head, f"dense_{index}").kernel,
                source.take(f"{path}/{entry}/dense/kernel"), f"{path}/{entry}/dense/kernel")
        _bn(getattr(head, f"bn_{index}"), source, f"{path}/{entry}/bn_relu/bn")


def _build(arch: Architecture, image_size: int | None):
    encoder = resnet(arch.depth, arch.width_multiplier, cifar_stem=arch.cifar_stem,
                     sk_ratio=arch.sk_ratio, input_shape=(image_size, image_size, 3),
                     bn_momentum=BN_MOMENTUM, bn_epsilon=BN_EPSILON, synchronized_bn=False,
                     layout="reference", name=f"simclr_{arch.name}")
    head = None
    if arch.projection_layers:
        head = ProjectionHead(num_layers=arch.projection_layers,
                              output_dim=arch.projection_dim,
                              ft_layer=1 if arch.projection_layers > 1 else 0,
                              bn_momentum=BN_MOMENTUM, bn_epsilon=BN_EPSILON,
                              synchronized_bn=False, name="projection_head")
        head.build((None, int(encoder.output.shape[-1])))
    return encoder, head


def _classifier(encoder, head, arch, source, root):
    """The supervised head on h, or on the head's first layer."""
    reads = head if arch.head_input == "hidden1" else None
    if reads is not None and reads.ft_layer != 1:
        raise SimCLRImportError("a supervised head on the first projection layer needs a head "
                                "of at least 2 layers")
    classifier = build_classifier(encoder, arch.num_classes, reads,
                                  name=f"simclr_{arch.name}_classifier")
    sup = f"{root}/supervised_head/linear_layer/dense".lstrip("/")
    logits = classifier.get_layer("logits")
    _assign(logits.kernel, source.take(f"{sup}/kernel"), f"{sup}/kernel")
    _assign(logits.bias, source.take(f"{sup}/bias"), f"{sup}/bias")
    return classifier


# -- checking against the source's own forward pass ------------------------------------

def probe_batch(image_size: int, count: int = 2, seed: int = 0) -> np.ndarray:
    """Float images in [0, 1] the source and the imported model both see."""
    return np.random.default_rng(seed).uniform(
        size=(count, image_size, image_size, 3)).astype(np.float32)


def _run_source(directory: str, images: np.ndarray) -> dict | None:
    """The SavedModel's outputs on `images` (inference mode), or None where
    it has no `__call__(images, trainable)` as the reference writes it."""
    try:
        loaded = tf.saved_model.load(directory)
        outputs = loaded(tf.constant(images), trainable=False)
    except (TypeError, ValueError, AttributeError, tf.errors.OpError):
        return None
    if not isinstance(outputs, dict) or "final_avg_pool" not in outputs:
        return None
    return {name: np.asarray(value) for name, value in outputs.items()}


def _difference(mine, theirs) -> dict:
    return {"max_abs_difference": float(np.max(np.abs(mine - theirs))),
            "max_abs_reference": float(np.max(np.abs(theirs)))}


# -- the entry point -----------------------------------------------------------------------------

def import_simclr(path: str, image_size: int | None = 224, head_input: str = "auto",
                  check: bool = True) -> ImportedSimCLR:
    """Builds this package's models from a model of google-research/simclr.

    Args:
        path: a SavedModel directory of the reference TF2 code (e.g. a
            `simclr-checkpoints-tf2` model's `saved_model/` folder or one of
            its numbered steps), or a TF2 training checkpoint (prefix or
            directory) written by that code.
        image_size: the side of the square float images the models take;
            None for images of any size. Defaults to `224`.
        head_input: what the supervised head reads: `"h"` (linear
            evaluation heads, `ft_proj_selector=0`), `"hidden1"` (SimCLRv2
            fine-tuned from the first head layer) or `"auto"` (from the
            shapes; where h and the first head layer have the same width, a
            SavedModel's own logits decide, a checkpoint defaults to h).
            Defaults to `"auto"`.
        check: run a SavedModel source on a probe batch beside the imported
            models and record the largest differences. Defaults to `True`.

    Returns:
        An `ImportedSimCLR` with `.encoder`, `.projection_head`,
        `.classifier` (float32 Keras models), `.architecture` and `.check`.

    Example:
    >>> imported = ct.import_simclr("r50_1x_sk0/saved_model")
    >>> h = imported.encoder(images)          # (batch, 2048)
    >>> logits = imported.classifier(images)  # (batch, 1000)

    References:
        - [Chen et al., 2020b](https://arxiv.org/abs/2006.10029)
        - github.com/google-research/simclr, tf2/ (the layout read here)
    """
    if head_input not in ("auto", "h", "hidden1"):
        raise ValueError("Expected head_input in ('auto', 'h', 'hidden1'). "
                         f"Received: head_input={head_input!r}")
    if image_size is not None and image_size < 32:
        raise ValueError(f"Expected image_size >= 32. Received: image_size={image_size}")
    kind, location = resolve_source(path)
    prefix = os.path.join(location, "variables", "variables") if kind == "saved_model" \
        else location
    source = Variables(prefix)
    root = find_root(source)
    arch = read_architecture(source, root, head_input)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        encoder, head = _build(arch, image_size)
        _copy_encoder(source, encoder, f"{root}/resnet_model".lstrip("/"), arch)
        if head is not None:
            _copy_head(source, head, f"{root}/_projection_head/linear_layers".lstrip("/"))
        classifier = None
        if arch.num_classes:
            classifier = _classifier(encoder, head, arch, source, root)
    finally:
        keras.config.set_dtype_policy(previous)
    skipped, unexpected = source.leftovers()
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more"
                                             if len(unexpected) > 5 else "")
        raise SimCLRImportError(f"{len(unexpected)} variable(s) of {path} fit nothing in the "
                                f"{arch.name} architecture the others describe: {shown}")
    result = ImportedSimCLR(encoder, head, classifier, arch, location, kind, skipped,
                            {"compared": False})
    if check and kind == "saved_model":
        result.check = _check(result, location, image_size, source, root, head_input)
    elif kind != "saved_model":
        result.check = {"compared": False,
                        "why": "a training checkpoint holds no forward pass to compare with"}
    return result


def _check(result: ImportedSimCLR, location, image_size, source, root, head_input) -> dict:
    images = probe_batch(image_size or 224)
    theirs = _run_source(location, images)
    if theirs is None:
        return {"compared": False,
                "why": "the SavedModel has no __call__(images, trainable) returning "
                       "final_avg_pool, as the reference writes it"}
    report = {"compared": True, "probe": list(images.shape),
              "h": _difference(np.asarray(result.encoder(images)), theirs["final_avg_pool"])}
    if result.classifier is not None and "logits_sup" in theirs:
        arch = result.architecture
        logits = np.asarray(result.classifier(images))
        report["logits"] = _difference(logits, theirs["logits_sup"])
        ambiguous = (head_input == "auto" and result.projection_head is not None
                     and arch.projection_layers > 1)
        if ambiguous:
            other = "hidden1" if arch.head_input == "h" else "h"
            arch_other = dataclasses.replace(arch, head_input=other)
            alternative = _classifier(result.encoder, result.projection_head, arch_other,
                                      source, root)
            compared = _difference(np.asarray(alternative(images)), theirs["logits_sup"])
            if compared["max_abs_difference"] < report["logits"]["max_abs_difference"]:
                result.classifier, result.architecture = alternative, arch_other
                report["logits"] = compared
            report["head_input_from"] = "the SavedModel's logits_sup on the probe"
    if result.projection_head is not None and "proj_head_output" in theirs:
        z = np.asarray(result.projection_head(result.encoder(images)))
        report["z"] = _difference(z, theirs["proj_head_output"])
    return report
