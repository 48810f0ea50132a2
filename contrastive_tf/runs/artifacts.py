"""What every job's output folder holds, how to recognise it, load and write it.

The one place a job's files are named. Layouts:

    pretraining run (experiments.pretrain --model_dir)
        config.json      the PretrainConfig, with the precision decision
        checkpoints/     tf.train.CheckpointManager's checkpoints
        logs/            TensorBoard
        history.json     per-interval metrics, kept across resumed runs
        simclr.keras     the whole SimCLR model (encoder, augmenter, head)
        encoder.keras    the encoder alone
        summary.json
    fine-tuning / distillation run (experiments.finetune / distill --output_dir)
        job.json         which job owns the folder, with its settings
        classifier.keras, class_names.json, summary.json
        labelled_subset.json   (fine-tuning on a subset of the labels)
    export version (experiments.export: <export_root>/<name>/<version>/)
        saved_model.pb, variables/    the SavedModel TF Serving loads
        model_card.json               what it is (kind, classes, input)
        assets.extra/model.keras      the Keras model it was written from
    pipeline run (experiments.pipeline --output_dir)
        pipeline_config.json, pretrain/ (a pretraining run), finetune[_<f>]/
        and student/ (classifier runs), exports/, labelled_<f>.json,
        results.json, results.md and the pictures.

A path given as a model is recognised by its files (`load_pretrained`,
`load_classifier`, `load_model`); anything else is a `ModelSourceError`
saying what the folder is and what to give instead. Every write is atomic.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np

from contrastive_tf.runtime.files import atomic_path, read_json, write_json

CONFIG = "config.json"
SUMMARY = "summary.json"
HISTORY = "history.json"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
SIMCLR_MODEL = "simclr.keras"
ENCODER_MODEL = "encoder.keras"
JOB_MARKER = "job.json"
CLASSIFIER_MODEL = "classifier.keras"
CLASS_NAMES = "class_names.json"
LABELLED_SUBSET = "labelled_subset.json"
SAVED_MODEL = "saved_model.pb"
MODEL_CARD = "model_card.json"
KERAS_COPY = os.path.join("assets.extra", "model.keras")
PIPELINE_CONFIG = "pipeline_config.json"
PIPELINE_EXPORTS = "exports"
RESULTS = "results.json"
RESULTS_TABLE = "results.md"
LABEL_EFFICIENCY_PLOT = "label_efficiency.png"


def labelled_subset_file(fraction: float, draw: int = 0) -> str:
    """The pipeline's record of label draw `draw` at `fraction`."""
    return f"labelled_{fraction}{f'_draw{draw}' if draw else ''}.json"


class ModelSourceError(ValueError):
    """A path given as a model is not a run or an export of the right kind."""


class OutputDirError(ValueError):
    """An output folder that holds another job's results."""


# -- recognising a folder ------------------------------------------------------

def _has(folder: str, name: str) -> bool:
    return os.path.isfile(os.path.join(folder, name))


def is_pretraining_run(folder: str) -> bool:
    return _has(folder, SIMCLR_MODEL)


def is_classifier_run(folder: str) -> bool:
    return _has(folder, CLASSIFIER_MODEL)


def is_export(folder: str) -> bool:
    return _has(folder, MODEL_CARD) and _has(folder, SAVED_MODEL)


def read_optional_json(folder: str, name: str):
    """The JSON file `name` in `folder`, or None where there is none."""
    path = os.path.join(folder, name)
    return read_json(path) if os.path.exists(path) else None


# -- output folders --------------------------------------------------------------

def claim_output_dir(path: str, job: str, settings: dict) -> None:
    """Makes `path` this job's output folder, writing job.json there.

    A folder that holds another job's results (a job.json of another job,
    or files of a run without one, such as a pretraining run) is refused,
    never overwritten; rerunning the same job into its own folder is fine.
    """
    marker = os.path.join(path, JOB_MARKER)
    if os.path.exists(marker):
        previous = read_json(marker).get("job")
        if previous != job:
            raise OutputDirError(f"{path} holds the results of a {previous} job; give this "
                                 f"{job} job another `output_dir`")
    elif os.path.isdir(path) and os.listdir(path):
        raise OutputDirError(f"{path} is not empty ({', '.join(sorted(os.listdir(path))[:5])}"
                             f"...) and is not a {job} job's folder; give another `output_dir`")
    os.makedirs(path, exist_ok=True)
    write_json(marker, {"job": job, "settings": settings})


def write_summary(folder: str, summary: dict) -> str:
    """summary.json of a run, atomically; returns its path."""
    path = os.path.join(folder, SUMMARY)
    write_json(path, summary)
    return path


# -- pretraining runs ----------------------------------------------------------------

def save_pretrained(model: keras.Model, model_dir: str) -> None:
    """simclr.keras (the whole model) and encoder.keras, each atomically."""
    _save(model, os.path.join(model_dir, SIMCLR_MODEL))
    _save(model.encoder, os.path.join(model_dir, ENCODER_MODEL))


def load_simclr(model_dir: str) -> keras.Model:
    """The SimCLR model a pretraining run saved (a fresh copy each call)."""
    if not is_pretraining_run(model_dir):
        raise ModelSourceError(f"{model_dir} has no {SIMCLR_MODEL}: not a finished "
                               "pretraining run")
    return keras.models.load_model(os.path.join(model_dir, SIMCLR_MODEL))


def append_history(model_dir: str, history: dict, knn_points: list, chunk: int) -> None:
    """Adds a fit's per-interval metrics (and kNN readings) to history.json,
    keeping those of earlier, resumed runs, for the training curves."""
    previous = read_history(model_dir) or {}
    merged = {"steps_per_point": chunk,
              "knn": [tuple(p) for p in previous.get("knn", [])] + [list(p) for p in knn_points]}
    for name, values in history.items():
        merged[name] = previous.get(name, []) + [float(np.ravel(v)[0]) for v in values]
    write_json(os.path.join(model_dir, HISTORY), merged)


def read_history(model_dir: str) -> dict | None:
    return read_optional_json(model_dir, HISTORY)


# -- exports (read side; contrastive_tf.serving writes them) ------------------------

def read_card(path: str) -> dict:
    """The model card of an export version directory."""
    if not is_export(path):
        raise ModelSourceError(f"{path} is not an export version directory (no {SAVED_MODEL} "
                               f"and {MODEL_CARD}; give e.g. exports/<name>/<version>)")
    return read_json(os.path.join(path, MODEL_CARD))


def load_keras_copy(path: str, kind: str | None = None,
                    instead: str = "another model") -> tuple[keras.Model, dict]:
    """The Keras model an export was written from, and its card: for an
    encoder a model `images -> {"h": features, "z": projection}` whose
    layers include the encoder and head by the card's names; for a
    classifier the classifier. With `kind`, an export of another kind is
    refused, saying to give `instead`."""
    card = read_card(path)
    if kind is not None and card.get("kind") != kind:
        raise ModelSourceError(f"{path} is an export of an {card.get('kind')}, not of "
                               f"{'an' if kind == 'encoder' else 'a'} {kind}; give {instead}")
    copy_path = os.path.join(path, KERAS_COPY)
    if not os.path.isfile(copy_path):
        raise ModelSourceError(f"{path} has no Keras copy ({KERAS_COPY}): it was exported by "
                               "an older version; export it again with experiments.export")
    return keras.models.load_model(copy_path), card


# -- model sources: a run or an export, as the jobs take them ------------------------

@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A pretrained encoder (and projection head) and where it came from."""
    encoder: keras.Model
    head: keras.layers.Layer | None
    source: str

    @property
    def image_size(self) -> int:
        return int(self.encoder.input.shape[1])

    @property
    def channels(self) -> int:
        return int(self.encoder.input.shape[-1])


def load_pretrained(src: str) -> Pretrained:
    """The encoder and head of a pretraining run directory (simclr.keras) or
    of an encoder export version directory (its Keras copy); a fresh copy
    each call."""
    if is_pretraining_run(src):
        model = load_simclr(src)
        return Pretrained(model.encoder, model.projection_head, src)
    if _has(src, MODEL_CARD):
        copy, card = load_keras_copy(src, "encoder", "a pretraining run or an encoder export")
        head = card.get("projection_head")
        return Pretrained(copy.get_layer(card["encoder"]),
                          copy.get_layer(head["name"]) if head else None, src)
    if is_classifier_run(src):
        raise ModelSourceError(f"{src} is a fine-tuning or distillation run, not a "
                               "pretrained encoder: give the pretraining run it came from")
    raise ModelSourceError(
        f"{src} is neither a pretraining run (a folder with {SIMCLR_MODEL}, as "
        "experiments.pretrain writes) nor an encoder export (a version folder with "
        f"{SAVED_MODEL} and {MODEL_CARD}, as experiments.export writes)")


def load_classifier(src: str) -> tuple[keras.Model, tuple[str, ...]]:
    """A classifier and its class names, from a fine-tuning or distillation
    run directory (classifier.keras, class_names.json) or a classifier
    export version directory (its Keras copy); classes without names are
    numbered."""
    if is_classifier_run(src):
        names = read_optional_json(src, CLASS_NAMES)
        classifier = keras.models.load_model(os.path.join(src, CLASSIFIER_MODEL))
    elif _has(src, MODEL_CARD):
        classifier, card = load_keras_copy(src, "classifier",
                                           "a fine-tuning run or a classifier export")
        names = card.get("class_names")
    elif is_pretraining_run(src):
        raise ModelSourceError(f"{src} is a pretraining run, not a classifier: fine-tune it "
                               "first (experiments.finetune)")
    else:
        raise ModelSourceError(
            f"{src} is neither a fine-tuning / distillation run (a folder with "
            f"{CLASSIFIER_MODEL}) nor a classifier export (a version folder with "
            f"{SAVED_MODEL} and {MODEL_CARD})")
    count = int(classifier.output.shape[-1])
    return classifier, tuple(names or (str(i) for i in range(count)))


def load_model(src: str) -> tuple[str, keras.Model, tuple[str, ...]]:
    """(kind, model, class_names) of any model source: a classifier, or
    else an encoder (kind "encoder", no class names)."""
    try:
        classifier, names = load_classifier(src)
        return "classifier", classifier, names
    except ModelSourceError as as_classifier:
        try:
            return "encoder", load_pretrained(src).encoder, ()
        except ModelSourceError:
            raise ModelSourceError(
                f"{as_classifier} It is not a pretraining run or encoder export either.") from None


def teacher_encoder(src: str) -> str | None:
    """The encoder a classifier run was fine-tuned from (its job.json's
    `encoder`, as experiments.finetune and experiments.import_simclr write
    it), where it still is a pretraining run or encoder export; else None."""
    marker = read_optional_json(src, JOB_MARKER) or {}
    encoder = (marker.get("settings") or {}).get("encoder")
    if not encoder:
        return None
    # A relative path: relative to the run (import), else to where the
    # fine-tuning job ran (as the user typed it).
    candidates = [encoder] if os.path.isabs(encoder) else [os.path.join(src, encoder), encoder]
    for path in candidates:
        if is_pretraining_run(path) or _has(path, MODEL_CARD):
            return os.path.normpath(path)
    return None


def save_classifier(classifier: keras.Model, class_names, folder: str) -> None:
    """classifier.keras and class_names.json in `folder`, each written
    atomically."""
    os.makedirs(folder, exist_ok=True)
    _save(classifier, os.path.join(folder, CLASSIFIER_MODEL))
    write_json(os.path.join(folder, CLASS_NAMES), list(class_names))


def _save(model: keras.Model, path: str) -> None:
    with atomic_path(path) as tmp:
        model.save(tmp)
