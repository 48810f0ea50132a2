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

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Run directory (pretraining, fine-tuning or distillation).")
flags.DEFINE_string("export_root", None, "Folder of exported models (TF Serving's base).")
flags.DEFINE_string("model_name", None, "Model name (a subfolder of export_root).")
flags.DEFINE_enum("kind", "encoder", ["encoder", "classifier"], "What to export.")
flags.DEFINE_integer("version", None, "Version number; default: the next free one.")
flags.DEFINE_bool("overwrite", False, "Replace an existing version.")
flags.DEFINE_bool("with_projection", True, "Encoders: include the projection head.")
flags.DEFINE_integer("max_image_pixels", 1 << 26, "Largest height x width a serving "
                     "request may send (checked from the image header before decoding).")
flags.mark_flags_as_required(["model_dir", "export_root", "model_name"])


@reports_known_errors
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.max_image_pixels < 1:
        raise app.UsageError(f"--max_image_pixels must be >= 1, got {FLAGS.max_image_pixels}")
    logging.set_verbosity(logging.WARNING)
    import keras

    import contrastive_tf  # noqa: F401  (registers the serialisable classes)
    from contrastive_tf import export
    from contrastive_tf.files import read_json

    def optional_json(name):
        path = os.path.join(FLAGS.model_dir, name)
        return read_json(path) if os.path.exists(path) else None

    card = {"source_run": os.path.abspath(FLAGS.model_dir),
            "training_config": optional_json("config.json"),
            "metrics": (optional_json("summary.json") or {}).get("metrics")}
    if FLAGS.kind == "encoder":
        path = os.path.join(FLAGS.model_dir, "simclr.keras")
        if not os.path.exists(path):
            raise app.UsageError(f"{path} not found: is {FLAGS.model_dir} a pretraining run?")
        model = keras.models.load_model(path)
        target = export.export_encoder(
            model.encoder, FLAGS.export_root, FLAGS.model_name,
            projection_head=model.projection_head if FLAGS.with_projection else None,
            version=FLAGS.version, overwrite=FLAGS.overwrite, card=card,
            max_image_pixels=FLAGS.max_image_pixels)
    else:
        path = os.path.join(FLAGS.model_dir, "classifier.keras")
        if not os.path.exists(path):
            raise app.UsageError(f"{path} not found: is {FLAGS.model_dir} a "
                                 "fine-tuning or distillation run?")
        classes = optional_json("class_names.json")
        if classes is None:
            print(f"[export] warning: {FLAGS.model_dir} has no class_names.json: the export "
                  "answers class ids only, without class names", flush=True)
        target = export.export_classifier(
            keras.models.load_model(path), FLAGS.export_root, FLAGS.model_name,
            class_names=classes, version=FLAGS.version, overwrite=FLAGS.overwrite,
            card=card, max_image_pixels=FLAGS.max_image_pixels)
    print(f"[export] wrote {target}")


if __name__ == "__main__":
    app.run(main)
