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

from contrastive_tf import data
from contrastive_tf.jobs import visualize
from contrastive_tf.jobs.config import PipelineConfig
from contrastive_tf.jobs.distill import distill
from contrastive_tf.jobs.finetune import evaluate_classifier, train_classifier
from contrastive_tf.jobs.models import build_student, classifier_parts, fresh_encoder_and_head
from contrastive_tf.jobs.pipeline_data import (PipelineData, Results, check_pipeline_data,
                                               column_key, column_name, prepare_data)
from contrastive_tf.jobs.pretrain import pretrain
from contrastive_tf.method import evaluation
from contrastive_tf.method.classifier import build_classifier
from contrastive_tf.runs import artifacts
from contrastive_tf.runtime import precision, progress, seeds
from contrastive_tf.runtime.files import atomic_open, write_json
from contrastive_tf.serving import export

log = progress.logger("pipeline")

# What the pipeline does, in order; its progress lines count them.
STAGES = ("pretraining", "data", "probe", "fine-tuning", "baseline", "distillation",
          "export", "report")


def _stage(name: str, text: str) -> None:
    log.info(f"{STAGES.index(name) + 1}/{len(STAGES)} {text}")


def pretrained_parts(pre):
    """The encoder (and head, from which classifiers start) pretrained into
    `pre.model_dir`, freshly loaded, so each classifier gets its own copy."""
    return classifier_parts(artifacts.load_pretrained(pre.model_dir))


def fresh_parts(pre, base_width: int = 0):
    """A newly initialised encoder (and head) in the pretraining's precision,
    like the pretrained one it is compared with; `base_width` (0: the
    pretraining's) for a student of another width."""
    with precision.policy_scope(pre.precision):
        config = dataclasses.replace(pre, base_width=base_width or pre.base_width)
        return fresh_encoder_and_head(config, head=pre.ft_layer > 0)


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
        log.info(f"   {column_name(column)}{shown}: linear {linear:.4f}, kNN {knn:.4f}")
        if bank is None or labelled.num_examples > bank[0].num_examples:
            bank = (labelled, features)
    return bank, test_features


def classifier_stage(method: str, make_parts, pdata: PipelineData, config: PipelineConfig,
                     pre, epochs: int, learning_rate: float, results: Results) -> list:
    """One classifier per labelled set of every draw, on the encoder and
    head `make_parts(pre)` returns, trained by `train_classifier`;
    returns [draw][column]."""
    trained = []
    for draw, sets in enumerate(pdata.draws):
        classifiers = {}
        for column in pdata.columns:
            # Seeded, so the new classifier layer starts the same in every
            # run (and in tune_finetune), whatever ran before.
            with seeds.seeded(config.seed):
                encoder, head = make_parts(pre)
                classifier = build_classifier(
                    encoder, len(pdata.class_names), head,
                    name=f"{method}_{column_key(column).replace(' ', '_')}")
            result = train_classifier(
                classifier, sets[column], pdata.val, pdata.test, epochs=epochs,
                learning_rate=learning_rate, batch_size=config.finetune_batch_size,
                patience=config.patience, crop_min_area=config.finetune_crop_min_area,
                min_steps=config.finetune_min_steps, seed=config.seed, policy=pre.precision)
            results.add(method, column, result.test_accuracy)
            log.info(f"   {column_name(column)}{f' (draw {draw})' if len(pdata.draws) > 1 else ''}"
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
            of_draw = f" of draw {draw}" if len(teachers) > 1 else ""
            _stage("distillation", f"distilling the {column_name(column)} teacher{of_draw} "
                   f"into a student on {pdata.pool.num_examples} images (no labels)")
            student = distill_student(config, pre, draw_teachers[column], pdata.pool)
            accuracy = evaluate_classifier(student, pdata.test)
            results.add("distilled_student", column, accuracy)
            log.info(f"   student test {accuracy:.4f}")
            students[-1][column] = student
    return students


def export_stage(out: str, model, teacher, student, class_names, card: dict) -> dict:
    """The pretrained `model`'s encoder (with its head), the classifier and
    the student, for TF Serving under out/exports."""
    root = os.path.join(out, artifacts.PIPELINE_EXPORTS)
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
    write_json(os.path.join(out, artifacts.RESULTS), report)
    table = visualize.results_table(means, spread)
    with atomic_open(os.path.join(out, artifacts.RESULTS_TABLE)) as f:
        f.write(f"# {title} (test accuracy)\n\n{table}\n")
    visualize.plot_label_efficiency(means, os.path.join(out, artifacts.LABEL_EFFICIENCY_PLOT),
                                    title=title, spread=spread)
    _stage("report", f"test accuracy:\n\n{table}\n")
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
    _stage("pretraining", f"pretraining SimCLR on {pre.dataset} ({pre.epochs} epochs)")
    with _timed(timings, "pretrain_s"):
        summary = pretrain(pre, choice=choice)
    model = artifacts.load_simclr(pre.model_dir)
    pre = dataclasses.replace(pre, channels=int(model.encoder.input.shape[-1]))
    return summary, model, pre


def teacher_stage(config: PipelineConfig, pre, pdata: PipelineData, results: Results,
                  timings: dict) -> list:
    """Fine-tunes the pretrained encoder on every labelled set and saves the
    classifiers to be distilled; returns them, [draw][column]."""
    _stage("fine-tuning", "fine-tuning the pretrained encoder on the labelled images")
    with _timed(timings, "finetune_s"):
        teachers = classifier_stage("simclr_finetune", pretrained_parts, pdata,
                                    config, pre, config.finetune_epochs,
                                    config.finetune_learning_rate, results)
        for column in _teacher_columns(config, pdata):
            folder = f"finetune_{column:g}" if isinstance(column, float) else "finetune"
            artifacts.save_classifier(teachers[0][column], pdata.class_names,
                                      os.path.join(config.output_dir, folder))
    return teachers


def baseline_stage(config: PipelineConfig, pre, pdata: PipelineData, results: Results,
                   timings: dict) -> None:
    """The same architecture trained from scratch on the same labels."""
    _stage("baseline", "supervised baseline from scratch on the same labelled images")
    with _timed(timings, "supervised_s"):
        classifier_stage("supervised_baseline", fresh_parts, pdata, config, pre,
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
    write_json(os.path.join(out, artifacts.PIPELINE_CONFIG), config.to_dict())
    check_pipeline_data(config)
    summary, model, pre = pretrain_stage(config, timings)
    _stage("data", "the labelled sets, validation, test and the unlabelled pool")
    pdata = prepare_data(dataclasses.replace(config, pretrain=dataclasses.replace(
        config.pretrain, channels=pre.channels)), pre, pre.image_size, pre.channels)
    results = Results()
    _stage("probe", "linear probe and kNN on frozen features")
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
        artifacts.save_classifier(students[0][exported], pdata.class_names,
                                  os.path.join(out, "student"))
    _stage("export", "exporting encoder, classifier and student")
    means, key = results.means(), column_key(exported)
    card = {"training_data": pre.dataset, "pretrain_summary": summary.get("metrics"),
            "labelled": column_name(exported),
            "teacher_accuracy": means["simclr_finetune"][key],
            "student_accuracy": means["distilled_student"][key]}
    paths = export_stage(out, model, teachers[0][exported], students[0][exported],
                         pdata.class_names, card)
    title = (f"{config.labelled_dataset} with {pre.dataset} unlabelled"
             if config.labelled_dataset else f"Label efficiency on {config.pretrain.dataset}")
    report = report_stage(out, results, {
        "config": config.to_dict(), "wall_s": round(time.time() - started, 1),
        "timings": timings, "exports": paths, "pretrain_summary": summary}, title)
    log.info(f"done in {report['wall_s']} s; results.json, results.md and "
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
        parts = (pretrained_parts(pre) if config.student_init == "pretrained"
                 else fresh_parts(pre, config.student_base_width))
        student = build_student(teacher, parts)
        distill(teacher, student, pool, epochs=epochs or config.distill_epochs,
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
    history = artifacts.read_history(pretrain_dir)
    if history is not None:
        visualize.training_curves(history, os.path.join(out, "training_curves.png"))
    queries = rng.choice(test.num_examples, 6, replace=False)
    visualize.neighbour_grid(test.images[queries], test.labels[queries], pool.images,
                             pool.labels, test_features[queries], pool_features,
                             test.class_names, os.path.join(out, "neighbours.png"))
    visualize.embedding_map(test_features, test.labels, test.class_names,
                            os.path.join(out, "embedding_map.png"))
