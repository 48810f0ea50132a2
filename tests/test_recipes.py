"""Every shipped recipe flag file starts and trains a few steps.

The recipes' datasets are not on this machine (ImageNet, STL-10, CIFAR-10
need preparing), so TFDS is mocked: `tfds.testing.mock_data` serves random
images of the datasets' own shapes (ImageNet's vary in size from image to
image, which the streaming input path must resize). Each run keeps the
recipe's flags and shrinks only the cost: a narrow network, a small batch
and two steps.
"""

import glob
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.basename(p) for p in glob.glob(
    os.path.join(ROOT, "experiments", "configs", "*.flags"))
    if not p.endswith("_pipeline.flags"))
SHRINK = ["--train_steps=2", "--batch_size=8", "--base_width=4", "--knn_bank_size=200"]


def _config(recipe, model_dir):
    from absl import flags
    from experiments import jobs, pretrain  # noqa: F401  (defines the flags)
    from contrastive_tf.jobs.config import PretrainConfig
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["pretrain", f"--flagfile=experiments/configs/{recipe}",
                 f"--model_dir={model_dir}", *SHRINK])
    return jobs.config_from_flags(PretrainConfig)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_starts_and_trains(recipe, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds
    from contrastive_tf import data
    from contrastive_tf.jobs import pretrain

    monkeypatch.chdir(ROOT)
    config = _config(recipe, str(tmp_path / "run"))
    # Mocked TFDS sets are "prepared" by definition: skip the on-disk check.
    load_tfds = data.load_tfds
    monkeypatch.setattr(data, "load_tfds", lambda name, split="train", data_dir=None,
                        download=False: load_tfds(name, split, data_dir, True))
    with tfds.testing.mock_data(num_examples=24):
        summary = pretrain.pretrain(config, verbose=0)
    assert summary["step"] == 2
    assert np.isfinite(summary["metrics"]["loss"])


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
