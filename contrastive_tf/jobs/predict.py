"""Predictions for a folder or dataset: a CSV of classes, or embeddings.

`run_predict(config)` is what `experiments/predict.py` calls: one CSV row
per image (its file for folders, the class, its probability and the top-k),
and with `config.embeddings` the features h as a .npy file. Images are
converted the way the model's training images were (`data.load_folder`,
`data.conform`); files that cannot be read are skipped, named in a warning
and listed in the CSV with their error.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import tensorflow as tf

from contrastive_tf import data
from contrastive_tf.jobs.config import PredictConfig
from contrastive_tf.method.augment import finetune_augmenter
from contrastive_tf.runs import artifacts
from contrastive_tf.runtime import progress
from contrastive_tf.runtime.files import atomic_open, atomic_path

log = progress.logger("predict")


def _batches(model, images, batch_size):
    preprocess = finetune_augmenter(int(model.input.shape[1]))
    for start in range(0, len(images), batch_size):
        views = preprocess(images[start:start + batch_size], training=False)
        yield tf.cast(model(views, training=False), tf.float32).numpy()


def classifier_rows(probabilities: np.ndarray, names, class_names, top_k: int,
                    truth: np.ndarray | None):
    """CSV header and rows of a classifier's predictions (best class, its
    probability, the top k, and the true class where known); returns
    (header, rows, accuracy or None)."""
    k = min(top_k, probabilities.shape[-1])
    top = np.argsort(-probabilities, axis=1)[:, :k]
    header = ["image", "class_name", "probability", "top_k"]
    rows = [[name, class_names[top[row, 0]], f"{probabilities[row, top[row, 0]]:.6f}",
             ";".join(f"{class_names[c]}:{probabilities[row, c]:.4f}" for c in top[row])]
            for row, name in enumerate(names)]
    if truth is None:
        return header, rows, None
    for row in range(len(rows)):
        rows[row].append(class_names[truth[row]])
    return header + ["label"], rows, float(np.mean(top[:, 0] == truth))


def write_csv(path: str, header: list, rows: list, skipped) -> None:
    """The CSV, atomically, with an `error` column: empty for the images
    read, the reason for the files that could not be (one row each)."""
    rows = [row + [""] for row in rows]
    for problem in skipped:
        file, _, error = problem.partition(" (")
        rows.append([file] + [""] * (len(header) - 1) + [error.rstrip(")")])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header + ["error"])
        writer.writerows(rows)


def run_predict(config: PredictConfig, verbose: int = 1) -> dict:
    """Writes `config.output` (CSV) and optionally `config.embeddings`."""
    kind, model, class_names = artifacts.load_model(config.model)
    if config.embeddings and kind != "encoder":
        raise artifacts.ModelSourceError(f"`embeddings` needs an encoder (a pretraining "
                                         f"run or encoder export); {config.model} is a "
                                         "classifier")
    size, channels = int(model.input.shape[1]), int(model.input.shape[-1])
    source = data.load_images(config.dataset, "test", size, channels, config.data_dir)
    if source.skipped:
        log.warning(f"{config.dataset}: {len(source.skipped)} file(s) could not be read and "
                    f"are listed in {config.output} with their error: "
                    f"{'; '.join(source.skipped)}")
    outputs = np.concatenate(list(_batches(model, source.images, config.batch_size)))
    names = source.paths or [str(i) for i in range(source.num_examples)]
    summary = {"model": config.model, "kind": kind, "dataset": config.dataset,
               "images": source.num_examples, "unreadable": len(source.skipped)}
    if kind == "classifier":
        truth = (data.match_classes(source, tuple(class_names)).labels
                 if source.labelled else None)
        header, rows, accuracy = classifier_rows(tf.nn.softmax(outputs).numpy(), names,
                                                 class_names, config.top_k, truth)
        if accuracy is not None:
            summary["accuracy"] = accuracy
    else:
        header, rows = ["image", "row"], [[name, row] for row, name in enumerate(names)]
    if config.embeddings:
        with atomic_path(config.embeddings) as tmp:
            np.save(tmp, outputs.astype(np.float32))
        summary["embeddings"] = config.embeddings
        log.info(f"embeddings {outputs.shape} -> {config.embeddings}")
    write_csv(config.output, header, rows, source.skipped)
    summary["output"] = config.output
    shown = f", accuracy {summary['accuracy']:.4f}" if "accuracy" in summary else ""
    log.info(f"{source.num_examples} images ({kind} {config.model}){shown} -> {config.output}"
             + (f"; {len(source.skipped)} unreadable file(s) listed with their error"
                if source.skipped else ""))
    return summary
