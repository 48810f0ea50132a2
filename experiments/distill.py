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

from absl import app

from contrastive_tf.jobs.config import DistillConfig
from contrastive_tf.jobs.distill import run_distill
from experiments import jobs

jobs.define_flags(DistillConfig)
main = jobs.job_main(DistillConfig, run_distill)

if __name__ == "__main__":
    app.run(main)
