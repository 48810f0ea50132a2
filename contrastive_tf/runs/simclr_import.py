"""The published SimCLR / SimCLRv2 models, as this package's own Keras models.

google-research/simclr released its ImageNet models as TF2 SavedModels (the
`simclr-checkpoints-tf2` folders: `<model>/saved_model/<step>/`), written by
its TF2 code (`tf2/run.py`), which also writes training checkpoints. Both hold
the variables under the object graph of that code's Keras 2 model:
`model/resnet_model/...`, `model/_projection_head/...`,
`model/supervised_head/...`. `import_simclr` reads that graph, finds the
architecture it describes (depth, width multiplier, selective kernels, head
layers, classes) and copies every variable into `resnet(layout="reference")`,
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
from contrastive_tf.runs.artifacts import ModelSourceError

SK_RATIO = 0.0625  # the published SK models' ratio (and the reference default)
SK_MIN_DIM = 32  # the reference's floor on the selective-kernel attention width
BN_MOMENTUM = 0.9  # the reference's batch_norm_decay
BN_EPSILON = 1e-5  # the reference's BATCH_NORM_EPSILON
# Object-graph edges that only list variables or functions again (Keras 2
# SavedModel bookkeeping), never the model's structure.
_ALIAS_EDGES = {"variables", "trainable_variables", "non_trainable_variables",
                "trainable_variables_list", "regularization_losses", "keras_api",
                "metrics", "layer_metrics", "layer_regularization_losses", "signatures",
                "__call__", "call_and_return_all_conditional_losses",
                "call_and_return_conditional_losses", "_jit_compiled_convolution_op",
                "trainable_weights", "non_trainable_weights", "weights", "submodules"}
_PATHS_PER_NODE = 256
_BLOCKS = {(2, 2, 2, 2): {"basic": 18}, (3, 4, 6, 3): {"basic": 34, "bottleneck": 50},
           (3, 4, 23, 3): {"bottleneck": 101}, (3, 8, 36, 3): {"bottleneck": 152},
           (3, 24, 36, 3): {"bottleneck": 200}}


class SimCLRImportError(ModelSourceError):
    """The source is not a model of the reference code, or does not fit it."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the source's variables describe, in the reference's terms."""
    depth: int
    width_multiplier: int
    sk_ratio: float
    cifar_stem: bool
    projection_layers: int  # 0: no projection head (SimCLRv1 releases)
    projection_dim: int | None
    num_classes: int | None  # None: no supervised head
    head_input: str | None  # "h" or "hidden1": what the supervised head reads

    @property
    def name(self) -> str:
        return (f"r{self.depth}_{self.width_multiplier}x_sk{int(self.sk_ratio > 0)}"
                f"{'' if self.projection_layers else '_noproj'}")


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


# -- where the variables are --------------------------------------------------------

def resolve_source(path: str) -> tuple[str, str]:
    """("saved_model", directory) or ("checkpoint", prefix) for `path`: a
    SavedModel directory, a folder of numbered SavedModel folders (the newest
    is taken), a folder holding `saved_model/`, a checkpoint directory (its
    latest checkpoint) or a checkpoint prefix."""
    path = path.rstrip("/")
    gfile = tf.io.gfile
    if gfile.exists(os.path.join(path, "saved_model.pb")):
        return "saved_model", path
    if gfile.isdir(path):
        steps = [name.rstrip("/") for name in gfile.listdir(path)]
        steps = sorted((int(s) for s in steps if s.isdigit()
                        and gfile.exists(os.path.join(path, s, "saved_model.pb"))))
        if steps:
            return "saved_model", os.path.join(path, str(steps[-1]))
        if gfile.isdir(os.path.join(path, "saved_model")):
            return resolve_source(os.path.join(path, "saved_model"))
        latest = tf.train.latest_checkpoint(path)
        if latest:
            return "checkpoint", latest
        found = sorted(gfile.listdir(path))[:8]
        raise SimCLRImportError(
            f"{path} holds no SavedModel (saved_model.pb), no numbered SavedModel folders and "
            f"no TF checkpoint (found: {', '.join(found) or 'nothing'}); give the folder the "
            "reference code wrote (<model_dir>/saved_model/<step>, or <model_dir> for its "
            "checkpoints)")
    if gfile.exists(path + ".index"):
        return "checkpoint", path
    raise SimCLRImportError(f"{path} does not exist (as a folder or a checkpoint prefix)")


class _Variables:
    """The source's variables, addressable by every structural path the
    object graph gives them, e.g. `model/resnet_model/block_groups/0/layers/0/
    conv2d_bn_layers/0/conv2d/kernel`."""

    def __init__(self, prefix: str):
        try:
            self._reader = tf.train.load_checkpoint(prefix)
        except (tf.errors.OpError, ValueError) as error:
            raise SimCLRImportError(f"cannot read the variables at {prefix}: {error}") from None
        shapes = self._reader.get_variable_to_shape_map()
        if "_CHECKPOINTABLE_OBJECT_GRAPH" not in shapes:
            raise SimCLRImportError(f"{prefix} is a name-based (TF1) checkpoint; this importer "
                                    "reads the TF2 SavedModels and checkpoints of the "
                                    "reference's tf2/ code")
        from tensorflow.core.protobuf import trackable_object_graph_pb2
        graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
            self._reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
        self.shapes = {key: tuple(shape) for key, shape in shapes.items()
                       if key != "_CHECKPOINTABLE_OBJECT_GRAPH"}
        key_of = {}
        for index, node in enumerate(graph.nodes):
            for attribute in node.attributes:
                if attribute.name == "VARIABLE_VALUE":
                    key_of[index] = attribute.checkpoint_key
        self.key_at = {}  # structural path -> checkpoint key
        counts = {}
        stack = [(0, "")]
        while stack:  # every route from the root, aliases excluded, a few hundred at most
            index, path = stack.pop()
            if counts.get(index, 0) >= _PATHS_PER_NODE:
                continue
            counts[index] = counts.get(index, 0) + 1
            if index in key_of:
                self.key_at[path] = key_of[index]
            for child in graph.nodes[index].children:
                if child.local_name not in _ALIAS_EDGES:
                    stack.append((child.node_id, f"{path}/{child.local_name}".lstrip("/")))
        self.used = set()

    def has(self, path: str) -> bool:
        return path in self.key_at

    def children(self, path: str) -> set[str]:
        """Names directly under `path`."""
        prefix = path + "/"
        return {p[len(prefix):].split("/", 1)[0] for p in self.key_at if p.startswith(prefix)}

    def shape(self, path: str) -> tuple:
        return self.shapes[self.key_at[path]]

    def take(self, path: str) -> np.ndarray:
        if path not in self.key_at:
            raise SimCLRImportError(f"the source has no variable {path}, which the architecture "
                                    "it describes needs")
        key = self.key_at[path]
        self.used.add(key)
        return self._reader.get_tensor(key)

    def leftovers(self) -> tuple[dict, list]:
        """(skipped reason -> count, unexpected keys) of the unused entries."""
        skipped, unexpected = {}, []
        for key in sorted(set(self.shapes) - self.used):
            if "/.OPTIMIZER_SLOT/" in key:
                reason = "optimizer slots"
            elif key.startswith("optimizer/"):
                reason = "optimizer state"
            elif key.split("/")[0] in ("global_step", "save_counter", "step"):
                reason = "step counters"
            elif "ExponentialMovingAverage" in key or "/ema" in key.lower():
                reason = "moving-average copies"
            else:
                unexpected.append(key)
                continue
            skipped[reason] = skipped.get(reason, 0) + 1
        return skipped, unexpected


# -- the architecture the variables describe -------------------------------------------

def _indices(source, path, child):
    """Sorted list positions under `path` whose entry has `child`."""
    return sorted(int(name) for name in source.children(path)
                  if name.isdigit() and source.children(f"{path}/{name}") >= {child})


def _find_root(source: _Variables) -> str:
    for path in sorted(source.key_at, key=len):
        if "/resnet_model/" in f"/{path}":
            return path.split("resnet_model")[0].rstrip("/")
    raise SimCLRImportError("the source has no `resnet_model` (its variables start with "
                            f"{sorted(source.key_at)[:3]}): not a model of the reference "
                            "SimCLR code")


def _architecture(source: _Variables, root: str, head_input: str) -> Architecture:
    base = f"{root}/resnet_model".lstrip("/")
    stem = f"{base}/initial_conv_relu_max_pool"
    convs = _indices(source, stem, "conv2d")
    if not convs:
        raise SimCLRImportError(f"{stem} has no convolution")
    first = source.shape(f"{stem}/{convs[0]}/conv2d/kernel")
    deep_stem = len(convs) == 3
    stem_width = source.shape(f"{stem}/{convs[-1]}/conv2d/kernel")[-1]
    cifar = first[0] == 3 and not deep_stem
    if stem_width % 64:
        raise SimCLRImportError(f"{stem}: {stem_width} stem channels is not a multiple of 64")
    width = stem_width // 64
    groups = f"{base}/block_groups"
    counts, kinds = [], set()
    for group in range(4):
        blocks = [int(b) for b in source.children(f"{groups}/{group}/layers") if b.isdigit()]
        counts.append(len(blocks))
        for block in blocks:
            names = source.children(f"{groups}/{group}/layers/{block}")
            kinds.add("bottleneck" if "conv_relu_dropblock_layers" in names else "basic")
    kind = kinds.pop() if len(kinds) == 1 else None
    depth = _BLOCKS.get(tuple(counts), {}).get(kind)
    if depth is None:
        raise SimCLRImportError(f"{groups}: {counts} blocks of kind(s) {sorted(kinds | {kind} - {None})}"
                                " is not a ResNet depth the reference builds")
    selective = bool(_indices(source, f"{groups}/0/layers/0/conv_relu_dropblock_layers",
                              "conv2d_0"))
    sk_ratio = SK_RATIO if (deep_stem or selective) else 0.0
    head = f"{root}/_projection_head/linear_layers".lstrip("/")
    layers = _indices(source, head, "dense")
    projection_dim = source.shape(f"{head}/{layers[-1]}/dense/kernel")[-1] if layers else None
    classes, reads = None, None
    sup = f"{root}/supervised_head/linear_layer/dense".lstrip("/")
    if source.has(f"{sup}/kernel"):
        fan_in, classes = source.shape(f"{sup}/kernel")
        h_width = stem_width * 8 * (4 if kind == "bottleneck" else 1)
        hidden = source.shape(f"{head}/{layers[0]}/dense/kernel")[-1] if layers else None
        if head_input in ("h", "hidden1"):
            reads = head_input
        elif fan_in != h_width:
            reads = "hidden1"
        else:
            reads = "h"  # may be revised by the probe (SavedModels) when hidden has h's width
        if reads == "hidden1" and fan_in != hidden:
            raise SimCLRImportError(f"{sup}/kernel reads {fan_in} features; h has {h_width} and "
                                    f"the head's first layer {hidden}")
    return Architecture(depth=depth, width_multiplier=width, sk_ratio=sk_ratio,
                        cifar_stem=cifar, projection_layers=len(layers),
                        projection_dim=projection_dim, num_classes=classes, head_input=reads)


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
    return _indices(source, path, "conv2d"), _indices(source, path, "bn")


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
            selective = _indices(source, body, "conv2d_0")
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
    for index, entry in enumerate(_indices(source, path, "dense")):
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
    source = _Variables(prefix)
    root = _find_root(source)
    arch = _architecture(source, root, head_input)
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
