"""contrastive_tf: SimCLR / SimCLRv2 in Keras 3 on TensorFlow.

The package is cut into layers, each a subpackage that imports only from
the ones before it:

    runtime   precision, tf.distribute, atomic files, progress, seeds, compat
    method    augmentation, ResNets, heads, losses, the SimCLR model, the
              classifier and distiller models, LARS, linear probe / kNN
    data      dataset specs, folders, conversion, label subsets, tf.data
    runs      what each job's folder holds: load, save, recognise; checkpoints;
              the published SimCLR models imported (`import_simclr`)
    serving   SavedModel export in TF Serving's layout
    jobs      pretrain, finetune, distill, predict, pipeline (what
              experiments/ runs), their configs and the one place their
              models are built

`import contrastive_tf as ct` gives the method's main classes and functions
at the top (`ct.SimCLR`, `ct.resnet`, `ct.nt_xent`, ...) and each module by
its short name (`ct.data`, `ct.pretrain`, `ct.finetune`, ...).
"""

from contrastive_tf import data
from contrastive_tf.jobs import (config, distill, finetune, models, pipeline, predict, pretrain,
                                 visualize)
from contrastive_tf.method import (augment, backbones, classifier, evaluation, heads, kernels,
                                   losses, optim)
from contrastive_tf.method.augment import SimCLRAugmenter, finetune_augmenter
from contrastive_tf.method.backbones import resnet
from contrastive_tf.method.classifier import build_classifier
from contrastive_tf.method.distiller import Distiller
from contrastive_tf.method.heads import ProjectionHead
from contrastive_tf.method.losses import distillation_loss, nt_xent, nt_xent_with_accuracy
from contrastive_tf.method.model import SimCLR
from contrastive_tf.method.optim import LARS, WarmupCosine
from contrastive_tf.runs import artifacts, checkpoints, simclr_import, simclr_source
from contrastive_tf.runs.simclr_import import import_simclr
from contrastive_tf.runtime import compat, distribution, files, precision, progress, seeds
from contrastive_tf.serving import export
from contrastive_tf.version import __version__

__all__ = [
    "Distiller",
    "LARS",
    "ProjectionHead",
    "SimCLR",
    "SimCLRAugmenter",
    "WarmupCosine",
    "__version__",
    "artifacts",
    "augment",
    "backbones",
    "build_classifier",
    "checkpoints",
    "classifier",
    "compat",
    "config",
    "data",
    "distill",
    "distillation_loss",
    "distribution",
    "evaluation",
    "export",
    "files",
    "finetune",
    "finetune_augmenter",
    "heads",
    "import_simclr",
    "kernels",
    "losses",
    "models",
    "nt_xent",
    "nt_xent_with_accuracy",
    "optim",
    "pipeline",
    "precision",
    "predict",
    "pretrain",
    "progress",
    "resnet",
    "seeds",
    "simclr_import",
    "simclr_source",
    "visualize",
]
