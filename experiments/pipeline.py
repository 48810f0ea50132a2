"""The main job: SimCLR's semi-supervised pipeline, end to end.

    python -m experiments.pipeline --output_dir=runs/demo --flagfile=experiments/configs/demo.flags

pretrain -> linear probe / kNN -> fine-tune at 1 and 10 percent of the labels -> supervised
baseline on the same labels -> distil each fine-tuned teacher into a student ->
export -> results.json, results.md, label_efficiency.png in --output_dir.
Every pretraining flag of experiments.pretrain applies to the pretraining stage.
"""

import os

from absl import app, flags, logging

from experiments import pretrain as pretrain_flags
from experiments.jobs import reports_known_errors

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", None, "Where every stage writes its outputs.")
flags.DEFINE_list("fractions", ["0.01", "0.1"], "Labelled fractions to fine-tune on.")
flags.DEFINE_float("val_fraction", 0.1, "Training images held out for model selection.")
flags.DEFINE_integer("finetune_epochs", 30, "Fine-tuning epochs (the cosine schedule's length).")
flags.DEFINE_integer("finetune_batch_size", 64, "Fine-tuning batch size.")
flags.DEFINE_float("finetune_learning_rate", 0.05, "Fine-tuning peak learning rate "
                   "(0.01 / 0.05 / 0.1 tried on the validation split: BENCHMARKS.md).")
flags.DEFINE_integer("finetune_min_steps", 10, "Minimum steps per fine-tuning epoch.")
flags.DEFINE_float("supervised_learning_rate", 0.1, "Supervised baseline peak learning rate "
                   "(0.05 / 0.1 / 0.2 tried on the validation split: BENCHMARKS.md).")
flags.DEFINE_integer("supervised_epochs", 60, "Supervised-baseline epochs (the cosine "
                     "schedule's length).")
flags.DEFINE_integer("patience", 0, "Early-stopping patience in epochs; 0: run the whole "
                     "learning-rate schedule (the best validation epoch is kept either way).")
flags.DEFINE_float("finetune_crop_min_area", 0.3, "Smallest crop area when fine-tuning.")
flags.DEFINE_integer("probe_steps", 1000, "Full-batch steps of the linear probe.")
flags.DEFINE_integer("probe_knn_k", 20, "Neighbours for the kNN evaluation.")
flags.DEFINE_list("distill_fractions", [], "Fractions whose fine-tuned models each teach "
                  "a student (default: every fraction).")
flags.DEFINE_float("export_fraction", 0.0, "Fraction whose fine-tuned classifier and "
                   "student are exported (default: the largest distilled one).")
flags.DEFINE_integer("distill_epochs", 3, "Distillation epochs over the training images.")
flags.DEFINE_float("distill_temperature", 1.0, "Distillation temperature.")
flags.DEFINE_float("distill_learning_rate", 0.05, "Distillation peak learning rate.")
flags.DEFINE_integer("student_base_width", 0, "Student ResNet base width (0: teacher's).")
flags.DEFINE_enum("student_init", "pretrained", ["pretrained", "scratch"],
                  "Student starts from the pretrained encoder or from scratch.")
flags.DEFINE_string("unlabelled_dataset", "", "Your unlabelled images (e.g. folder:/data/pool, "
                    "used whole): pretraining and distillation run on them. Default: the "
                    "training images of --dataset.")
flags.DEFINE_string("labelled_dataset", "", "Your labelled images (class subfolders, used "
                    "whole less a validation part), instead of fractions of --dataset; needs "
                    "--test_dataset.")
flags.DEFINE_string("test_dataset", "", "Your labelled test images, with --labelled_dataset.")
flags.DEFINE_integer("label_seeds", 1, "Class-balanced label draws per fraction; results.json "
                     "reports each method's mean and standard deviation over them.")


@reports_known_errors
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.output_dir:
        raise app.UsageError("--output_dir is required")
    logging.set_verbosity(logging.WARNING)
    from contrastive_tf.config import PipelineConfig
    try:
        config = PipelineConfig(
            output_dir=FLAGS.output_dir,
            pretrain=pretrain_flags.config_from_flags(
                FLAGS.model_dir or os.path.join(FLAGS.output_dir, "pretrain")),
            fractions=tuple(float(f) for f in FLAGS.fractions),
            val_fraction=FLAGS.val_fraction, finetune_epochs=FLAGS.finetune_epochs,
            finetune_batch_size=FLAGS.finetune_batch_size,
            finetune_learning_rate=FLAGS.finetune_learning_rate,
            finetune_min_steps=FLAGS.finetune_min_steps,
            supervised_learning_rate=FLAGS.supervised_learning_rate,
            supervised_epochs=FLAGS.supervised_epochs,
            patience=FLAGS.patience, finetune_crop_min_area=FLAGS.finetune_crop_min_area,
            probe_steps=FLAGS.probe_steps, knn_k=FLAGS.probe_knn_k,
            distill_fractions=tuple(float(f) for f in FLAGS.distill_fractions),
            export_fraction=FLAGS.export_fraction, distill_epochs=FLAGS.distill_epochs,
            distill_temperature=FLAGS.distill_temperature,
            distill_learning_rate=FLAGS.distill_learning_rate,
            student_base_width=FLAGS.student_base_width,
            student_init=FLAGS.student_init, seed=FLAGS.seed,
            unlabelled_dataset=FLAGS.unlabelled_dataset,
            labelled_dataset=FLAGS.labelled_dataset, test_dataset=FLAGS.test_dataset,
            label_seeds=FLAGS.label_seeds)
    except ValueError as error:
        raise app.UsageError(str(error))
    from contrastive_tf import semi_supervised
    semi_supervised.run_pipeline(config)


if __name__ == "__main__":
    app.run(main)
