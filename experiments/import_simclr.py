"""Import a published SimCLR / SimCLRv2 model (google-research/simclr, TF2).

    python -m experiments.import_simclr \
        --source=r50_1x_sk0/saved_model --output_dir=imported/r50_1x_sk0

--source is a SavedModel of the reference TF2 code (the released
simclr-checkpoints-tf2 folders: <model>/saved_model/, a numbered step in it)
or a TF2 training checkpoint written by that code. <output_dir>/encoder/ is
a pretraining run for experiments.finetune --encoder (and predict, export,
distill); <output_dir>/classifier/ a classifier run where the model has a
supervised head; summary.json says what was found and how closely the
imported model reproduces the source.
"""

from absl import app

from contrastive_tf.jobs.config import ImportConfig
from contrastive_tf.jobs.import_simclr import run_import
from experiments import jobs

jobs.define_flags(ImportConfig)
main = jobs.job_main(ImportConfig, run_import)

if __name__ == "__main__":
    app.run(main)
