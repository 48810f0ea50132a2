import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import contrastive_tf as ct
from contrastive_tf.jobs import visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["a", "b", "c"]


def _check_png(path, size):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        gray = np.asarray(image.convert("L"))
    assert gray.std() > 5  # not blank


def _images(count, channels=1, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (count, 16, 16, channels)).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_view_grid(tmp_path, channels):
    path = visualize.view_grid(_images(3, channels), ct.SimCLRAugmenter(16, seed=0),
                               str(tmp_path / "views.png"), pairs=2)
    _check_png(path, (650, 420))


def test_training_curves(tmp_path):
    history = {"loss": [5.0, 4.0, 3.5], "contrastive_accuracy": [0.1, 0.3, 0.4],
               "learning_rate": [1.0, 0.5, 0.0], "knn": [[10, 0.5], [30, 0.7]],
               "steps_per_point": 10}
    _check_png(visualize.training_curves(history, str(tmp_path / "c.png")), (1400, 320))
    # a run without kNN still draws, saying so
    _check_png(visualize.training_curves({"loss": [1.0]}, str(tmp_path / "d.png")), (1400, 320))


def test_neighbour_grid_and_embedding_map(tmp_path):
    rng = np.random.RandomState(0)
    bank_labels = np.arange(30) % 3
    bank_features = np.eye(3)[bank_labels] + 0.1 * rng.rand(30, 3)
    path = visualize.neighbour_grid(_images(2), bank_labels[:2], _images(30, seed=1),
                                    bank_labels, bank_features[:2], bank_features,
                                    CLASSES, str(tmp_path / "n.png"), neighbours=4)
    _check_png(path, (625, 290))
    path = visualize.embedding_map(bank_features, bank_labels, CLASSES, str(tmp_path / "m.png"))
    _check_png(path, (700, 600))


def test_preview_augment_command(tmp_path):
    out = tmp_path / "views.png"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.preview_augment", "--dataset=embedded",
         "--image_size=28", "--images=2", "--pairs=1", f"--output={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-2000:]
    _check_png(out, (390, 280))


def test_results_table_and_plot(tmp_path):
    results = {"linear_probe": {"0.01": 0.7, "0.1": 0.8, "1.0": 0.85},
               "knn": {"1.0": 0.83}, "simclr_finetune": {"0.01": 0.72, "0.1": 0.84},
               "supervised_baseline": {"0.01": 0.6, "0.1": 0.8},
               "distilled_student": {"0.1": 0.845}}
    table = visualize.results_table(results)
    assert "| simclr_finetune | 72.00% | 84.00% |  |" in table
    path = str(tmp_path / "plot.png")
    assert visualize.plot_label_efficiency(results, path, "test") == path
    from PIL import Image
    with Image.open(path) as image:
        assert image.size == (768, 528)
        assert np.asarray(image.convert("L")).std() > 5  # not blank
