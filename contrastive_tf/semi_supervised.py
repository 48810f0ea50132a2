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

import dataclasses
import json
import os
import time

import keras
import numpy as np

from contrastive_tf import data, evaluation, export, finetune, optim, precision, training
from contrastive_tf.backbones import resnet
from contrastive_tf.config import PipelineConfig, write_json
from contrastive_tf.distill import Distiller
from contrastive_tf.heads import ProjectionHead

METHODS = ("linear_probe", "knn", "simclr_finetune", "supervised_baseline",
           "distilled_student")


def _say(message: str) -> None:
    print(f"[pipeline] {message}", flush=True)


def _fraction_key(fraction: float) -> str:
    return repr(float(fraction))


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


def _save_classifier(classifier, class_names, folder):
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "classifier.tmp.keras")
    classifier.save(tmp)
    os.replace(tmp, os.path.join(folder, "classifier.keras"))
    write_json(os.path.join(folder, "class_names.json"), list(class_names))


@dataclasses.dataclass(frozen=True)
class Splits:
    """The pipeline's data: `val` (for model selection) and `pool` (the rest)
    are disjoint parts of the training split; `subsets[f]` is a class-balanced
    labelled fraction f of the whole training split drawn from `pool`, whose
    positions in `pool` are `chosen[f]`; `subsets[1.0]` is `pool`."""
    full: data.Source
    test: data.Source
    val: data.Source
    pool: data.Source
    pool_index: np.ndarray
    chosen: dict
    subsets: dict


def labelled_splits(config: PipelineConfig) -> Splits:
    """The validation split and labelled subsets every stage uses, drawn
    from `config.seed` (the same for a given config, run after run)."""
    pre = config.pretrain
    full = data.load(pre.dataset, pre.train_split, pre.data_dir,
                     image_size=pre.image_size, channels=pre.channels)
    test = data.load(pre.dataset, pre.eval_split, pre.data_dir, image_size=pre.image_size,
                     channels=full.image_shape[-1])
    if not full.labelled:
        raise data.DataError(f"{pre.dataset}: the pipeline needs labels for its "
                             "labelled subsets and evaluation")
    val_index = data.class_balanced_indices(full.labels, config.val_fraction,
                                            seed=config.seed + 1)
    pool_index = np.setdiff1d(np.arange(full.num_examples), val_index)
    val, pool = full.subset(val_index), full.subset(pool_index)
    chosen, subsets = {}, {}
    for fraction in config.fractions:
        per_class = max(1, int(round(fraction * full.num_examples / full.num_classes)))
        chosen[fraction] = data.class_balanced_indices(pool.labels, per_class=per_class,
                                                       seed=config.seed)
        subsets[fraction] = pool.subset(chosen[fraction])
    subsets[1.0] = pool
    return Splits(full, test, val, pool, pool_index, chosen, subsets)


def run_pipeline(config: PipelineConfig) -> dict:
    """Runs every stage and writes the results; returns results.json's dict."""
    started = time.time()
    out = config.output_dir
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "pipeline_config.json"), config.to_dict())
    timings = {}
    # One precision for every stage: "auto" is resolved here, once.
    pre = dataclasses.replace(config.pretrain,
                              precision=precision.resolve(config.pretrain.precision).policy)

    # 1. Pretraining, without labels.
    _say(f"1/6 pretraining SimCLR on {pre.dataset} ({pre.epochs} epochs)")
    t0 = time.time()
    pretrain_dir = pre.model_dir
    summary = training.pretrain(pre)
    timings["pretrain_s"] = round(time.time() - t0, 1)

    splits = labelled_splits(config)
    full, test, val, pool, pool_index, subsets = (
        splits.full, splits.test, splits.val, splits.pool, splits.pool_index, splits.subsets)
    pre = dataclasses.replace(pre, channels=full.image_shape[-1])
    for fraction in config.fractions:
        data.write_indices(os.path.join(out, f"labelled_{fraction}.json"),
                           pool_index[splits.chosen[fraction]], fraction=fraction,
                           seed=config.seed, dataset=pre.dataset, split=pre.train_split)
    _say(f"data: {pool.num_examples} training images ({full.num_classes} classes), "
         f"{val.num_examples} validation, {test.num_examples} test; labelled subsets "
         + ", ".join(f"{f:g}: {subsets[f].num_examples}" for f in config.fractions))

    results = {method: {} for method in METHODS}

    def load_pretrained():
        return keras.models.load_model(os.path.join(pretrain_dir, "simclr.keras"))

    # 2. Linear probe and kNN on frozen features.
    _say("2/6 linear probe and kNN on frozen features")
    t0 = time.time()
    model = load_pretrained()

    def encode(source):
        return evaluation.embed(lambda x: model(x, training=False), source.images)

    test_features = encode(test)
    pool_features = encode(pool)
    position = {int(i): n for n, i in enumerate(pool_index)}
    for fraction in [*config.fractions, 1.0]:
        if fraction == 1.0:
            rows = np.arange(pool.num_examples)
        else:
            rows = np.array([position[int(i)] for i in json.load(open(
                os.path.join(out, f"labelled_{fraction}.json")))["indices"]])
        labels = pool.labels[rows]
        key = _fraction_key(fraction)
        results["linear_probe"][key] = evaluation.linear_probe(
            pool_features[rows], labels, test_features, test.labels,
            full.num_classes, steps=config.probe_steps, seed=config.seed)
        results["knn"][key] = evaluation.knn_accuracy(
            pool_features[rows], labels, test_features, test.labels, full.num_classes,
            k=min(config.knn_k, len(rows)), temperature=pre.knn_temperature)
        _say(f"   {fraction:g} labels: linear {results['linear_probe'][key]:.4f}, "
             f"kNN {results['knn'][key]:.4f}")
    timings["probe_s"] = round(time.time() - t0, 1)
    _pictures(out, pretrain_dir, model, pool, pool_features, test, test_features, config)

    finetune_args = dict(batch_size=config.finetune_batch_size,
                         patience=config.patience, crop_min_area=config.finetune_crop_min_area,
                         min_steps=config.finetune_min_steps, seed=config.seed,
                         policy=pre.precision)

    def train_on_subsets(method, make_parts, epochs, learning_rate):
        """Trains one classifier per labelled fraction; returns them by fraction."""
        classifiers = {}
        for fraction in config.fractions:
            encoder, head = make_parts()
            classifier = finetune.build_classifier(encoder, full.num_classes, head,
                                                   name=f"{method}_{fraction:g}")
            result = finetune.train_classifier(
                classifier, subsets[fraction], val, test, epochs=epochs,
                learning_rate=learning_rate, **finetune_args)
            results[method][_fraction_key(fraction)] = result.test_accuracy
            _say(f"   {fraction:g} labels: test {result.test_accuracy:.4f} (val "
                 f"{result.val_accuracy:.4f}, best epoch {result.best_epoch}/"
                 f"{result.epochs_run})")
            classifiers[fraction] = classifier
        return classifiers

    def pretrained_parts():
        # Seeded, so the new classifier layer starts the same in every run
        # (and in tune_finetune), whatever ran before.
        keras.utils.set_random_seed(config.seed)
        return pretrained_encoder_and_head(pre)

    def fresh_parts():
        keras.utils.set_random_seed(config.seed)
        return fresh_encoder_and_head(pre)

    # 3. Fine-tuning from the pretrained encoder (and first head layer).
    _say("3/6 fine-tuning the pretrained encoder on the labelled subsets")
    t0 = time.time()
    teachers = train_on_subsets("simclr_finetune", pretrained_parts, config.finetune_epochs,
                                config.finetune_learning_rate)
    exported = config.exported_fraction
    for fraction in config.teacher_fractions:
        _save_classifier(teachers[fraction], full.class_names,
                         os.path.join(out, f"finetune_{fraction:g}"))
    timings["finetune_s"] = round(time.time() - t0, 1)

    # 4. Supervised baseline: same architecture, same labels, from scratch.
    _say("4/6 supervised baseline from scratch on the same labelled subsets")
    t0 = time.time()
    train_on_subsets("supervised_baseline", fresh_parts, config.supervised_epochs,
                     config.supervised_learning_rate)
    timings["supervised_s"] = round(time.time() - t0, 1)

    # 5. Distillation of each teacher into a student on all training images.
    t0 = time.time()
    students = {}
    for fraction in config.teacher_fractions:
        _say(f"5/6 distilling the {fraction:g}-label teacher into a student on all "
             "training images (no labels)")
        students[fraction] = distill_student(config, pre, teachers[fraction], pool)
        key = _fraction_key(fraction)
        results["distilled_student"][key] = finetune.evaluate_classifier(students[fraction],
                                                                         test)
        _say(f"   student test {results['distilled_student'][key]:.4f} "
             f"(teacher {results['simclr_finetune'][key]:.4f})")
    teacher, student = teachers[exported], students[exported]
    teacher_accuracy = results["simclr_finetune"][_fraction_key(exported)]
    student_accuracy = results["distilled_student"][_fraction_key(exported)]
    _save_classifier(student, full.class_names, os.path.join(out, "student"))
    timings["distill_s"] = round(time.time() - t0, 1)

    # 6. Exports for TF Serving.
    _say("6/6 exporting encoder, classifier and student")
    exports_root = os.path.join(out, "exports")
    model = load_pretrained()
    card = {"training_data": pre.dataset, "pretrain_summary": summary.get("metrics")}
    paths = {
        "encoder": export.export_encoder(model.encoder, exports_root, "simclr_encoder",
                                         projection_head=model.projection_head,
                                         overwrite=True, version=1, card=card),
        "classifier": export.export_classifier(
            teacher, exports_root, "simclr_classifier", class_names=full.class_names,
            version=1, overwrite=True,
            card=dict(card, labelled_fraction=exported,
                      test_accuracy=teacher_accuracy)),
        "student": export.export_classifier(
            student, exports_root, "distilled_student", class_names=full.class_names,
            version=1, overwrite=True, card=dict(card, test_accuracy=student_accuracy)),
    }

    report = dict(results)
    report.update({"config": config.to_dict(), "wall_s": round(time.time() - started, 1),
                   "timings": timings, "exports": paths,
                   "pretrain_summary": summary})
    write_json(os.path.join(out, "results.json"), report)
    table = results_table(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Label efficiency on {pre.dataset} (test accuracy)\n\n{table}\n")
    plot_label_efficiency(results, os.path.join(out, "label_efficiency.png"),
                          title=f"{pre.dataset}: test accuracy vs labelled fraction")
    print("\n" + table + "\n", flush=True)
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
    keras.utils.set_random_seed(config.seed)
    if config.student_init == "pretrained":
        encoder, head = pretrained_encoder_and_head(pre)
    else:
        encoder, head = fresh_encoder_and_head(pre, config.student_base_width or None)
    student = finetune.build_classifier(encoder, teacher.output.shape[-1], head,
                                        name="student")
    with precision.policy_scope(pre.precision):
        distiller = Distiller(teacher, student,
                              finetune.finetune_augmenter(pre.image_size,
                                                          config.finetune_crop_min_area,
                                                          config.seed),
                              temperature=config.distill_temperature)
    epochs = epochs or config.distill_epochs
    steps = max(pool.num_examples // pre.batch_size, 1)
    optimizer = optim.make_optimizer(
        "sgd", optim.WarmupCosine(config.distill_learning_rate, steps, steps * epochs), 1e-4)
    optim.exclude_from_decay(optimizer, student.trainable_variables)
    distiller.compile(optimizer=precision.loss_scaled(optimizer, pre.precision))
    unlabelled = dataclasses.replace(pool, labels=None)
    distiller.fit(data.training_stream(unlabelled, pre.batch_size, seed=config.seed),
                  steps_per_epoch=steps, epochs=epochs, verbose=2, callbacks=callbacks)
    return student


def _pictures(out, pretrain_dir, model, pool, pool_features, test, test_features, config):
    """Views, training curves, neighbours and the embedding map, as PNGs."""
    from contrastive_tf import visualize
    rng = np.random.RandomState(config.seed)
    visualize.view_grid(pool.images[rng.choice(pool.num_examples, 6, replace=False)],
                        model.augmenter, os.path.join(out, "views.png"))
    history_path = os.path.join(pretrain_dir, "history.json")
    if os.path.exists(history_path):
        visualize.training_curves(json.load(open(history_path)),
                                  os.path.join(out, "training_curves.png"))
    queries = rng.choice(test.num_examples, 6, replace=False)
    visualize.neighbour_grid(test.images[queries], test.labels[queries], pool.images,
                             pool.labels, test_features[queries], pool_features,
                             test.class_names, os.path.join(out, "neighbours.png"))
    visualize.embedding_map(test_features, test.labels, test.class_names,
                            os.path.join(out, "embedding_map.png"))


def results_table(results: dict) -> str:
    """A Markdown table: one row per method, one column per label fraction."""
    fractions = sorted({float(k) for method in results.values() for k in method})
    header = "| method | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |"
    lines = [header, "|---|" + "---|" * len(fractions)]
    for method in METHODS:
        cells = [f"{results[method][_fraction_key(f)]:.2%}" if _fraction_key(f) in results[method]
                 else "" for f in fractions]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_label_efficiency(results: dict, path: str, title: str) -> None:
    """Accuracy against labelled fraction (log axis) for each method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"supervised_baseline": ("supervised from scratch", "o-", "tab:gray"),
              "simclr_finetune": ("SimCLR fine-tuned", "s-", "tab:blue"),
              "linear_probe": ("SimCLR linear probe", "^--", "tab:green"),
              "knn": ("SimCLR kNN", "v:", "tab:olive"),
              "distilled_student": ("distilled student", "*", "tab:red")}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for method, (label, style, colour) in styles.items():
        points = sorted((float(k), v) for k, v in results.get(method, {}).items())
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [100 * y for y in ys], style, label=label, color=colour,
                    markersize=9 if method == "distilled_student" else 6)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of training labels used")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
