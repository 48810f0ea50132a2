"""Predictions for a folder or dataset: a CSV of classes, or embeddings.

`run_predict(config)` is what `experiments/predict.py` calls: one CSV row
per image (its file for folders, the class, its probability and the top-k),
and with `config.embeddings` the features h as a .npy file. Images stream
through in order, `CHUNK` at a time, and rows are written as they are
computed (memory does not grow with the folder); a folder's files are
decoded as the model's training images were (their central square at the
model's size); files that cannot be read are skipped, named in a warning
and listed at the end of the CSV with their error. Both files appear
(atomically) when the job ends.
"""

from __future__ import annotations

import csv
import os
import time

import keras
import numpy as np
import tensorflow as tf

from contrastive_tf import data
from contrastive_tf.jobs.config import PredictConfig
from contrastive_tf.method.augment import finetune_augmenter
from contrastive_tf.runs import artifacts
from contrastive_tf.runtime import distribution, precision, progress
from contrastive_tf.runtime.files import atomic_open, atomic_path

log = progress.logger("predict")

# Images predicted per model.predict call (and held at once).
CHUNK = 4096


def _inference(model: keras.Model) -> keras.Model:
    """uint8 images -> the model's outputs, with the evaluation preprocessing."""
    shape = tuple(model.input.shape[1:])
    images = keras.Input(shape, dtype="uint8", name="images")
    return keras.Model(images, model(finetune_augmenter(shape[0])(images, training=False)))


def _chunks(source: data.Source, batch_size: int):
    """(images, row indices, labels or None) of `source`, in order, at most
    `CHUNK` images at a time."""
    if source.streams_files:
        batches = data.eval_stream(source, batch_size, with_labels=source.labelled,
                                   with_index=True)
    else:
        source = data.to_memory(source, source.image_shape[0])
        parts = ((source.images, source.labels) if source.labelled else (source.images,))
        batches = tf.data.Dataset.from_tensor_slices(
            (*parts, tf.range(source.num_examples, dtype=tf.int64))).batch(batch_size)
    held = []
    for batch in batches.as_numpy_iterator():
        held.append(batch)
        if sum(len(b[0]) for b in held) >= CHUNK:
            yield _joined(held, source.labelled)
            held = []
    if held:
        yield _joined(held, source.labelled)


def _joined(batches, labelled: bool):
    images = np.concatenate([b[0] for b in batches])
    index = np.concatenate([b[-1] for b in batches])
    labels = np.concatenate([b[1] for b in batches]) if labelled else None
    return images, index, labels


class _NpyRows:
    """A .npy file of float32 rows written as they come: raw rows go to a
    temporary file; `finish` writes the .npy (header with the final row
    count, then the rows) atomically onto `path`."""

    def __init__(self, path: str):
        self.path, self.rows, self.width = path, 0, None
        self.raw_path = path + f".rows-{os.getpid()}"
        self.raw = open(self.raw_path, "wb")

    def add(self, rows: np.ndarray) -> None:
        self.width = rows.shape[1]
        self.raw.write(np.ascontiguousarray(rows, np.float32).tobytes())
        self.rows += len(rows)

    def finish(self) -> None:
        self.raw.close()
        with atomic_path(self.path) as tmp, open(tmp, "wb") as out, \
                open(self.raw_path, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, {
                "descr": "<f4", "fortran_order": False, "shape": (self.rows, self.width or 0)})
            while block := raw.read(1 << 24):
                out.write(block)
        os.remove(self.raw_path)

    def discard(self) -> None:
        self.raw.close()
        if os.path.exists(self.raw_path):
            os.remove(self.raw_path)


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


def run_predict(config: PredictConfig, verbose: int = 1) -> dict:
    """Writes `config.output` (CSV) and optionally `config.embeddings`."""
    if config.strategy == "multi_worker":
        raise ValueError("predict writes one ordered CSV: run it on one machine (strategy "
                         "'mirrored' uses all of its GPUs)")
    started = time.time()
    strategy = distribution.make_strategy(config.strategy)
    choice = precision.resolve(config.precision)
    with strategy.scope():
        kind, model, class_names = artifacts.load_model(config.model)
        precision.recast(model, choice.policy)
        with precision.policy_scope(choice.policy):
            inference = _inference(model)
    if config.embeddings and kind != "encoder":
        raise artifacts.ModelSourceError(f"`embeddings` needs an encoder (a pretraining "
                                         f"run or encoder export); {config.model} is a "
                                         "classifier")
    size, channels = int(model.input.shape[1]), int(model.input.shape[-1])
    source = data.load_images(config.dataset, "test", size, channels, config.data_dir)
    if source.labelled and kind == "classifier":
        source = data.match_classes(source, tuple(class_names))
    names = source.paths or [str(i) for i in range(source.num_examples)]
    if kind == "classifier":
        header = (["image", "class_name", "probability", "top_k"]
                  + (["label"] if source.labelled else []))
    else:
        header = ["image", "row"]
    log.info(f"{source.num_examples} images of {config.dataset} through the {kind} "
             f"{config.model} ({choice.policy}), {CHUNK} at a time")
    embeddings = _NpyRows(config.embeddings) if config.embeddings else None
    os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
    done, correct, labelled_rows = 0, 0, 0
    try:
        with atomic_open(config.output, newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header + ["error"])
            for images, index, labels in _chunks(source, config.batch_size):
                outputs = np.asarray(inference.predict(images, batch_size=config.batch_size,
                                                       verbose=0), np.float32)
                chunk_names = [names[i] for i in index]
                if kind == "classifier":
                    _, rows, accuracy = classifier_rows(
                        tf.nn.softmax(outputs).numpy(), chunk_names, class_names,
                        config.top_k, labels)
                    if accuracy is not None:
                        correct += round(accuracy * len(rows))
                        labelled_rows += len(rows)
                else:
                    rows = [[name, done + row] for row, name in enumerate(chunk_names)]
                if embeddings is not None:
                    embeddings.add(outputs)
                writer.writerows(row + [""] for row in rows)
                done += len(rows)
                if verbose and source.num_examples > CHUNK:
                    log.info(f"{done}/{source.num_examples} images "
                             f"({time.time() - started:.0f} s)")
            ours = set(names)
            skipped = {path: problem for path, problem in data.SKIPPED.items().items()
                       if path in ours}
            skipped.update({p.partition(" (")[0]: p.partition(" (")[2].rstrip(")")
                            for p in source.skipped})
            for path, problem in sorted(skipped.items()):
                writer.writerow([path] + [""] * (len(header) - 1) + [problem])
        if embeddings is not None:
            embeddings.finish()
    except BaseException:
        if embeddings is not None:
            embeddings.discard()
        raise
    note = data.conversion_note(source, done) if source.streams_files else None
    if note:
        log.info(note)
    summary = {"model": config.model, "kind": kind, "dataset": config.dataset,
               "images": done, "unreadable": len(skipped), "precision": choice.policy,
               "output": config.output, "wall_s": round(time.time() - started, 1)}
    if labelled_rows:
        summary["accuracy"] = correct / labelled_rows
    if config.embeddings:
        summary["embeddings"] = config.embeddings
        log.info(f"embeddings ({done}, {embeddings.width}) -> {config.embeddings}")
    shown = f", accuracy {summary['accuracy']:.4f}" if "accuracy" in summary else ""
    log.info(f"{done} images ({kind} {config.model}){shown} -> {config.output}"
             + (f"; {len(skipped)} unreadable file(s) listed with their error"
                if skipped else "") + f" ({summary['wall_s']} s)")
    return summary
