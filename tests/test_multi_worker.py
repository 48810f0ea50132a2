"""Two MultiWorkerMirroredStrategy workers on 127.0.0.1, as the jobs run on
several machines: pretraining and fine-tuning, on a folder (each worker
decodes only its share of every epoch) and on a TFDS set (mocked)."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from tests.testing import start_local_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image_size=16", "--depth=18", "--base_width=4", "--projection_layers=2",
        "--projection_dim=8", "--batch_size=16", "--warmup_epochs=0", "--knn_bank_size=40",
        "--knn_k=5", "--log_images=false", "--strategy=multi_worker"]
FINETUNE = ["--epochs=2", "--min_steps=2", "--batch_size=8", "--strategy=multi_worker"]


def _cluster(args) -> list[str]:
    """Runs `args` on two workers; returns their outputs (both must succeed)."""
    procs = start_local_cluster(args, ROOT, text=True)
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        outputs.append(out)
    for index, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, (index, out[-4000:])
    return outputs


def _folder(root, classes=2, per_class=24):
    rng = np.random.default_rng(0)
    for label in range(classes):
        os.makedirs(os.path.join(root, f"class{label}"), exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 80, (20 + i % 5, 24, 3), dtype=np.uint8)
            image[..., label] += 150  # each class has its own colour
            Image.fromarray(image).save(os.path.join(root, f"class{label}", f"{i}.jpg"))
    return root


@pytest.mark.slow
def test_two_workers_pretrain_and_finetune_on_a_folder(tmp_path):
    folder = _folder(str(tmp_path / "images"))
    run = str(tmp_path / "pretrain")
    outputs = _cluster(["experiments.pretrain", f"--dataset=folder:{folder}",
                        f"--model_dir={run}", "--train_steps=4", "--checkpoint_steps=2",
                        *TINY])
    # 48 images, global batch 16: each worker decodes its 24 files of an epoch.
    for index, out in enumerate(outputs):
        assert f"worker {index} of 2: decodes its 24 files of every epoch" in out, out[-3000:]
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["step"] == 4 and np.isfinite(summary["metrics"]["loss"])
    assert not any(name.startswith("worker_tmp") for name in os.listdir(run))

    tuned = str(tmp_path / "finetune")
    outputs = _cluster(["experiments.finetune", f"--encoder={run}",
                        f"--dataset=folder:{folder}", f"--test_dataset=folder:{folder}",
                        f"--output_dir={tuned}", *FINETUNE])
    assert all("worker" in out and "of 2: decodes its" in out for out in outputs)
    summary = json.load(open(os.path.join(tuned, "summary.json")))
    assert summary["epochs_run"] == 2 and 0 <= summary["test_accuracy"] <= 1
    assert os.path.exists(os.path.join(tuned, "classifier.keras"))
    # The two workers trained one model: both logged the same metrics for the
    # last epoch (the timings on the line differ).
    last = [re.findall(r"(\w+): (-?[\d.]+(?:e-?\d+)?)",
                       [line for line in out.splitlines() if "val_accuracy" in line][-1])
            for out in outputs]
    assert len(last[0]) >= 4 and "val_accuracy" in dict(last[0])
    assert last[0] == last[1]


@pytest.mark.slow
def test_two_workers_pretrain_and_finetune_on_a_tfds_set(tmp_path):
    run = str(tmp_path / "pretrain")
    _cluster(["tests.mocked_job", "pretrain", "--dataset=tfds:mnist", f"--model_dir={run}",
              "--train_steps=3", "--checkpoint_steps=3", *TINY])
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["step"] == 3 and 0 <= summary["metrics"]["knn_accuracy"] <= 1
    tuned = str(tmp_path / "finetune")
    _cluster(["tests.mocked_job", "finetune", f"--encoder={run}", "--dataset=tfds:mnist",
              "--test_dataset=tfds:mnist", f"--output_dir={tuned}", *FINETUNE])
    summary = json.load(open(os.path.join(tuned, "summary.json")))
    assert summary["epochs_run"] == 2 and 0 <= summary["test_accuracy"] <= 1
