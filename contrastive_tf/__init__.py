"""contrastive_tf: SimCLR / SimCLRv2 in Keras 3 on TensorFlow."""

from contrastive_tf import (augment, backbones, config, data, distill, distribution,
                            evaluation, files, finetune, heads, kernels, losses, optim,
                            precision, progress, seeds)
from contrastive_tf.augment import SimCLRAugmenter
from contrastive_tf.backbones import resnet
from contrastive_tf.heads import ProjectionHead
from contrastive_tf.losses import distillation_loss, nt_xent, nt_xent_with_accuracy
from contrastive_tf.model import SimCLR
from contrastive_tf.optim import LARS, WarmupCosine

__version__ = "0.1.0"

__all__ = [
    "LARS",
    "WarmupCosine",
    "config",
    "data",
    "distill",
    "evaluation",
    "files",
    "finetune",
    "kernels",
    "optim",
    "precision",
    "progress",
    "seeds",
    "ProjectionHead",
    "SimCLR",
    "SimCLRAugmenter",
    "augment",
    "backbones",
    "distillation_loss",
    "distribution",
    "heads",
    "losses",
    "nt_xent",
    "nt_xent_with_accuracy",
    "resnet",
]
