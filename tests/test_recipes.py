"""Every shipped recipe flag file starts and trains a few steps, as its job.

The recipes' datasets are not on this machine (ImageNet, STL-10, CIFAR-10
need preparing), so TFDS is mocked: `tfds.testing.mock_data` serves random
images of the datasets' own shapes (ImageNet's vary in size from image to
image, which the streaming input path must resize). Each run is the
pretraining job in a fresh process, as a one-worker
MultiWorkerMirroredStrategy cluster (the strategy the big recipes are meant
for; it must be made before anything starts TensorFlow's runtime), keeps
the recipe's flags and shrinks only the cost: a narrow network, a small
batch and two steps. What the recipe asks for must be what the run did.
"""

import glob
import json
import os
import shlex
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.basename(p) for p in glob.glob(
    os.path.join(ROOT, "experiments", "configs", "*.flags"))
    if not p.endswith("_pipeline.flags"))
SHRINK = ["--train_steps=2", "--batch_size=8", "--base_width=4", "--knn_bank_size=200"]

# The pretraining job with TFDS mocked (mocked sets count as prepared).
_DRIVER = """
import sys
import tensorflow_datasets as tfds
from absl import app
from contrastive_tf.data import builtin, loading
real = builtin.load_tfds
def prepared(name, split="train", data_dir=None, download=False):
    return real(name, split, data_dir, True)
builtin.load_tfds = loading.load_tfds = prepared
from experiments import pretrain
with tfds.testing.mock_data(num_examples=24):
    app.run(pretrain.main, argv=["pretrain", *sys.argv[1:]])
"""


def _recipe_flags(recipe) -> dict:
    """The flags a recipe file sets, as the values config.json records."""
    values = {}
    for line in open(os.path.join(ROOT, "experiments", "configs", recipe)):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, _, value = line[2:].partition("=")
        if not _:
            name, value = (name[2:], False) if name.startswith("no") else (name, True)
        values[name] = value
    return values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_as_a_multi_worker_job(recipe, tmp_path):
    model_dir = tmp_path / "run"
    cluster = {"cluster": {"worker": [f"127.0.0.1:{_free_port()}"]},
               "task": {"type": "worker", "index": 0}}
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
               TF_CONFIG=json.dumps(cluster))
    command = [sys.executable, "-c", _DRIVER, f"--flagfile=experiments/configs/{recipe}",
               f"--model_dir={model_dir}", "--strategy=multi_worker", *SHRINK]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (shlex.join(command), result.stdout[-2000:],
                                    result.stderr[-3000:])
    summary = json.load(open(model_dir / "summary.json"))
    assert summary["step"] == 2 and np.isfinite(summary["metrics"]["loss"])
    # Every recipe's dataset is labelled with a held-out split: the kNN
    # monitor measures, also on streaming (TFDS) sets.
    assert 0 <= summary["metrics"]["knn_accuracy"] <= 1
    # Nothing the recipe sets is dropped or overridden, but the shrunk cost.
    recorded = json.load(open(model_dir / "config.json"))
    shrunk = {flag.split("=")[0][2:] for flag in SHRINK}
    for name, value in _recipe_flags(recipe).items():
        if name in shrunk:
            continue
        kept = recorded[name]
        expected = type(kept)(value) if not isinstance(kept, bool) else value
        assert kept == expected, f"{recipe}: --{name}={value} ran as {kept!r}"
    assert recorded["strategy"] == "multi_worker"


def test_streaming_source_of_varied_image_sizes_is_resized():
    import tensorflow_datasets as tfds
    from contrastive_tf import data

    with tfds.testing.mock_data(num_examples=12):
        source = data.load_tfds("imagenet2012", "train", download=True)
        shapes = {tuple(x.shape) for x, _ in source.dataset.take(6)}
        assert len(shapes) > 1  # the mock's images differ in size
        stream = data.training_stream(source, 4, image_size=24, with_labels=True)
        images, labels = next(iter(stream))
    assert images.shape == (4, 24, 24, 3) and images.dtype == "uint8"
    assert labels.shape == (4,)


def test_square_resize_matches_the_folder_loader(tmp_path):
    # Streaming sources and folders convert an image the same way: central
    # square, bicubic resize (Pillow's ImageOps.fit as the reference).
    from PIL import Image
    from contrastive_tf import data

    rng = np.random.RandomState(0)
    image = (rng.rand(30, 50, 3) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    expected = data.load_folder(str(tmp_path), 20).images[0].astype(float)
    got = data.square_resize(image, 20).numpy().astype(float)
    assert np.mean(np.abs(got - expected)) < 3.0  # bicubic kernels differ slightly
