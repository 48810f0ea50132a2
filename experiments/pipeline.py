"""The main job: SimCLR's semi-supervised pipeline, end to end.

    python -m experiments.pipeline --output_dir=runs/demo --flagfile=experiments/configs/demo.flags

pretrain -> linear probe / kNN -> fine-tune at 1 and 10 percent of the labels -> supervised
baseline on the same labels -> distil each fine-tuned teacher into a student ->
export -> results.json, results.md, label_efficiency.png in --output_dir.
Every pretraining flag of experiments.pretrain applies to the pretraining stage
(--model_dir defaults to <output_dir>/pretrain); the other flags are the fields
of `PipelineConfig`.
"""

import os

from absl import app, flags

from experiments import jobs
from experiments import pretrain  # noqa: F401  (defines the pretraining flags)

from contrastive_tf.jobs.config import PipelineConfig, PretrainConfig
from contrastive_tf.jobs.pipeline import run_pipeline

jobs.define_flags(PipelineConfig, shared=("seed",))  # one --seed for all stages


def config_from_flags(argv=None) -> PipelineConfig:
    """The PipelineConfig the flags describe (also used by tune_finetune)."""
    output_dir = flags.FLAGS.output_dir
    if not output_dir:
        raise app.UsageError("--output_dir required")
    pre = jobs.config_from_flags(
        PretrainConfig, model_dir=flags.FLAGS.model_dir or os.path.join(output_dir, "pretrain"))
    return jobs.config_from_flags(PipelineConfig, argv, pretrain=pre)


@jobs.reports_known_errors
def main(argv):
    config = config_from_flags(argv)
    jobs.quiet_absl_show_progress()
    run_pipeline(config)


if __name__ == "__main__":
    app.run(main)
