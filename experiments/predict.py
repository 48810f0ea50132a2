"""Predict the class of every image in a folder (or get its embedding).

    python -m experiments.predict --model=runs/student \
        --dataset=folder:/data/new_images --output=predictions.csv

--model is a classifier (fine-tuning or distillation run, classifier export)
or an encoder (pretraining run, encoder export; with --embeddings=FILE.npy).
One CSV row per image: its file, the class, its probability and the top-k;
unreadable files are listed with their error.
"""

from absl import app

from contrastive_tf.jobs.config import PredictConfig
from contrastive_tf.jobs.predict import run_predict
from experiments import jobs

jobs.define_flags(PredictConfig)
main = jobs.job_main(PredictConfig, run_predict)

if __name__ == "__main__":
    app.run(main)
