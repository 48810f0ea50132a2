"""Projection head g(h) for SimCLR v1/v2."""

from __future__ import annotations

import keras
from keras import layers

from contrastive_tf.runtime import distribution
from contrastive_tf.method.kernels import FusedBatchNormalization


@keras.saving.register_keras_serializable(package="contrastive_tf")
class ProjectionHead(keras.layers.Layer):
    """The nonlinear projection head z = g(h).

    `num_layers - 1` hidden layers of Dense (no bias) -> BN -> ReLU whose width
    is the width of h (or `hidden_dim`), then Dense(`output_dim`, no bias) ->
    BN without centring, no ReLU. SimCLR v1 uses 2 layers, v2 uses 3 and
    fine-tunes from the first hidden layer (`ft_layer=1`).

    Args:
        num_layers: total Dense layers, >= 1. Defaults to `3` (v2).
        output_dim: width of z. Defaults to `128`.
        ft_layer: which output fine-tuning starts from: 0 is h itself, k is
            the output of the k-th hidden layer. Defaults to `1`.
        hidden_dim: hidden width. Defaults to `None` (the width of h).
        bn_momentum: Defaults to `0.9`.
        bn_epsilon: Defaults to `1e-5`.
        synchronized_bn: synchronise BN across replicas. Defaults to `None`
            (on when the current strategy has several replicas).

    Call arguments:
        h: `(batch, features)` encoder features.
        training: BN mode.

    Returns:
        z, `(batch, output_dim)`, in float32.

    Example:
    >>> head = ProjectionHead(num_layers=3, output_dim=128)
    >>> z = head(tf.zeros((2, 512)))
    >>> ft = head.finetune_features(tf.zeros((2, 512)))  # (2, 512)

    References:
        - [Chen et al., 2020b](https://arxiv.org/abs/2006.10029), section 2.
    """

    def __init__(self, num_layers: int = 3, output_dim: int = 128,
                 ft_layer: int = 1, hidden_dim: int | None = None,
                 bn_momentum: float = 0.9, bn_epsilon: float = 1e-5,
                 synchronized_bn: bool | None = None, **kwargs):
        super().__init__(**kwargs)
        if num_layers < 1:
            raise ValueError(
                f"Expected num_layers >= 1. Received: num_layers={num_layers}")
        if output_dim < 1:
            raise ValueError(
                f"Expected output_dim >= 1. Received: output_dim={output_dim}")
        if not 0 <= ft_layer < num_layers:
            raise ValueError(
                f"Expected 0 <= ft_layer < num_layers={num_layers}. "
                f"Received: ft_layer={ft_layer}")
        if hidden_dim is not None and hidden_dim < 1:
            raise ValueError(
                f"Expected hidden_dim >= 1. Received: hidden_dim={hidden_dim}")
        self.num_layers = int(num_layers)
        self.output_dim = int(output_dim)
        self.ft_layer = int(ft_layer)
        self.hidden_dim = hidden_dim
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.synchronized_bn = synchronized_bn

    def build(self, input_shape):
        width = self.hidden_dim or int(input_shape[-1])
        synchronized = (self.synchronized_bn
                        if self.synchronized_bn is not None
                        else distribution.num_replicas() > 1)
        shape = tuple(input_shape)
        for index in range(self.num_layers):
            last = index == self.num_layers - 1
            dense = layers.Dense(self.output_dim if last else width,
                                 use_bias=False, name=f"dense_{index}")
            norm = FusedBatchNormalization(
                momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                center=not last, synchronized=synchronized, name=f"bn_{index}")
            dense.build(shape)
            shape = dense.compute_output_shape(shape)
            norm.build(shape)
            # One attribute per layer: TF checkpoints track a Keras 3 layer's
            # sublayers only through plain attributes, not through lists.
            setattr(self, f"dense_{index}", dense)
            setattr(self, f"bn_{index}", norm)
        self.built = True

    @property
    def _dense(self):
        return [getattr(self, f"dense_{i}") for i in range(self.num_layers)]

    @property
    def _norms(self):
        return [getattr(self, f"bn_{i}") for i in range(self.num_layers)]

    def _ensure_built(self, h):
        if not self.built:
            self.build(tuple(h.shape))

    def hidden_outputs(self, h, training=None):
        """All intermediate outputs: `[h, hidden_1, ..., z]`."""
        self._ensure_built(h)
        outputs = [h]
        x = h
        for index, (dense, norm) in enumerate(zip(self._dense, self._norms)):
            x = norm(dense(x), training=training)
            if index < self.num_layers - 1:
                x = keras.ops.relu(x)
            outputs.append(x)
        return outputs

    def finetune_features(self, h, training=None):
        """The output at `ft_layer`, where fine-tuning starts."""
        self._ensure_built(h)
        x = h
        for index in range(self.ft_layer):
            x = keras.ops.relu(self._norms[index](self._dense[index](x),
                                                  training=training))
        return x

    def call(self, h, training=None):
        return keras.ops.cast(self.hidden_outputs(h, training)[-1], "float32")

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_layers": self.num_layers,
            "output_dim": self.output_dim,
            "ft_layer": self.ft_layer,
            "hidden_dim": self.hidden_dim,
            "bn_momentum": self.bn_momentum,
            "bn_epsilon": self.bn_epsilon,
            "synchronized_bn": self.synchronized_bn,
        })
        return config
