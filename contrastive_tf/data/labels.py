"""Class-balanced label subsets (the 1% / 10% of the benchmark protocol),
the JSON record of which images were chosen, a validation part carved out
of a labelled set, and labels renumbered to a model's class names."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from contrastive_tf.data.source import DataError, Source
from contrastive_tf.runtime.files import write_json


def class_balanced_indices(labels, fraction: float | None = None,
                           per_class: int | None = None,
                           seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced subset, the same for the same seed.

    Give `fraction` (e.g. 0.01, 0.1: that share of each class, at least one)
    or `per_class` (a count per class).
    """
    labels = np.asarray(labels)
    if (fraction is None) == (per_class is None):
        raise ValueError("Give exactly one of fraction and per_class. "
                         f"Received: fraction={fraction}, per_class={per_class}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"Expected 0 < fraction <= 1. Received: fraction={fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"Expected per_class >= 1. Received: per_class={per_class}")
    rng = np.random.RandomState(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = (per_class if per_class is not None
                 else max(1, int(round(fraction * len(members)))))
        if count > len(members):
            raise ValueError(f"Class {label} has {len(members)} examples, "
                             f"fewer than per_class={count}")
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen))


def write_indices(path: str, indices, **metadata) -> None:
    """Writes chosen indices (and how they were chosen) as JSON, atomically."""
    body = dict(metadata, count=int(len(indices)),
                indices=[int(i) for i in indices])
    body["sha256"] = hashlib.sha256(
        np.asarray(indices, np.int64).tobytes()).hexdigest()
    write_json(path, body, indent=None)


def validation_split(source: Source, fraction: float,
                     seed: int = 0) -> tuple[Source, Source, str]:
    """Carves a class-balanced validation part out of a labelled set, for
    model selection: round(fraction x n) images of each class, at least one,
    and at least one left to train on. Returns (train, val, a sentence
    saying what was done)."""
    if not source.labelled:
        raise DataError(f"{source.spec}: fine-tuning needs labels (class subfolders)")
    if not 0 < fraction < 1:
        raise ValueError(f"Expected 0 < val_fraction < 1. Received: val_fraction={fraction}")
    counts = np.bincount(source.labels, minlength=source.num_classes)
    few = [f"{source.class_names[c]!r} ({counts[c]})" for c in range(source.num_classes)
           if counts[c] < 2]
    if few:
        raise DataError(
            f"{source.spec}: every class needs at least 2 labelled images (one to train on, "
            f"one to validate); these have fewer: {', '.join(few)}")
    rng = np.random.RandomState(seed)
    val_index = []
    for label in range(source.num_classes):
        members = np.flatnonzero(source.labels == label)
        take = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        val_index.append(rng.permutation(members)[:take])
    val_index = np.sort(np.concatenate(val_index))
    train_index = np.setdiff1d(np.arange(source.num_examples), val_index)
    per_class = np.bincount(source.labels[val_index], minlength=source.num_classes)
    note = (f"validation: {len(val_index)} of the {source.num_examples} labelled images "
            f"({per_class.min()}-{per_class.max()} per class), training: {len(train_index)}")
    if counts.min() * fraction < 1:
        note += (f"; with only {counts.min()} images in the smallest class, val_fraction="
                 f"{fraction:g} rounds to one validation image per class")
    if len(val_index) < 50:
        note += (f"; {len(val_index)} validation images make the choice of epoch noisy "
                 "(ties go to the latest epoch)")
    return source.subset(train_index), source.subset(val_index), note


def match_classes(source: Source, class_names: tuple[str, ...]) -> Source:
    """`source` with its labels renumbered to `class_names` (by name); a
    class the model does not know is an error naming it."""
    if not source.labelled:
        raise DataError(f"{source.spec}: an evaluation set needs labels (class "
                        "subfolders)")
    if tuple(source.class_names) == tuple(class_names):
        return source
    unknown = sorted(set(source.class_names) - set(class_names))
    if unknown:
        raise DataError(
            f"{source.spec}: classes {unknown} are not among the labelled set's "
            f"{list(class_names)}")
    mapping = np.array([class_names.index(name) for name in source.class_names], np.int32)
    return dataclasses.replace(source, labels=mapping[source.labels],
                               class_names=tuple(class_names))
