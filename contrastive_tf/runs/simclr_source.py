"""Reading a model of google-research/simclr: where its variables are and
the architecture they describe.

The reference's TF2 code (`tf2/run.py`) writes SavedModels and training
checkpoints whose variables sit under the object graph of its Keras 2 model:
`model/resnet_model/...`, `model/_projection_head/...`,
`model/supervised_head/...`. `resolve_source` finds the variables of a path,
`Variables` addresses them by every structural path of that graph (the
SavedModel's `variables/N` keys and the checkpoint's keys alike) and counts
what was used, and `read_architecture` reads depth, width multiplier,
selective kernels, head layers and classes off their shapes.
`simclr_import` builds and fills this package's models from them.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from contrastive_tf.runs.artifacts import ModelSourceError

SK_RATIO = 0.0625  # the published SK models' ratio (and the reference default)
SK_MIN_DIM = 32  # the reference's floor on the selective-kernel attention width
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


class Variables:
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

def indices(source, path, child):
    """Sorted list positions under `path` whose entry has `child`."""
    return sorted(int(name) for name in source.children(path)
                  if name.isdigit() and source.children(f"{path}/{name}") >= {child})


def find_root(source: Variables) -> str:
    for path in sorted(source.key_at, key=len):
        if "/resnet_model/" in f"/{path}":
            return path.split("resnet_model")[0].rstrip("/")
    raise SimCLRImportError("the source has no `resnet_model` (its variables start with "
                            f"{sorted(source.key_at)[:3]}): not a model of the reference "
                            "SimCLR code")


def read_architecture(source: Variables, root: str, head_input: str) -> Architecture:
    base = f"{root}/resnet_model".lstrip("/")
    stem = f"{base}/initial_conv_relu_max_pool"
    convs = indices(source, stem, "conv2d")
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
    selective = bool(indices(source, f"{groups}/0/layers/0/conv_relu_dropblock_layers",
                              "conv2d_0"))
    sk_ratio = SK_RATIO if (deep_stem or selective) else 0.0
    head = f"{root}/_projection_head/linear_layers".lstrip("/")
    layers = indices(source, head, "dense")
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
