"""Distil a fine-tuned teacher into a student on your unlabelled images.

    python -m experiments.distill --teacher=runs/finetune \
        --dataset=folder:/data/unlabelled --test_dataset=folder:/data/test \
        --output_dir=runs/student

--teacher is a fine-tuning run or a classifier export; --dataset's images
are used whole and their labels, if any, ignored. The student is the
teacher's architecture freshly initialised, a ResNet of --student_depth /
--student_base_width, or starts from --student_encoder. Writes
classifier.keras, class_names.json and summary.json into --output_dir.
"""

from absl import app, logging

from contrastive_tf.config import DistillConfig
from experiments import jobs

jobs.define_flags(DistillConfig)


@jobs.reports_known_errors
def main(argv):
    config = jobs.config_from_flags(DistillConfig, argv)
    logging.set_verbosity(logging.WARNING)
    from contrastive_tf import distill
    distill.run_distill(config)


if __name__ == "__main__":
    app.run(main)
