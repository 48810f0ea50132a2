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

from absl import app, flags, logging

from experiments.jobs import reports_known_errors

from experiments import pipeline as pipeline_flags  # noqa: F401  (defines the flags)

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


@reports_known_errors
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.output_dir or not FLAGS.trials:
        raise app.UsageError("--output_dir and at least one --trials are required")
    trials = [parse_trial(t) for t in FLAGS.trials]
    logging.set_verbosity(logging.WARNING)

    import dataclasses
    import keras
    from contrastive_tf import finetune, precision, semi_supervised
    from contrastive_tf.config import PipelineConfig
    from experiments import pretrain as pretrain_flags

    pre = pretrain_flags.config_from_flags(
        FLAGS.model_dir or os.path.join(FLAGS.output_dir, "pretrain"))
    config = PipelineConfig(output_dir=FLAGS.output_dir, pretrain=pre,
                            fractions=(FLAGS.fraction,),
                            finetune_crop_min_area=FLAGS.finetune_crop_min_area,
                            distill_temperature=FLAGS.distill_temperature,
                            distill_learning_rate=FLAGS.distill_learning_rate,
                            student_init=FLAGS.student_init,
                            student_base_width=FLAGS.student_base_width,
                            val_fraction=FLAGS.val_fraction, seed=FLAGS.seed)
    splits = semi_supervised.labelled_splits(config)
    pre = dataclasses.replace(pre, channels=splits.full.image_shape[-1],
                              precision=precision.resolve(pre.precision).policy)
    train = splits.subsets[FLAGS.fraction]
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    log_path = os.path.join(FLAGS.output_dir, f"tuning_{FLAGS.fraction:g}.jsonl")
    for method, options in trials:
        keras.utils.set_random_seed(FLAGS.seed)  # as the pipeline does
        if method == "simclr":
            encoder, head = semi_supervised.pretrained_encoder_and_head(pre)
            lr, epochs = FLAGS.finetune_learning_rate, FLAGS.finetune_epochs
        else:
            encoder, head = semi_supervised.fresh_encoder_and_head(pre)
            lr, epochs = FLAGS.supervised_learning_rate, FLAGS.supervised_epochs
        if options.get("from", "head") == "h":
            head = None
        classifier = finetune.build_classifier(encoder, splits.full.num_classes, head)
        epochs = options.get("epochs", epochs)
        started = time.time()
        result = finetune.train_classifier(
            classifier, train, splits.val, splits.test, epochs=epochs,
            batch_size=options.get("batch", FLAGS.finetune_batch_size),
            learning_rate=options.get("lr", lr),
            weight_decay=options.get("wd", 1e-4),
            patience=options.get("patience", FLAGS.patience),
            crop_min_area=options.get("crop", FLAGS.finetune_crop_min_area),
            min_steps=options.get("min_steps", FLAGS.finetune_min_steps), seed=FLAGS.seed,
            policy=pre.precision)
        record = {"method": method, "options": options, "fraction": FLAGS.fraction,
                  "labels": train.num_examples, "val_accuracy": result.val_accuracy,
                  "test_accuracy": result.test_accuracy, "best_epoch": result.best_epoch,
                  "epochs_run": result.epochs_run}
        if options.get("distill"):
            student = semi_supervised.distill_student(config, pre, classifier, splits.pool,
                                                      epochs=options["distill"])
            record["student_val_accuracy"] = finetune.evaluate_classifier(student, splits.val)
            record["student_test_accuracy"] = finetune.evaluate_classifier(student,
                                                                           splits.test)
        record["seconds"] = round(time.time() - started, 1)
        print("trial " + " ".join(f"{k}={json.dumps(v, sort_keys=True).replace(' ', '')}"
                                  for k, v in record.items()), flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


if __name__ == "__main__":
    app.run(main)
