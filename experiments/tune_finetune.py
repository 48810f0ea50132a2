"""Tunes fine-tuning and the supervised baseline on the validation split.

    python -m experiments.tune_finetune --output_dir=runs/fashion_mnist \\
        --flagfile=experiments/configs/fashion_mnist_pipeline.flags \\
        --fraction=0.01 --trials="simclr:lr=0.05" --trials="supervised:lr=0.1"

Uses the pipeline's own splits (same seed, same validation images and labelled
subset) and the encoder it pretrained into --output_dir/pretrain. Each trial
is `METHOD:key=value,...` with METHOD `simclr` (from the pretrained encoder)
or `supervised` (from scratch) and keys lr, epochs, patience, wd, batch,
min_steps, crop, from (head|h), and distill (epochs: then distils the
trained classifier into a student on the unlabelled training images, as the
pipeline does, and reports the student too); lr and epochs default to the
pipeline's flags for that method. Prints one `trial ...` line per trial with
validation and test accuracy and appends them to
--output_dir/tuning_<fraction>.jsonl. Choose by validation accuracy only.
"""

import json
import os
import time

from absl import app, flags

from experiments.jobs import quiet_absl_show_progress, reports_known_errors

from experiments import pipeline  # defines the pipeline's flags

FLAGS = flags.FLAGS
flags.DEFINE_float("fraction", 0.01, "Labelled fraction to tune on.")
flags.DEFINE_multi_string("trials", [], "METHOD:key=value,... (see the module doc).")

_KEYS = {"lr": float, "epochs": int, "patience": int, "wd": float, "batch": int,
         "min_steps": int, "crop": float, "from": str, "distill": int}


def parse_trial(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    if method not in ("simclr", "supervised"):
        raise app.UsageError(f"trial {text!r}: method must be simclr or supervised")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in _KEYS:
            raise app.UsageError(f"trial {text!r}: unknown key {key!r} "
                                 f"(known: {', '.join(_KEYS)})")
        try:
            options[key] = _KEYS[key](value)
        except ValueError:
            raise app.UsageError(f"trial {text!r}: {key}={value!r} is not a "
                                 f"{_KEYS[key].__name__}") from None
    if options.get("from", "head") not in ("head", "h"):
        raise app.UsageError(f"trial {text!r}: from must be head or h")
    return method, options


def run_trial(config, splits, method: str, options: dict) -> dict:
    """One trial: a classifier trained as the pipeline trains it, with
    `options` changed; returns its record."""
    from contrastive_tf.jobs import finetune
    from contrastive_tf.jobs import pipeline as pipeline_job
    from contrastive_tf.method.classifier import build_classifier
    from contrastive_tf.runtime.seeds import seeded

    pre, fraction = config.pretrain, config.fractions[0]
    train = splits.subsets[fraction]
    with seeded(config.seed):  # as the pipeline does
        if method == "simclr":
            encoder, head = pipeline_job.pretrained_parts(pre)
            lr, epochs = config.finetune_learning_rate, config.finetune_epochs
        else:
            encoder, head = pipeline_job.fresh_parts(pre)
            lr, epochs = config.supervised_learning_rate, config.supervised_epochs
        if options.get("from", "head") == "h":
            head = None
        classifier = build_classifier(encoder, splits.full.num_classes, head)
    result = finetune.train_classifier(
        classifier, train, splits.val, splits.test, epochs=options.get("epochs", epochs),
        batch_size=options.get("batch", config.finetune_batch_size),
        learning_rate=options.get("lr", lr), weight_decay=options.get("wd", 1e-4),
        patience=options.get("patience", config.patience),
        crop_min_area=options.get("crop", config.finetune_crop_min_area),
        min_steps=options.get("min_steps", config.finetune_min_steps), seed=config.seed,
        policy=pre.precision)
    record = {"method": method, "options": options, "fraction": fraction,
              "labels": train.num_examples, "val_accuracy": result.val_accuracy,
              "test_accuracy": result.test_accuracy, "best_epoch": result.best_epoch,
              "epochs_run": result.epochs_run}
    if options.get("distill"):
        student = pipeline_job.distill_student(config, pre, classifier, splits.pool,
                                               epochs=options["distill"])
        record["student_val_accuracy"] = finetune.evaluate_classifier(student, splits.val)
        record["student_test_accuracy"] = finetune.evaluate_classifier(student, splits.test)
    return record


@reports_known_errors
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.trials:
        raise app.UsageError("at least one --trials is required")
    trials = [parse_trial(t) for t in FLAGS.trials]
    config = pipeline.config_from_flags()
    quiet_absl_show_progress()

    import dataclasses
    from contrastive_tf.jobs import pipeline_data
    from contrastive_tf.runtime import precision

    config = dataclasses.replace(config, fractions=(FLAGS.fraction,), distill_fractions=(),
                                 export_fraction=0.0)
    splits = pipeline_data.labelled_splits(config)
    config = dataclasses.replace(config, pretrain=dataclasses.replace(
        config.pretrain, channels=splits.full.image_shape[-1],
        precision=precision.resolve(config.pretrain.precision).policy))
    os.makedirs(config.output_dir, exist_ok=True)
    log_path = os.path.join(config.output_dir, f"tuning_{FLAGS.fraction:g}.jsonl")
    for method, options in trials:
        started = time.time()
        record = run_trial(config, splits, method, options)
        record["seconds"] = round(time.time() - started, 1)
        print("trial " + " ".join(f"{k}={json.dumps(v, sort_keys=True).replace(' ', '')}"
                                  for k, v in record.items()), flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


if __name__ == "__main__":
    app.run(main)
