"""Records what google-research/simclr's own TF2 code computes, for the
importer's tests (tests/fixtures/simclr_reference/*.json.gz) and for checking real
imports by hand.

This runs in a separate virtual environment with the reference code, never in
the project's (it needs tf-keras, the Keras 2 the reference was written for):

    python3.11 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install tensorflow-cpu==2.21.0 tf-keras==2.21.0 \\
        tensorflow-datasets==4.9.10 importlib_resources absl-py
    # the folder tf2/ of github.com/google-research/simclr, e.g. in /tmp/simclr_tf2
    TF_USE_LEGACY_KERAS=1 /tmp/refenv/bin/python -m experiments.simclr_reference \\
        --simclr_tf2=/tmp/simclr_tf2 --fixtures=tests/fixtures/simclr_reference \\
        [--models_dir=/tmp/simclr_models]

For each variant it builds the reference `model.Model` from its flags, gives
every variable a value drawn from its checkpoint key (`seeded_value`, below,
which the tests use to rebuild the same weights), runs a probe batch through
the reference forward pass and writes, per variant, a small JSON: the flags,
the checkpoint keys and shapes of the variables of the reference's SavedModel
(`run.build_saved_model`) and of a training checkpoint
(`tf.train.Checkpoint(model=..., global_step=..., optimizer=...)`, as
`run.try_restore_from_checkpoint` writes), and the reference's
`final_avg_pool`, `logits_sup` and `proj_head_output` on the probe.
With --models_dir the SavedModels (`<dir>/<variant>/saved_model/<step>/`) and
training checkpoints (`<dir>/<variant>/ckpt-1`) are also written, to import by
hand with the real files.

Only numpy and the standard library are imported at module level, so the tests
can import `seeded_value` and `probe_images` without TensorFlow's Keras 2.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import sys
import zlib

import numpy as np

# name -> reference flags. Small enough to run on 2 cores; the variants the
# issue names (ResNet-50 1x SK0/SK1, a 2x width, v1 without projection head,
# pretrained and fine-tuned) plus the basic-block depth for its own layout.
VARIANTS = {
    "r50_1x_sk0_pretrained": dict(resnet_depth=50, width_multiplier=1, sk_ratio=0.0,
                                  train_mode="pretrain", proj_head_mode="nonlinear",
                                  num_proj_layers=3, ft_proj_selector=0, num_classes=10),
    "r50_1x_sk1_pretrained": dict(resnet_depth=50, width_multiplier=1, sk_ratio=0.0625,
                                  train_mode="pretrain", proj_head_mode="nonlinear",
                                  num_proj_layers=3, ft_proj_selector=0, num_classes=10),
    "r50_1x_sk1_finetuned": dict(resnet_depth=50, width_multiplier=1, sk_ratio=0.0625,
                                 train_mode="finetune", proj_head_mode="nonlinear",
                                 num_proj_layers=3, ft_proj_selector=1, num_classes=10),
    "r50_2x_sk1_finetuned": dict(resnet_depth=50, width_multiplier=2, sk_ratio=0.0625,
                                 train_mode="finetune", proj_head_mode="nonlinear",
                                 num_proj_layers=3, ft_proj_selector=1, num_classes=10),
    # SimCLRv1 as released: the reference's TF2 code cannot build a model
    # without a projection head (proj_head_mode=none fails in model.Model), so
    # it is built with v1's 2-layer head, saved without the head's outputs (as
    # the v1 releases), and the tests drop the head's variables (h and the
    # logits on h do not depend on them).
    "r50_1x_v1": dict(resnet_depth=50, width_multiplier=1, sk_ratio=0.0,
                      train_mode="pretrain", proj_head_mode="nonlinear",
                      num_proj_layers=2, ft_proj_selector=0, num_classes=10),
    "r18_1x_sk1_pretrained": dict(resnet_depth=18, width_multiplier=1, sk_ratio=0.0625,
                                  train_mode="pretrain", proj_head_mode="nonlinear",
                                  num_proj_layers=2, ft_proj_selector=0, num_classes=10),
}
PROBE_SHAPE = (2, 72, 88, 3)  # odd sizes appear in the last stages: 9x11 -> 5x6 -> 3x3


def probe_images() -> np.ndarray:
    """The probe batch: float images in [0, 1]."""
    return np.random.default_rng(2024).uniform(size=PROBE_SHAPE).astype(np.float32)


def seeded_value(key: str, shape) -> np.ndarray:
    """The value of the variable stored under checkpoint `key`: drawn from
    the key alone, of a scale that keeps a deep ResNet's activations finite."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    shape = tuple(int(s) for s in shape)
    leaf = key.split("/.ATTRIBUTES")[0].rsplit("/", 1)[-1]
    if leaf == "kernel":
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        value = rng.normal(0.0, np.sqrt(1.0 / fan_in), shape)
    elif leaf in ("gamma", "moving_variance"):
        value = rng.uniform(0.5, 1.5, shape)
    elif leaf in ("beta", "moving_mean", "bias"):
        value = rng.normal(0.0, 0.2, shape)
    else:
        value = rng.normal(0.0, 0.1, shape)
    return value.astype(np.float32)


def _resolve(root, key):
    """The object at checkpoint `key` (attribute names and list indices)."""
    obj = root
    for part in key.split("/.ATTRIBUTES")[0].split("/"):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _keys(prefix, tf):
    return {name: list(shape) for name, shape in tf.train.list_variables(prefix)
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _variant(name, settings, simclr_tf2, fixtures, models_dir, tf, flags, model_lib, run):
    import tempfile
    flags.FLAGS.unparse_flags()
    argv = ["reference", "--image_size=224", "--proj_out_dim=128",
            "--lineareval_while_pretraining=true", "--global_bn=false",
            "--batch_norm_decay=0.9", "--fine_tune_after_block=-1"]
    argv += [f"--{k}={v}" for k, v in settings.items() if k != "num_classes"]
    v1 = name.endswith("_v1")
    flags.FLAGS(argv)
    # The reference's SavedModel finds its outputs by graph names ("resnet/..."),
    # which a second model in the same session would not get.
    tf.keras.backend.clear_session()
    model = model_lib.Model(settings["num_classes"])
    images = probe_images()
    model(tf.constant(images), training=False)

    scratch = tempfile.mkdtemp()
    keys = _keys(tf.train.Checkpoint(model=model).save(os.path.join(scratch, "k")), tf)
    for key, shape in keys.items():
        _resolve(tf.train.Checkpoint(model=model), key).assign(seeded_value(key, shape))
    projection, logits = model(tf.constant(images), training=False)
    hiddens = model.resnet_model(tf.constant(images), training=False)

    # A training checkpoint as the reference writes it: model, step and the
    # optimizer with its slots (one step at learning rate 0 changes nothing).
    optimizer = model_lib.build_optimizer(0.0)
    with tf.GradientTape() as tape:
        _, out = model(tf.constant(images), training=False)
        loss = tf.reduce_sum(out) if out is not None else tf.reduce_sum(
            model(tf.constant(images), training=False)[0])
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients([(g if g is not None else tf.zeros_like(v), v)
                               for g, v in zip(grads, model.trainable_variables)])
    step = tf.Variable(1, dtype=tf.int64)
    target = os.path.join(models_dir, name) if models_dir else scratch
    os.makedirs(target, exist_ok=True)
    prefix = tf.train.Checkpoint(model=model, global_step=step, optimizer=optimizer).save(
        os.path.join(target, "ckpt"))
    saved = run.build_saved_model(
        model, include_projection_head=not v1)
    export = os.path.join(target, "saved_model", "1")
    tf.saved_model.save(saved, export)
    check = tf.saved_model.load(export)(tf.constant(images), trainable=False)
    assert np.allclose(check["final_avg_pool"].numpy(), hiddens.numpy(), atol=1e-5), name

    record = {
        "variant": name,
        "flags": settings,
        "without_projection_head": v1,
        "probe_shape": list(PROBE_SHAPE),
        "saved_model_keys": _keys(os.path.join(export, "variables", "variables"), tf),
        # The SavedModel's object graph as written (with Keras 2's alias edges:
        # variables/N, layers/N, keras_api, ...), gzip + base64.
        "saved_model_object_graph": base64.b64encode(gzip.compress(
            tf.train.load_checkpoint(os.path.join(export, "variables", "variables")).get_tensor(
                "_CHECKPOINTABLE_OBJECT_GRAPH"), mtime=0)).decode(),
        "checkpoint_keys": _keys(prefix, tf),
        "final_avg_pool": hiddens.numpy().tolist(),
        "logits_sup": None if logits is None else logits.numpy().tolist(),
        "proj_head_output": None if projection is None else projection.numpy().tolist(),
        "reference": "github.com/google-research/simclr tf2/ (model.Model, run.build_saved_model)",
    }
    os.makedirs(fixtures, exist_ok=True)
    path = os.path.join(fixtures, f"{name}.json.gz")
    with gzip.open(path + ".tmp", "wt") as handle:
        json.dump(record, handle, separators=(",", ":"))
    os.replace(path + ".tmp", path)
    print(f"{name}: {len(record['saved_model_keys'])} SavedModel variables, "
          f"{len(record['checkpoint_keys'])} checkpoint entries, "
          f"max |h| {np.abs(hiddens.numpy()).max():.3g} -> {path}", flush=True)


def main(argv):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--simclr_tf2", required=True,
                        help="the tf2/ folder of google-research/simclr")
    parser.add_argument("--fixtures", required=True)
    parser.add_argument("--models_dir", default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.simclr_tf2))
    import tensorflow.compat.v2 as tf  # the reference's Keras 2 (TF_USE_LEGACY_KERAS=1)
    from absl import flags
    import model as model_lib  # the reference's
    import run  # the reference's; defines its flags
    for name in args.variants.split(","):
        _variant(name, VARIANTS[name], args.simclr_tf2, args.fixtures, args.models_dir,
                 tf, flags, model_lib, run)


if __name__ == "__main__":
    main(sys.argv[1:])
