"""SimCLR pretraining job.

    python -m experiments.pretrain --flagfile=experiments/configs/demo.flags \
        --model_dir=runs/pretrain

Flags (one per field of `PretrainConfig`, with its default and help) are
turned into a `PretrainConfig` (written to model_dir/config.json) and handed
to `contrastive_tf.jobs.pretrain.pretrain`. Rerunning the same command resumes
from the last checkpoint in --model_dir.
"""

from absl import app

from experiments import jobs

from contrastive_tf.jobs.config import PretrainConfig
from contrastive_tf.jobs.pretrain import pretrain

jobs.define_flags(PretrainConfig)
main = jobs.job_main(PretrainConfig, pretrain)


if __name__ == "__main__":
    app.run(main)
