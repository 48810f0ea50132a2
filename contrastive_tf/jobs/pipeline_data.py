"""The pipeline's data and results: what the stages after pretraining train
and evaluate on, and the table they fill.

For the benchmark protocol (fractions of a fully labelled set) the labelled
subsets are class-balanced draws from the training split, disjoint from a
validation split that selects models; with the user's own sets
(`labelled_dataset`, `test_dataset`, `unlabelled_dataset`) the labelled set
is used whole, less a validation part.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from contrastive_tf import data
from contrastive_tf.jobs.config import PipelineConfig
from contrastive_tf.runs import artifacts
from contrastive_tf.runtime import progress

METHODS = ("linear_probe", "knn", "simclr_finetune", "supervised_baseline",
           "distilled_student")

log = progress.logger("pipeline")


@dataclasses.dataclass(frozen=True)
class Splits:
    """The benchmark protocol's data: `val` (for model selection) and `pool`
    (the rest) are disjoint parts of the training split; `subsets[f]` is a
    class-balanced labelled fraction f of the whole training split drawn
    from `pool`, whose positions in `pool` are `chosen[f]`; `subsets[1.0]` is
    `pool`."""
    full: data.Source
    test: data.Source
    val: data.Source
    pool: data.Source
    pool_index: np.ndarray
    chosen: dict
    subsets: dict


def labelled_splits(config: PipelineConfig, draw: int = 0) -> Splits:
    """The validation split and labelled subsets of `config.pretrain.dataset`
    (the benchmark protocol). The validation split depends on `config.seed`
    only; the labelled subsets are draw `draw` (seed `config.seed + draw`),
    so label draws differ while model selection stays the same."""
    pre = config.pretrain
    full = data.load(pre.dataset, pre.train_split or "train", pre.data_dir,
                     image_size=pre.image_size, channels=pre.channels)
    test = data.load(pre.dataset, pre.eval_split or "test", pre.data_dir,
                     image_size=pre.image_size, channels=full.image_shape[-1])
    check_protocol_fits(full, pre.image_size)
    full, test = data.to_memory(full, pre.image_size), data.to_memory(test, pre.image_size)
    if not full.labelled:
        raise data.DataError(f"{pre.dataset}: the pipeline needs labels for its "
                             "labelled subsets and evaluation (or give `labelled_dataset` "
                             "and `test_dataset`)")
    val_index = data.class_balanced_indices(full.labels, config.val_fraction,
                                            seed=config.seed + 1)
    pool_index = np.setdiff1d(np.arange(full.num_examples), val_index)
    val, pool = full.subset(val_index), full.subset(pool_index)
    chosen, subsets = {}, {}
    for fraction in config.fractions:
        per_class = max(1, int(round(fraction * full.num_examples / full.num_classes)))
        chosen[fraction] = data.class_balanced_indices(pool.labels, per_class=per_class,
                                                       seed=config.seed + draw)
        subsets[fraction] = pool.subset(chosen[fraction])
    subsets[1.0] = pool
    return Splits(full, test, val, pool, pool_index, chosen, subsets)


# The benchmark protocol (label fractions of one labelled set) holds that set
# in memory at the training size; a streaming set (TFDS) larger than this is
# refused before pretraining.
PROTOCOL_MEMORY_BYTES = 4 << 30


def check_protocol_fits(source: data.Source, image_size: int) -> None:
    """Raises DataError when the label-fraction protocol cannot hold
    `source` at `image_size`, saying what to do instead."""
    channels = source.image_shape[-1] or 3
    needed = source.num_examples * image_size * image_size * channels
    if source.images is None and needed > PROTOCOL_MEMORY_BYTES:
        raise data.DataError(
            f"{source.spec}: the label-fraction protocol holds its {source.num_examples} "
            f"images in memory at {image_size} px ({needed / 2 ** 30:.1f} GB, over the "
            f"{PROTOCOL_MEMORY_BYTES / 2 ** 30:.0f} GB this job allows): give your labelled "
            "images as --labelled_dataset and --test_dataset (folders) and this set as "
            "--unlabelled_dataset, which streams")


def check_pipeline_data(config: PipelineConfig) -> None:
    """What `prepare_data` will need, checked before pretraining starts:
    the datasets exist, and a label-fraction protocol set fits in memory."""
    pre = config.pretrain
    if config.labelled_dataset:
        return
    full = data.load(pre.dataset, pre.train_split or "train", pre.data_dir,
                     image_size=pre.image_size, channels=pre.channels, stream=True)
    if not full.labelled:
        raise data.DataError(f"{pre.dataset}: the pipeline needs labels for its "
                             "labelled subsets and evaluation (or give `labelled_dataset` "
                             "and `test_dataset`)")
    check_protocol_fits(full, pre.image_size)


@dataclasses.dataclass(frozen=True)
class PipelineData:
    """What the stages after pretraining train and evaluate on.

    `columns` are the table's columns: label fractions (the benchmark
    protocol) or one "<n> labels" column (your own labelled set);
    `draws[k][column]` is the labelled training set of label draw k;
    `val` selects models, `test` reports; `pool` is distilled on (its labels
    unused); `probe_all`, if set, is the labelled set of the 100% probe
    column."""
    columns: tuple
    draws: tuple
    val: data.Source
    test: data.Source
    pool: data.Source
    probe_all: data.Source | None
    class_names: tuple


def column_key(column) -> str:
    return repr(float(column)) if isinstance(column, float) else str(column)


def prepare_data(config: PipelineConfig, pre, size: int, channels: int) -> PipelineData:
    """The labelled draws, validation, test and unlabelled pool; writes the
    labelled subsets of the benchmark protocol to labelled_<f>[_draw<k>].json."""
    out = config.output_dir
    if config.labelled_dataset:
        # Labelled sets are held (they are what a user has few of); the pool streams.
        labelled = data.to_memory(data.load_labelled(config.labelled_dataset, "train", size,
                                                     channels, pre.data_dir), size)
        train, val, note = data.validation_split(labelled, config.val_fraction,
                                                 config.seed)
        test = data.match_classes(data.to_memory(data.load_labelled(
            config.test_dataset, "test", size, channels, pre.data_dir), size),
            labelled.class_names)
        pool = data.load_images(pre.dataset, "train", size, channels, pre.data_dir)
        column = f"{labelled.num_examples} labels"
        log.info(f"data: {labelled.num_examples} labelled images ({labelled.num_classes} "
                 f"classes; {note}), {test.num_examples} test, {pool.num_examples} unlabelled")
        return PipelineData((column,), ({column: train},), val, test, pool, None,
                            labelled.class_names)
    draws = []
    for draw in range(config.label_seeds):
        splits = labelled_splits(config, draw)
        for fraction in config.fractions:
            data.write_indices(os.path.join(out, artifacts.labelled_subset_file(fraction, draw)),
                               splits.pool_index[splits.chosen[fraction]], fraction=fraction,
                               seed=config.seed + draw, dataset=config.pretrain.dataset,
                               split=config.pretrain.train_split or "train")
        draws.append({fraction: splits.subsets[fraction] for fraction in config.fractions})
    pool = splits.pool
    if config.unlabelled_dataset:
        pool = data.load_images(config.unlabelled_dataset, "train", size, channels,
                                pre.data_dir)
    log.info(f"data: {splits.pool.num_examples} training images ({splits.full.num_classes} "
             f"classes), {splits.val.num_examples} validation, {splits.test.num_examples} test; "
             "labelled subsets " + ", ".join(f"{f:g}: {splits.subsets[f].num_examples}"
                                             for f in config.fractions)
             + (f" ({config.label_seeds} draws)" if config.label_seeds > 1 else "")
             + (f"; unlabelled pool {pool.num_examples} images of {config.unlabelled_dataset}"
                if config.unlabelled_dataset else ""))
    return PipelineData(tuple(config.fractions), tuple(draws), splits.val, splits.test, pool,
                        splits.pool, splits.full.class_names)


class Results:
    """Test accuracies per method and column, one value per label draw."""

    def __init__(self):
        self.values = {method: {} for method in METHODS}

    def add(self, method: str, column, value: float) -> None:
        self.values[method].setdefault(column_key(column), []).append(float(value))

    def means(self) -> dict:
        return {method: {key: float(np.mean(v)) for key, v in columns.items()}
                for method, columns in self.values.items()}

    def spread(self) -> dict:
        return {method: {key: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                               "values": v} for key, v in columns.items()}
                for method, columns in self.values.items()}


def column_name(column) -> str:
    return f"{column:.0%} labels" if isinstance(column, float) else str(column)
