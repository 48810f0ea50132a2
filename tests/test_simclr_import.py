"""The import of google-research/simclr's TF2 models, against that code's own
forward pass.

tests/fixtures/simclr_reference/*.json.gz were written by the reference code
itself (experiments/simclr_reference.py, run with tf-keras in its own
virtual environment): for each variant, the checkpoint keys and shapes of its
training checkpoint and SavedModel (with the SavedModel's object graph), and
the reference's final_avg_pool / logits_sup / proj_head_output on a probe
batch, for weights drawn from each variable's key (`seeded_value`). Here the
same weights are written under the same keys (and object graph) and
imported; the imported float32 models must reproduce the reference's
outputs to 1e-4 of the largest value.
"""

import base64
import glob
import gzip
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

import contrastive_tf as ct
from contrastive_tf.runs.simclr_import import SimCLRImportError
from experiments.simclr_reference import probe_images, seeded_value

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "simclr_reference")
GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"


def _fixture(name):
    with gzip.open(os.path.join(FIXTURES, f"{name}.json.gz"), "rt") as handle:
        return json.load(handle)


def _value(key, shape):
    if "/.OPTIMIZER_SLOT/" in key or not key.startswith("model/"):
        return np.zeros(shape, np.float32 if shape else np.int64)
    return seeded_value(key, shape)


def _graph_from_keys(keys):
    """An object graph whose structure is the keys' paths (as a training
    checkpoint of the reference writes it: structural edges only)."""
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.nodes.add()
    index = {"": 0}
    for key in keys:
        if "/.OPTIMIZER_SLOT/" in key or not key.endswith(VALUE):
            continue
        path = key[:-len(VALUE)]
        parent = ""
        for part in path.split("/"):
            here = f"{parent}/{part}".lstrip("/")
            if here not in index:
                index[here] = len(graph.nodes)
                graph.nodes.add()
                child = graph.nodes[index[parent]].children.add()
                child.node_id, child.local_name = index[here], part
            parent = here
        attribute = graph.nodes[index[path]].attributes.add()
        attribute.name, attribute.checkpoint_key = "VARIABLE_VALUE", key
    return graph.SerializeToString()


def _write(prefix, keys, graph_bytes, drop=()):
    """A TF checkpoint holding exactly `keys` (seeded values) and the graph."""
    names, tensors = [], []
    for key, shape in sorted(keys.items()):
        if any(key.startswith(d) for d in drop):
            continue
        names.append(key)
        tensors.append(tf.constant(_value(key, shape)))
    names.append(GRAPH)
    tensors.append(tf.constant(graph_bytes))
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=tensors)
    return prefix


def _checkpoint(tmp_path, name, drop=()):
    record = _fixture(name)
    keys = {k: v for k, v in record["checkpoint_keys"].items()}
    if drop:  # the structural graph must not name what was dropped either
        keys = {k: v for k, v in keys.items() if not any(k.startswith(d) for d in drop)}
    os.makedirs(tmp_path / name, exist_ok=True)
    prefix = _write(str(tmp_path / name / "ckpt-7"), keys, _graph_from_keys(keys))
    with open(tmp_path / name / "checkpoint", "w") as handle:
        handle.write('model_checkpoint_path: "ckpt-7"\nall_model_checkpoint_paths: "ckpt-7"\n')
    return record, prefix


def _structural_keys(graph_bytes, wanted):
    """SavedModel key -> the training-checkpoint key of the same variable:
    the route through the object graph that is one of `wanted`."""
    graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(graph_bytes)
    found, stack, seen = {}, [(0, "")], set()
    while stack:
        index, path = stack.pop()
        if (index, path) in seen or path.count("/") > 14:
            continue
        seen.add((index, path))
        for attribute in graph.nodes[index].attributes:
            if attribute.name == "VARIABLE_VALUE" and path + VALUE in wanted:
                found[attribute.checkpoint_key] = path + VALUE
        for child in graph.nodes[index].children:
            if child.local_name not in ("variables", "trainable_variables", "keras_api",
                                        "non_trainable_variables", "trainable_variables_list"):
                stack.append((child.node_id, f"{path}/{child.local_name}".lstrip("/")))
    return found


def _saved_model(tmp_path, name):
    """The SavedModel's variables file as the reference wrote it: its keys
    (variables/N aliases) and its own object graph, each variable holding the
    value seeded by its training-checkpoint key (what the reference ran
    with). The graph (saved_model.pb) is not reproduced, so these imports run
    with check=False."""
    record = _fixture(name)
    graph = gzip.decompress(base64.b64decode(record["saved_model_object_graph"]))
    structural = _structural_keys(graph, set(record["checkpoint_keys"]))
    assert set(structural) == set(record["saved_model_keys"])
    folder = tmp_path / "saved_model" / "1234"
    os.makedirs(folder / "variables")
    names = sorted(record["saved_model_keys"])
    tensors = [tf.constant(seeded_value(structural[k], record["saved_model_keys"][k]))
               for k in names]
    tf.raw_ops.SaveV2(prefix=str(folder / "variables" / "variables"),
                      tensor_names=names + [GRAPH], shape_and_slices=[""] * (len(names) + 1),
                      tensors=tensors + [tf.constant(graph)])
    (folder / "saved_model.pb").write_bytes(b"")  # the layout; its graph is not read here
    return record, str(tmp_path / "saved_model")


def _close(mine, theirs):
    theirs = np.asarray(theirs, np.float32)
    difference = np.max(np.abs(np.asarray(mine) - theirs))
    assert difference < 1e-4 * np.max(np.abs(theirs)), (difference, np.max(np.abs(theirs)))


VARIANTS = sorted(os.path.basename(p)[:-len(".json.gz")]
                  for p in glob.glob(os.path.join(FIXTURES, "*.json.gz")))


def test_fixtures_cover_the_variants_the_issue_names():
    assert {"r50_1x_sk0_pretrained", "r50_1x_sk1_pretrained", "r50_1x_sk1_finetuned",
            "r50_2x_sk1_finetuned", "r50_1x_v1", "r18_1x_sk1_pretrained"} <= set(VARIANTS)


@pytest.mark.parametrize("name", [v for v in VARIANTS if not v.startswith("r50_2x")])
def test_checkpoint_import_reproduces_the_reference(tmp_path, name):
    v1 = name.endswith("_v1")
    record, prefix = _checkpoint(tmp_path, name, drop=("model/_projection_head",) if v1 else ())
    imported = ct.import_simclr(prefix, image_size=None)
    flags = record["flags"]
    arch = imported.architecture
    assert (arch.depth, arch.width_multiplier, arch.sk_ratio > 0) == (
        flags["resnet_depth"], flags["width_multiplier"], flags["sk_ratio"] > 0)
    assert arch.num_classes == flags["num_classes"]
    images = probe_images()
    _close(imported.encoder(images), record["final_avg_pool"])
    if v1:
        assert imported.projection_head is None and arch.projection_layers == 0
    else:
        assert arch.projection_layers == flags["num_proj_layers"]
    if not v1 and record["proj_head_output"] is not None:  # fine-tuned: the reference returns no z
        _close(imported.projection_head(imported.encoder(images)), record["proj_head_output"])
    # A checkpoint cannot tell whether the supervised head reads h or the head's
    # first layer when both are as wide: the default is h; the fine-tuned
    # variants (ft_proj_selector=1) say so.
    head_input = "hidden1" if flags["ft_proj_selector"] == 1 else "h"
    if head_input != arch.head_input:
        imported = ct.import_simclr(prefix, image_size=None, head_input=head_input)
    _close(imported.classifier(images), record["logits_sup"])
    written = [k for k in record["checkpoint_keys"]
               if not (v1 and k.startswith("model/_projection_head"))]
    assert imported.skipped["optimizer slots"] == sum("/.OPTIMIZER_SLOT/" in k for k in written)
    assert imported.check == {"compared": False,
                              "why": "a training checkpoint holds no forward pass to compare "
                                     "with"}
    assert sorted(imported.skipped) == ["optimizer slots", "optimizer state", "step counters"]


@pytest.mark.slow
def test_checkpoint_import_of_a_2x_width(tmp_path):
    record, prefix = _checkpoint(tmp_path, "r50_2x_sk1_finetuned")
    imported = ct.import_simclr(prefix, image_size=None, head_input="hidden1")
    assert imported.architecture.width_multiplier == 2
    images = probe_images()
    _close(imported.encoder(images), record["final_avg_pool"])
    _close(imported.classifier(images), record["logits_sup"])


@pytest.mark.parametrize("name", ["r18_1x_sk1_pretrained", "r50_1x_sk1_finetuned"])
def test_saved_model_variables_through_their_own_object_graph(tmp_path, name):
    """The SavedModel names its variables model/resnet_model/variables/N; the
    structure comes from its object graph, aliases and all."""
    record, folder = _saved_model(tmp_path, name)
    head_input = "hidden1" if record["flags"]["ft_proj_selector"] == 1 else "h"
    imported = ct.import_simclr(folder, image_size=None, head_input=head_input, check=False)
    assert imported.source.endswith("1234") and imported.source_kind == "saved_model"
    assert imported.skipped == {}
    images = probe_images()
    _close(imported.encoder(images), record["final_avg_pool"])
    _close(imported.classifier(images), record["logits_sup"])


def test_an_extra_variable_is_named(tmp_path):
    record = _fixture("r18_1x_sk1_pretrained")
    keys = dict(record["checkpoint_keys"])
    keys["model/resnet_model/extra_layer/kernel" + VALUE] = [3, 3]
    prefix = _write(str(tmp_path / "ckpt-1"), keys, _graph_from_keys(keys))
    with pytest.raises(SimCLRImportError, match="1 variable.*extra_layer/kernel"):
        ct.import_simclr(prefix, image_size=None)


def test_a_wrong_shape_is_named(tmp_path):
    record = _fixture("r18_1x_sk1_pretrained")
    keys = dict(record["checkpoint_keys"])
    key = ("model/resnet_model/block_groups/1/layers/1/conv2d_bn_layers/0/conv2d/kernel"
           + VALUE)
    assert key in keys
    keys[key] = [3, 3, 128, 64]
    prefix = _write(str(tmp_path / "ckpt-1"), keys, _graph_from_keys(keys))
    with pytest.raises(SimCLRImportError, match=r"block_groups/1/layers/1/conv2d_bn_layers/0: "
                                                r"shape \(3, 3, 128, 64\) in the source"):
        ct.import_simclr(prefix, image_size=None)


def test_sources_that_are_not_reference_models(tmp_path):
    with pytest.raises(SimCLRImportError, match="does not exist"):
        ct.import_simclr(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(SimCLRImportError, match="no SavedModel.*found: notes.txt"):
        ct.import_simclr(str(tmp_path / "empty"))
    other = tf.train.Checkpoint(net=tf.Module())
    other.net.w = tf.Variable(tf.zeros([2]))
    prefix = other.write(str(tmp_path / "other" / "ckpt"))
    with pytest.raises(SimCLRImportError, match="no `resnet_model`"):
        ct.import_simclr(prefix)


@pytest.mark.slow
def test_the_job_writes_runs_the_other_jobs_take(tmp_path):
    from contrastive_tf.jobs.config import ImportConfig
    from contrastive_tf.jobs.import_simclr import run_import
    from contrastive_tf.runs import artifacts
    record, prefix = _checkpoint(tmp_path, "r18_1x_sk1_pretrained")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    out = str(tmp_path / "imported")
    summary = run_import(ImportConfig(source=str(tmp_path / "r18_1x_sk1_pretrained"),
                                      output_dir=out, image_size=64, class_names=str(names)),
                         verbose=0)
    assert summary["architecture"]["name"] == "r18_1x_sk1" and summary["source_kind"] == \
        "checkpoint"
    assert summary["source"].endswith("ckpt-7")
    pretrained = artifacts.load_pretrained(os.path.join(out, "encoder"))
    assert pretrained.image_size == 64 and pretrained.head.ft_layer == 1
    classifier, class_names = artifacts.load_classifier(os.path.join(out, "classifier"))
    assert class_names[3] == "class 3"
    # The saved classifier is the reference's at 64 px: crop the probe to 64.
    images = probe_images()[:, 4:68, 12:76]
    theirs = ct.import_simclr(prefix, image_size=64).classifier(images)
    np.testing.assert_allclose(classifier(images), theirs, atol=1e-5)
    assert json.load(open(os.path.join(out, "summary.json")))["skipped"]["optimizer slots"] > 50
