"""The README's Python examples run as written."""

import os
import re

import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "README.md")


def _python_blocks():
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.slow
def test_model_fit_example_runs():
    block = next(b for b in _python_blocks() if "model.fit" in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    history = namespace["model"].history.history
    assert np.isfinite(history["loss"][-1])
    assert namespace["features"].shape == (256, 128)


def test_own_images_example_runs(tmp_path):
    from PIL import Image
    block = next(b for b in _python_blocks() if "folder:" in b)
    for label in ("a", "b"):
        os.makedirs(tmp_path / label)
        for i in range(5):
            Image.new("RGB", (40, 30), (i * 40, 10, 200)).save(tmp_path / label / f"{i}.png")
    code = block.replace("/path/to/photos", str(tmp_path)).replace("batch_size=256", "batch_size=4")
    namespace = {"ct": __import__("contrastive_tf")}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["train"].images.shape == (8, 96, 96, 3)
    assert namespace["test"].num_examples == 2
