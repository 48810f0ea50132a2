"""The one way each job's models are built.

- `fresh_encoder_and_head(config)`: a newly initialised ResNet and projection
  head of a `PretrainConfig`'s architecture (pretraining; the supervised
  baseline; a student from scratch).
- `build_simclr(config)`: those parts with the config's augmenter and loss
  temperature, as the pretraining job trains them.
- `classifier_parts(pretrained, from_layer)`: the encoder and the head (or
  none) a classifier starts from.
- `build_student(teacher, parts)`: a student for distillation, on the given
  encoder and head, or the teacher's own architecture freshly initialised.

Batch norm is synchronised across replicas only when the caller says so
(`synchronized_bn`): the pretraining job passes whether its strategy has
several replicas, and says it.
"""

from __future__ import annotations

import keras

from contrastive_tf.jobs.config import PretrainConfig
from contrastive_tf.method.augment import SimCLRAugmenter
from contrastive_tf.method.backbones import resnet
from contrastive_tf.method.classifier import build_classifier
from contrastive_tf.method.heads import ProjectionHead
from contrastive_tf.method.model import SimCLR
from contrastive_tf.runs.artifacts import Pretrained
from contrastive_tf.runtime import precision


def _encoder(config: PretrainConfig, synchronized_bn: bool) -> keras.Model:
    return resnet(config.depth, config.width_multiplier, sk_ratio=config.sk_ratio,
                  base_width=config.base_width, synchronized_bn=synchronized_bn,
                  input_shape=(config.image_size, config.image_size, config.channels))


def _projection_head(config: PretrainConfig, synchronized_bn: bool) -> ProjectionHead:
    return ProjectionHead(config.projection_layers, config.projection_dim,
                          ft_layer=config.ft_layer, synchronized_bn=synchronized_bn)


def fresh_encoder_and_head(config: PretrainConfig, *, head: bool = True,
                           synchronized_bn: bool = False):
    """A newly initialised encoder, and with `head` a projection head
    (built on the encoder's features), of `config`'s architecture; in the
    current dtype policy. Returns (encoder, head or None)."""
    encoder = _encoder(config, synchronized_bn)
    if not head:
        return encoder, None
    projection = _projection_head(config, synchronized_bn)
    projection.build(encoder.output.shape)
    return encoder, projection


def build_simclr(config: PretrainConfig, synchronized_bn: bool = False) -> SimCLR:
    """The SimCLR model a config describes (call inside strategy.scope()).
    The parts are made in a fixed order (encoder, augmenter, head), which
    fixes their initial weights for a seed."""
    encoder = _encoder(config, synchronized_bn)
    augmenter = SimCLRAugmenter(config.image_size, crop_area=(config.crop_min_area, 1.0),
                                color_strength=config.color_strength, blur=config.blur,
                                seed=config.seed)
    head = _projection_head(config, synchronized_bn)
    return SimCLR(encoder, augmenter, head, temperature=config.temperature)


def classifier_parts(pretrained: Pretrained, from_layer: str = "head"):
    """(encoder, head or None): fine-tuning starts from the head's
    `ft_layer` ('head', SimCLRv2, where the head has one) or from h ('h')."""
    if from_layer not in ("head", "h"):
        raise ValueError(f"Expected from_layer 'head' or 'h'. Received: from_layer={from_layer!r}")
    head = pretrained.head if from_layer == "head" else None
    if head is not None and head.ft_layer == 0:
        head = None
    return pretrained.encoder, head


def build_student(teacher: keras.Model, parts=None, policy: str = "float32",
                  name: str = "student") -> keras.Model:
    """A student with the teacher's classes: a linear layer on `parts`
    (encoder, head or None) when given, else the teacher's architecture
    freshly initialised in `policy`."""
    num_classes = int(teacher.output.shape[-1])
    if parts is not None:
        encoder, head = parts
        expected = tuple(teacher.input.shape[1:])
        if tuple(encoder.input.shape[1:]) != expected:
            raise ValueError(f"the student's encoder takes {tuple(encoder.input.shape[1:])} "
                             f"images, the teacher {expected}")
        return build_classifier(encoder, num_classes, head, name=name)
    with precision.policy_scope(policy):
        return keras.models.clone_model(teacher)
