"""The label-efficiency pipeline (SimCLRv2's semi-supervised recipe).

pretrain (no labels) -> linear probe and kNN -> fine-tune on 1% / 10% of the
labels -> the same architecture trained from scratch on the same labels ->
distil each fine-tuned teacher into a student on all (unlabelled) training
images -> export -> results.json, results.md, label_efficiency.png.

Model selection (the best epoch) for both fine-tuning and the supervised
baseline uses a class-balanced validation split carved out of the training
images, disjoint from the labelled subsets; the test split is used only to
report the final numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import keras
import numpy as np

from contrastive_tf import (data, distill, evaluation, export, finetune, precision,
                            progress, seeds, training, visualize)
from contrastive_tf.backbones import resnet
from contrastive_tf.config import PipelineConfig
from contrastive_tf.files import atomic_open, read_json, write_json
from contrastive_tf.heads import ProjectionHead

METHODS = ("linear_probe", "knn", "simclr_finetune", "supervised_baseline",
           "distilled_student")


_say = progress.logger("pipeline").info


def fresh_encoder_and_head(config, base_width=None):
    """A newly initialised encoder (and head) in the pretraining's precision,
    like the pretrained one it is compared with."""
    with precision.policy_scope(config.precision):
        encoder = resnet(config.depth, config.width_multiplier, sk_ratio=config.sk_ratio,
                         base_width=base_width or config.base_width,
                         input_shape=(config.image_size, config.image_size, config.channels))
        head = None
        if config.ft_layer > 0:
            head = ProjectionHead(config.projection_layers, config.projection_dim,
                                  ft_layer=config.ft_layer)
            head.build(encoder.output.shape)
    return encoder, head


def pretrained_encoder_and_head(config):
    """The encoder (and, with `ft_layer` > 0, the head) pretrained into
    `config.model_dir`, freshly loaded, so each classifier gets its own copy."""
    model = keras.models.load_model(os.path.join(config.model_dir, "simclr.keras"))
    return model.encoder, (model.projection_head if config.ft_layer > 0 else None)


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


def _column_key(column) -> str:
    return repr(float(column)) if isinstance(column, float) else str(column)


def prepare_data(config: PipelineConfig, pre, size: int, channels: int) -> PipelineData:
    """The labelled draws, validation, test and unlabelled pool; writes the
    labelled subsets of the benchmark protocol to labelled_<f>[_draw<k>].json."""
    out = config.output_dir
    if config.labelled_dataset:
        labelled = finetune.load_labelled(config.labelled_dataset, "train", size, channels,
                                          pre.data_dir)
        train, val, note = finetune.validation_split(labelled, config.val_fraction,
                                                     config.seed)
        test = finetune.match_classes(finetune.load_labelled(
            config.test_dataset, "test", size, channels, pre.data_dir),
            labelled.class_names)
        pool = finetune.load_images(pre.dataset, "train", size, channels, pre.data_dir)
        column = f"{labelled.num_examples} labels"
        _say(f"data: {labelled.num_examples} labelled images ({labelled.num_classes} "
             f"classes; {note}), {test.num_examples} test, {pool.num_examples} unlabelled")
        return PipelineData((column,), ({column: train},), val, test, pool, None,
                            labelled.class_names)
    draws = []
    for draw in range(config.label_seeds):
        splits = labelled_splits(config, draw)
        for fraction in config.fractions:
            suffix = f"_draw{draw}" if draw else ""
            data.write_indices(os.path.join(out, f"labelled_{fraction}{suffix}.json"),
                               splits.pool_index[splits.chosen[fraction]], fraction=fraction,
                               seed=config.seed + draw, dataset=config.pretrain.dataset,
                               split=config.pretrain.train_split or "train")
        draws.append({fraction: splits.subsets[fraction] for fraction in config.fractions})
    pool = splits.pool
    if config.unlabelled_dataset:
        pool = finetune.load_images(config.unlabelled_dataset, "train", size, channels,
                                    pre.data_dir)
    _say(f"data: {splits.pool.num_examples} training images ({splits.full.num_classes} "
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
        self.values[method].setdefault(_column_key(column), []).append(float(value))

    def means(self) -> dict:
        return {method: {key: float(np.mean(v)) for key, v in columns.items()}
                for method, columns in self.values.items()}

    def spread(self) -> dict:
        return {method: {key: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                               "values": v} for key, v in columns.items()}
                for method, columns in self.values.items()}


def probe_stage(model, pdata: PipelineData, config: PipelineConfig, pre,
                results: Results) -> tuple:
    """Linear probe and kNN on frozen features for every column and draw;
    returns the (bank images, labels, features) and test features for the
    pictures."""
    def encode(images):
        return evaluation.embed(lambda x: model(x, training=False), images)

    test = pdata.test
    test_features = encode(test.images)
    sets = [(column, draw[column], index) for index, draw in enumerate(pdata.draws)
            for column in pdata.columns]
    if pdata.probe_all is not None:
        sets.append((1.0, pdata.probe_all, 0))
    bank = None
    for column, labelled, draw in sets:
        features = encode(labelled.images)
        linear = evaluation.linear_probe(features, labelled.labels, test_features,
                                         test.labels, len(pdata.class_names),
                                         steps=config.probe_steps, seed=config.seed)
        knn = evaluation.knn_accuracy(features, labelled.labels, test_features, test.labels,
                                      len(pdata.class_names),
                                      k=min(config.probe_knn_k, labelled.num_examples),
                                      temperature=pre.knn_temperature)
        results.add("linear_probe", column, linear)
        results.add("knn", column, knn)
        shown = f" (draw {draw})" if len(pdata.draws) > 1 and column != 1.0 else ""
        _say(f"   {_column_name(column)}{shown}: linear {linear:.4f}, kNN {knn:.4f}")
        if bank is None or labelled.num_examples > bank[0].num_examples:
            bank = (labelled, features)
    return bank, test_features


def _column_name(column) -> str:
    return f"{column:.0%} labels" if isinstance(column, float) else str(column)


def classifier_stage(method: str, make_parts, pdata: PipelineData, config: PipelineConfig,
                     pre, epochs: int, learning_rate: float, results: Results) -> list:
    """One classifier per labelled set of every draw, on the encoder and
    head `make_parts(pre)` returns, trained by `finetune.train_classifier`;
    returns [draw][column]."""
    trained = []
    for draw, sets in enumerate(pdata.draws):
        classifiers = {}
        for column in pdata.columns:
            # Seeded, so the new classifier layer starts the same in every
            # run (and in tune_finetune), whatever ran before.
            with seeds.seeded(config.seed):
                encoder, head = make_parts(pre)
                classifier = finetune.build_classifier(
                    encoder, len(pdata.class_names), head,
                    name=f"{method}_{_column_key(column).replace(' ', '_')}")
            result = finetune.train_classifier(
                classifier, sets[column], pdata.val, pdata.test, epochs=epochs,
                learning_rate=learning_rate, batch_size=config.finetune_batch_size,
                patience=config.patience, crop_min_area=config.finetune_crop_min_area,
                min_steps=config.finetune_min_steps, seed=config.seed, policy=pre.precision)
            results.add(method, column, result.test_accuracy)
            _say(f"   {_column_name(column)}{f' (draw {draw})' if len(pdata.draws) > 1 else ''}"
                 f": test {result.test_accuracy:.4f} (val {result.val_accuracy:.4f}, best "
                 f"epoch {result.best_epoch}/{result.epochs_run})")
            classifiers[column] = classifier
        trained.append(classifiers)
    return trained


def distill_stage(config: PipelineConfig, pre, teachers: list, pdata: PipelineData,
                  columns, results: Results) -> list:
    """A student for each teacher of `columns` in every draw; [draw][column]."""
    students = []
    for draw, draw_teachers in enumerate(teachers):
        students.append({})
        for column in columns:
            _say(f"5/6 distilling the {_column_name(column)} teacher"
                 f"{f' of draw {draw}' if len(teachers) > 1 else ''} into a student on "
                 f"{pdata.pool.num_examples} images (no labels)")
            student = distill_student(config, pre, draw_teachers[column], pdata.pool)
            accuracy = finetune.evaluate_classifier(student, pdata.test)
            results.add("distilled_student", column, accuracy)
            _say(f"   student test {accuracy:.4f}")
            students[-1][column] = student
    return students


def export_stage(out: str, model, teacher, student, class_names, card: dict) -> dict:
    """The pretrained `model`'s encoder (with its head), the classifier and
    the student, for TF Serving under out/exports."""
    root = os.path.join(out, "exports")
    return {
        "encoder": export.export_encoder(model.encoder, root, "simclr_encoder",
                                         projection_head=model.projection_head,
                                         overwrite=True, version=1, card=card),
        "classifier": export.export_classifier(
            teacher, root, "simclr_classifier", class_names=class_names, version=1,
            overwrite=True, card=dict(card, test_accuracy=card.get("teacher_accuracy"))),
        "student": export.export_classifier(
            student, root, "distilled_student", class_names=class_names, version=1,
            overwrite=True, card=dict(card, test_accuracy=card.get("student_accuracy"))),
    }


def report_stage(out: str, results: Results, report: dict, title: str) -> dict:
    """results.json, results.md and label_efficiency.png; logs the table."""
    means, spread = results.means(), results.spread()
    report = dict(means, **report, spread=spread)
    write_json(os.path.join(out, "results.json"), report)
    table = visualize.results_table(means, spread)
    with atomic_open(os.path.join(out, "results.md")) as f:
        f.write(f"# {title} (test accuracy)\n\n{table}\n")
    visualize.plot_label_efficiency(means, os.path.join(out, "label_efficiency.png"),
                                    title=title, spread=spread)
    _say(f"test accuracy:\n\n{table}\n")
    return report


def pipeline_pretrain_config(config: PipelineConfig):
    """The pretraining stage's config: on the unlabelled images (a folder
    whole) when the user gives their own sets; otherwise on the training
    split of the labelled dataset (a folder's fixed 80% part), never on its
    test images. "auto" precision is resolved here, once, for every stage:
    returns the config and the `precision.Choice`."""
    pre = config.pretrain
    if config.unlabelled_dataset or config.labelled_dataset:
        if config.unlabelled_dataset:
            pre = dataclasses.replace(pre, dataset=config.unlabelled_dataset,
                                      train_split="", eval_split="")
    else:
        pre = dataclasses.replace(pre, train_split=pre.train_split or "train",
                                  eval_split=pre.eval_split or "test")
    choice = precision.resolve(pre.precision)
    return dataclasses.replace(pre, precision=choice.policy), choice


@contextlib.contextmanager
def _timed(timings: dict, name: str):
    started = time.time()
    yield
    timings[name] = round(time.time() - started, 1)


def pretrain_stage(config: PipelineConfig, timings: dict):
    """Pretrains (or resumes); returns the summary, the trained SimCLR model
    and the pretraining config with its precision and channels settled."""
    pre, choice = pipeline_pretrain_config(config)
    _say(f"1/6 pretraining SimCLR on {pre.dataset} ({pre.epochs} epochs)")
    with _timed(timings, "pretrain_s"):
        summary = training.pretrain(pre, choice=choice)
    model = keras.models.load_model(os.path.join(pre.model_dir, "simclr.keras"))
    pre = dataclasses.replace(pre, channels=int(model.encoder.input.shape[-1]))
    return summary, model, pre


def teacher_stage(config: PipelineConfig, pre, pdata: PipelineData, results: Results,
                  timings: dict) -> list:
    """Fine-tunes the pretrained encoder on every labelled set and saves the
    classifiers to be distilled; returns them, [draw][column]."""
    _say("3/6 fine-tuning the pretrained encoder on the labelled images")
    with _timed(timings, "finetune_s"):
        teachers = classifier_stage("simclr_finetune", pretrained_encoder_and_head, pdata,
                                    config, pre, config.finetune_epochs,
                                    config.finetune_learning_rate, results)
        for column in _teacher_columns(config, pdata):
            folder = f"finetune_{column:g}" if isinstance(column, float) else "finetune"
            finetune.save_classifier(teachers[0][column], pdata.class_names,
                                     os.path.join(config.output_dir, folder))
    return teachers


def baseline_stage(config: PipelineConfig, pre, pdata: PipelineData, results: Results,
                   timings: dict) -> None:
    """The same architecture trained from scratch on the same labels."""
    _say("4/6 supervised baseline from scratch on the same labelled images")
    with _timed(timings, "supervised_s"):
        classifier_stage("supervised_baseline", fresh_encoder_and_head, pdata, config, pre,
                         config.supervised_epochs, config.supervised_learning_rate, results)


def _teacher_columns(config: PipelineConfig, pdata: PipelineData) -> tuple:
    return pdata.columns if config.labelled_dataset else config.teacher_fractions


def _exported_column(config: PipelineConfig, pdata: PipelineData):
    return pdata.columns[0] if config.labelled_dataset else config.fraction_to_export()


def run_pipeline(config: PipelineConfig) -> dict:
    """Runs every stage and writes the results; returns results.json's dict.

    pretrain -> data -> linear probe / kNN -> fine-tune -> supervised
    baseline -> distil -> export -> report."""
    started, timings, out = time.time(), {}, config.output_dir
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "pipeline_config.json"), config.to_dict())
    summary, model, pre = pretrain_stage(config, timings)
    pdata = prepare_data(dataclasses.replace(config, pretrain=dataclasses.replace(
        config.pretrain, channels=pre.channels)), pre, pre.image_size, pre.channels)
    results = Results()
    _say("2/6 linear probe and kNN on frozen features")
    with _timed(timings, "probe_s"):
        (bank, bank_features), test_features = probe_stage(model, pdata, config, pre, results)
    _pictures(out, pre.model_dir, model, bank, bank_features, pdata.test, test_features,
              config)
    teachers = teacher_stage(config, pre, pdata, results, timings)
    baseline_stage(config, pre, pdata, results, timings)
    exported = _exported_column(config, pdata)
    with _timed(timings, "distill_s"):
        students = distill_stage(config, pre, teachers, pdata,
                                 _teacher_columns(config, pdata), results)
        finetune.save_classifier(students[0][exported], pdata.class_names,
                                 os.path.join(out, "student"))
    _say("6/6 exporting encoder, classifier and student")
    means, key = results.means(), _column_key(exported)
    card = {"training_data": pre.dataset, "pretrain_summary": summary.get("metrics"),
            "labelled": _column_name(exported),
            "teacher_accuracy": means["simclr_finetune"][key],
            "student_accuracy": means["distilled_student"][key]}
    paths = export_stage(out, model, teachers[0][exported], students[0][exported],
                         pdata.class_names, card)
    title = (f"{config.labelled_dataset} with {pre.dataset} unlabelled"
             if config.labelled_dataset else f"Label efficiency on {config.pretrain.dataset}")
    report = report_stage(out, results, {
        "config": config.to_dict(), "wall_s": round(time.time() - started, 1),
        "timings": timings, "exports": paths, "pretrain_summary": summary}, title)
    _say(f"done in {report['wall_s']} s; results.json, results.md and "
         f"label_efficiency.png are in {out}")
    return report


def distill_student(config: PipelineConfig, pre, teacher: keras.Model,
                    pool: data.Source, epochs: int | None = None,
                    callbacks: list | None = None) -> keras.Model:
    """A student distilled from `teacher` on `pool`'s images without their
    labels (SimCLRv2): the same size as the teacher and starting from the
    unlabelled pretraining (not from the teacher's fine-tuned weights), or
    from scratch with `config.student_init` 'scratch'. Runs in
    `pre.precision` (a concrete policy), with loss scaling under
    mixed_float16."""
    with seeds.seeded(config.seed):
        if config.student_init == "pretrained":
            encoder, head = pretrained_encoder_and_head(pre)
        else:
            encoder, head = fresh_encoder_and_head(pre, config.student_base_width or None)
        student = finetune.build_classifier(encoder, teacher.output.shape[-1], head,
                                            name="student")
        distill.distill(teacher, student, pool, epochs=epochs or config.distill_epochs,
                        batch_size=pre.batch_size, learning_rate=config.distill_learning_rate,
                        temperature=config.distill_temperature,
                        crop_min_area=config.finetune_crop_min_area, policy=pre.precision,
                        seed=config.seed, callbacks=callbacks)
    return student


def _pictures(out, pretrain_dir, model, pool, pool_features, test, test_features, config):
    """Views, training curves, neighbours and the embedding map, as PNGs."""
    rng = np.random.RandomState(config.seed)
    visualize.view_grid(pool.images[rng.choice(pool.num_examples, 6, replace=False)],
                        model.augmenter, os.path.join(out, "views.png"))
    history_path = os.path.join(pretrain_dir, "history.json")
    if os.path.exists(history_path):
        visualize.training_curves(read_json(history_path),
                                  os.path.join(out, "training_curves.png"))
    queries = rng.choice(test.num_examples, 6, replace=False)
    visualize.neighbour_grid(test.images[queries], test.labels[queries], pool.images,
                             pool.labels, test_features[queries], pool_features,
                             test.class_names, os.path.join(out, "neighbours.png"))
    visualize.embedding_map(test_features, test.labels, test.class_names,
                            os.path.join(out, "embedding_map.png"))
