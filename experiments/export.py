"""Exports a trained model as a SavedModel in TF Serving's layout.

    python -m experiments.export --model_dir=runs/demo --export_root=exports \
        --model_name=simclr_encoder                     # a pretraining run's encoder
    python -m experiments.export --kind=classifier --model_dir=runs/demo/finetune_0.1 \
        --export_root=exports --model_name=fashion_classifier

Writes `<export_root>/<model_name>/<version>/` (next free version unless
--version is given; an existing version is only replaced with --overwrite).
"""

import os

from absl import app, flags, logging

from experiments.jobs import reports_known_errors

from contrastive_tf.runs import artifacts
from contrastive_tf.runtime import precision
from contrastive_tf.serving import export
from contrastive_tf.serving.signatures import DEFAULT_MAX_IMAGE_PIXELS

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Run directory (pretraining, fine-tuning or distillation).")
flags.DEFINE_string("export_root", None, "Folder of exported models (TF Serving's base).")
flags.DEFINE_string("model_name", None, "Model name (a subfolder of export_root).")
flags.DEFINE_enum("kind", "encoder", ["encoder", "classifier"], "What to export.")
flags.DEFINE_integer("version", None, "Version number; default: the next free one.")
flags.DEFINE_bool("overwrite", False, "Replace an existing version.")
flags.DEFINE_bool("with_projection", True, "Encoders: include the projection head.")
flags.DEFINE_integer("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS,
                     "Largest height x width a serving request may send (checked from the "
                     "image header before decoding).")
flags.DEFINE_enum("precision", "auto", list(precision.PRECISIONS),
                  "Compute precision of the exported graph, whatever the model was trained in. "
                  "auto: float32, since the serving machine is not this one (bf16 is emulated, "
                  "and slow, on CPUs without avx512_bf16 / amx); mixed_bfloat16 or "
                  "mixed_float16 for servers known to run it natively.")
flags.mark_flags_as_required(["model_dir", "export_root", "model_name"])


@reports_known_errors
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.max_image_pixels < 1:
        raise app.UsageError(f"--max_image_pixels must be >= 1, got {FLAGS.max_image_pixels}")
    logging.set_verbosity(logging.WARNING)
    run = FLAGS.model_dir
    policy = "float32" if FLAGS.precision == "auto" else FLAGS.precision
    print(f"[export] computing in {policy}" + (" (auto: the serving machine is not this one)"
                                               if FLAGS.precision == "auto" else ""), flush=True)
    card = {"source_run": os.path.abspath(run),
            "training_config": artifacts.read_optional_json(run, artifacts.CONFIG),
            "metrics": (artifacts.read_optional_json(run, artifacts.SUMMARY) or {}).get("metrics"),
            "precision": policy}
    if FLAGS.kind == "encoder":
        if not artifacts.is_pretraining_run(run):
            raise app.UsageError(f"{run} has no {artifacts.SIMCLR_MODEL}: is it a pretraining "
                                 "run?")
        model = artifacts.load_simclr(run)
        precision.recast(model.encoder, policy)
        precision.recast(model.projection_head, policy)
        target = export.export_encoder(
            model.encoder, FLAGS.export_root, FLAGS.model_name,
            projection_head=model.projection_head if FLAGS.with_projection else None,
            version=FLAGS.version, overwrite=FLAGS.overwrite, card=card,
            max_image_pixels=FLAGS.max_image_pixels)
    else:
        if not artifacts.is_classifier_run(run):
            raise app.UsageError(f"{run} has no {artifacts.CLASSIFIER_MODEL}: is it a "
                                 "fine-tuning or distillation run?")
        classifier, _ = artifacts.load_classifier(run)
        precision.recast(classifier, policy)
        classes = artifacts.read_optional_json(run, artifacts.CLASS_NAMES)
        if classes is None:
            print(f"[export] warning: {run} has no {artifacts.CLASS_NAMES}: the export "
                  "answers class ids only, without class names", flush=True)
        target = export.export_classifier(
            classifier, FLAGS.export_root, FLAGS.model_name,
            class_names=classes, version=FLAGS.version, overwrite=FLAGS.overwrite,
            card=card, max_image_pixels=FLAGS.max_image_pixels)
    print(f"[export] wrote {target}")


if __name__ == "__main__":
    app.run(main)
