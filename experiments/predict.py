"""Predict the class of every image in a folder (or get its embedding).

    python -m experiments.predict --model=runs/student \
        --dataset=folder:/data/new_images --output=predictions.csv

--model is a classifier (fine-tuning or distillation run, classifier export)
or an encoder (pretraining run, encoder export; with --embeddings=FILE.npy).
One CSV row per image: its file, the class, its probability and the top-k;
unreadable files are listed with their error.
"""

from absl import app, logging

from contrastive_tf.config import PredictConfig
from experiments import jobs

jobs.define_flags(PredictConfig)


@jobs.reports_known_errors
def main(argv):
    config = jobs.config_from_flags(PredictConfig, argv)
    logging.set_verbosity(logging.WARNING)
    from contrastive_tf import predict
    predict.run_predict(config)


if __name__ == "__main__":
    app.run(main)
