"""Fine-tune a pretrained encoder on the labelled images you have.

    python -m experiments.finetune --encoder=runs/pretrain \
        --dataset=folder:/data/labelled --test_dataset=folder:/data/test \
        --output_dir=runs/finetune

--encoder is a pretraining run or an encoder export; --dataset is used whole
(a class-balanced part of it is held out for model selection). Writes
classifier.keras, class_names.json and summary.json into --output_dir.
"""

from absl import app

from contrastive_tf.jobs.config import FinetuneConfig
from contrastive_tf.jobs.finetune import run_finetune
from experiments import jobs

jobs.define_flags(FinetuneConfig)
main = jobs.job_main(FinetuneConfig, run_finetune)

if __name__ == "__main__":
    app.run(main)
