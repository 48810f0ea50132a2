"""Fine-tune a pretrained encoder on the labelled images you have.

    python -m experiments.finetune --encoder=runs/pretrain \
        --dataset=folder:/data/labelled --test_dataset=folder:/data/test \
        --output_dir=runs/finetune

--encoder is a pretraining run or an encoder export; --dataset is used whole
(a class-balanced part of it is held out for model selection). Writes
classifier.keras, class_names.json and summary.json into --output_dir.
"""

from absl import app, logging

from contrastive_tf.config import FinetuneConfig
from experiments import jobs

jobs.define_flags(FinetuneConfig)


@jobs.reports_known_errors
def main(argv):
    config = jobs.config_from_flags(FinetuneConfig, argv)
    logging.set_verbosity(logging.WARNING)
    from contrastive_tf import finetune
    finetune.run_finetune(config)


if __name__ == "__main__":
    app.run(main)
