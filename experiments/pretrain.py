"""SimCLR pretraining job.

    python -m experiments.pretrain --flagfile=experiments/configs/demo.flags \
        --model_dir=runs/pretrain

Flags are turned into a `PretrainConfig` (written to model_dir/config.json)
and handed to `contrastive_tf.training.pretrain`. Rerunning the same command
resumes from the last checkpoint in --model_dir.
"""

from absl import app, flags, logging

from experiments.jobs import reports_known_errors

from contrastive_tf.backbones import SUPPORTED_DEPTHS
from contrastive_tf.config import PRECISIONS, STRATEGIES, PretrainConfig
from contrastive_tf.optim import OPTIMIZERS, SCALINGS

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Where checkpoints, logs and models go.")
flags.DEFINE_string("dataset", "embedded",
                    "embedded | fashion_mnist | tfds:<name>[:<config>] | folder:<path>")
flags.DEFINE_string("data_dir", None, "TFDS data_dir, or the Fashion-MNIST folder.")
flags.DEFINE_string("train_split", "", "Split to pretrain on. Default: every image of a "
                    "folder (or its train/ subfolder), a named dataset's 'train' split. "
                    "Folders also take train/test: a fixed 80/20 split by file name.")
flags.DEFINE_string("eval_split", "", "Held-out split for the kNN monitor. Default: the "
                    "dataset's test split (test/ for folders laid out that way; none for a "
                    "folder used whole).")
flags.DEFINE_integer("image_size", 32, "Training image side in pixels.")
flags.DEFINE_integer("channels", 0, "Channels for folder datasets (1 or 3; 0: 1 if every "
                     "image is grayscale, else 3); "
                     "other datasets use their own.")
flags.DEFINE_enum("depth", "18", [str(d) for d in SUPPORTED_DEPTHS], "ResNet depth.")
flags.DEFINE_integer("width_multiplier", 1, "ResNet width multiplier.")
flags.DEFINE_float("sk_ratio", 0.0, "Selective-kernel ratio (0 = off; v2 uses 0.0625).")
flags.DEFINE_integer("base_width", 64, "Channels of the first ResNet stage at 1x.")
flags.DEFINE_integer("projection_layers", 3, "Projection head layers (v1: 2, v2: 3).")
flags.DEFINE_integer("projection_dim", 128, "Projection output width.")
flags.DEFINE_integer("ft_layer", 1, "Head layer that fine-tuning starts from.")
flags.DEFINE_float("temperature", 0.5, "NT-Xent temperature.")
flags.DEFINE_float("color_strength", 0.5, "Colour distortion strength s.")
flags.DEFINE_bool("blur", False, "Gaussian blur (ImageNet recipe).")
flags.DEFINE_float("crop_min_area", 0.08, "Smallest random-crop area fraction.")
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_integer("epochs", 100, "Epochs over the training data.")
flags.DEFINE_integer("train_steps", 0, "Total steps; overrides --epochs when > 0.")
flags.DEFINE_enum("optimizer", "lars", list(OPTIMIZERS), "Optimizer.")
flags.DEFINE_float("learning_rate", 1.0, "Base learning rate (before scaling).")
flags.DEFINE_enum("lr_scaling", "none", list(SCALINGS),
                  "linear: lr*B/256, sqrt: lr*sqrt(B), none: lr.")
flags.DEFINE_float("warmup_epochs", 10, "Linear warmup epochs before cosine decay.")
flags.DEFINE_float("weight_decay", 1e-6, "Weight decay.")
flags.DEFINE_float("momentum", 0.9, "Momentum (LARS, SGD).")
flags.DEFINE_enum("precision", "auto", list(PRECISIONS),
                  "Compute precision. auto: mixed_bfloat16 where bf16 runs natively "
                  "(CPU with amx_bf16 / avx512_bf16, GPU of compute capability >= 8.0), "
                  "mixed_float16 on older GPUs, float32 otherwise.")
flags.DEFINE_enum("strategy", "default", list(STRATEGIES), "tf.distribute strategy.")
flags.DEFINE_integer("checkpoint_steps", 500, "Steps between checkpoints.")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_integer("knn_every_epochs", 0, "kNN monitor interval in epochs (0 = end only "
                     "when labels exist).")
flags.DEFINE_integer("knn_k", 200, "Neighbours of the kNN monitor.")
flags.DEFINE_integer("knn_bank_size", 10000, "Labelled training images in the kNN bank.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("deterministic", False, "Enable TF op determinism.")


def config_from_flags(model_dir: str | None = None) -> PretrainConfig:
    """The PretrainConfig the flags describe (also used by the pipeline job)."""
    model_dir = model_dir or FLAGS.model_dir
    if not model_dir:
        raise ValueError("--model_dir is required")
    return PretrainConfig(
        model_dir=model_dir, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
        train_split=FLAGS.train_split, eval_split=FLAGS.eval_split, image_size=FLAGS.image_size,
        channels=FLAGS.channels, depth=int(FLAGS.depth),
        width_multiplier=FLAGS.width_multiplier, sk_ratio=FLAGS.sk_ratio,
        base_width=FLAGS.base_width, projection_layers=FLAGS.projection_layers,
        projection_dim=FLAGS.projection_dim, ft_layer=FLAGS.ft_layer,
        temperature=FLAGS.temperature, color_strength=FLAGS.color_strength,
        blur=FLAGS.blur, crop_min_area=FLAGS.crop_min_area,
        batch_size=FLAGS.batch_size, epochs=FLAGS.epochs,
        train_steps=FLAGS.train_steps, optimizer=FLAGS.optimizer,
        learning_rate=FLAGS.learning_rate, lr_scaling=FLAGS.lr_scaling,
        warmup_epochs=FLAGS.warmup_epochs, weight_decay=FLAGS.weight_decay,
        momentum=FLAGS.momentum, precision=FLAGS.precision,
        strategy=FLAGS.strategy, checkpoint_steps=FLAGS.checkpoint_steps,
        keep_checkpoints=FLAGS.keep_checkpoints,
        knn_every_epochs=FLAGS.knn_every_epochs, knn_k=FLAGS.knn_k,
        knn_bank_size=FLAGS.knn_bank_size,
        seed=FLAGS.seed, deterministic=FLAGS.deterministic)


@reports_known_errors
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = config_from_flags()
    except ValueError as error:
        raise app.UsageError(str(error))
    logging.set_verbosity(logging.WARNING)
    from contrastive_tf import training
    training.pretrain(config)


if __name__ == "__main__":
    app.run(main)
