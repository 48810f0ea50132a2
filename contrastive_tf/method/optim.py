"""Optimisers and learning-rate schedules shared by every job.

`LARS` (You et al., 2017) as SimCLR uses it, `WarmupCosine`, the batch-size
scaling rules, and `make_optimizer`, the one place jobs build optimisers.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from contrastive_tf.runtime import compat

OPTIMIZERS = ("lars", "sgd", "adamw")
SCALINGS = ("linear", "sqrt", "none")


@keras.saving.register_keras_serializable(package="contrastive_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling with momentum, as in SimCLR.

    For each variable w with gradient g:

        g <- g + weight_decay * w                       (decay)
        trust = eta * ||w|| / ||g||  (1 if either is 0)  (adaptation)
        v <- momentum * v + lr * trust * g
        w <- w - v

    Variables of rank <= 1 -- biases and batch-norm scales and offsets in
    Keras' layers -- are excluded from both decay and adaptation when
    `exclude_bias_and_norm` is true; they get plain momentum SGD. So are the
    variables passed to Keras' `exclude_from_weight_decay(var_list=...)`
    (SimCLR's online probe, as the reference excludes its supervised head).

    Args:
        learning_rate: float or schedule. Defaults to `0.1`.
        momentum: Defaults to `0.9`.
        trust_coefficient: eta. Defaults to `0.001`.
        weight_decay: coupled L2 decay added to the gradient. Defaults to
            `1e-6`.
        exclude_bias_and_norm: Defaults to `True`.
        **kwargs: base optimiser arguments (clipnorm, name, ...).

    Example:
    >>> optimizer = LARS(learning_rate=WarmupCosine(1.0, 10, 100))

    References:
        - [You et al., 2017](https://arxiv.org/abs/1708.03888)
        - [Chen et al., 2020](https://arxiv.org/abs/2002.05709), appendix B.
    """

    def __init__(self, learning_rate=0.1, momentum: float = 0.9,
                 trust_coefficient: float = 0.001, weight_decay: float = 1e-6,
                 exclude_bias_and_norm: bool = True, name: str = "lars",
                 **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0 <= momentum < 1:
            raise ValueError(f"Expected 0 <= momentum < 1. Received: momentum={momentum}")
        if trust_coefficient <= 0:
            raise ValueError("Expected trust_coefficient > 0. Received: "
                             f"trust_coefficient={trust_coefficient}")
        if weight_decay < 0:
            raise ValueError(
                f"Expected weight_decay >= 0. Received: weight_decay={weight_decay}")
        self.momentum = float(momentum)
        self.trust_coefficient = float(trust_coefficient)
        self.lars_weight_decay = float(weight_decay)
        self.exclude_bias_and_norm = bool(exclude_bias_and_norm)
        self._excluded = frozenset()

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes the variables in `var_list` from decay and adaptation
        (call before the optimizer is built). Names are not supported: the
        variables themselves say what is excluded."""
        if var_names:
            raise ValueError("LARS excludes variables (var_list), not names. "
                             f"Received: var_names={var_names}")
        super().exclude_from_weight_decay(var_list=var_list)
        # Keras' own variable identity (update_step receives the backend's
        # variable, not the keras.Variable the caller holds).
        self._excluded = frozenset(compat.variable_key(self, v) for v in var_list or [])

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._velocities = self.add_optimizer_variables(var_list, "velocity")

    def _adapted(self, variable) -> bool:
        if compat.variable_key(self, variable) in self._excluded:
            return False
        return not (self.exclude_bias_and_norm and len(variable.shape) <= 1)

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        velocity = self._velocities[compat.variable_index(self, variable)]
        if self._adapted(variable):
            if self.lars_weight_decay:
                gradient = gradient + self.lars_weight_decay * variable
            w_norm = ops.sqrt(ops.sum(ops.square(variable)))
            g_norm = ops.sqrt(ops.sum(ops.square(gradient)))
            trust = ops.where(
                (w_norm > 0) & (g_norm > 0),
                self.trust_coefficient * w_norm / ops.maximum(g_norm, 1e-30),
                ops.ones_like(w_norm))
            lr = lr * trust
        self.assign(velocity, self.momentum * velocity + lr * gradient)
        self.assign_sub(variable, velocity)

    def get_config(self):
        config = super().get_config()
        config.update({
            "momentum": self.momentum,
            "trust_coefficient": self.trust_coefficient,
            "weight_decay": self.lars_weight_decay,
            "exclude_bias_and_norm": self.exclude_bias_and_norm,
        })
        return config


@keras.saving.register_keras_serializable(package="contrastive_tf")
class WarmupCosine(keras.optimizers.schedules.CosineDecay):
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine to 0:
    Keras' `CosineDecay` with `warmup_target`, under SimCLR's parameters.

    lr(s) = peak * s / warmup_steps                                for s < warmup
    lr(s) = peak * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))  after,
    and 0 from `total_steps` on.

    Args:
        peak: the learning rate reached at the end of warmup.
        warmup_steps: steps of linear warmup (0 for none).
        total_steps: steps of the whole run.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int):
        if peak < 0:
            raise ValueError(f"Expected peak >= 0. Received: peak={peak}")
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError("Expected 0 <= warmup_steps <= total_steps and "
                             f"total_steps >= 1. Received: warmup_steps="
                             f"{warmup_steps}, total_steps={total_steps}")
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        if self.warmup_steps:
            super().__init__(0.0, decay_steps, warmup_target=self.peak,
                             warmup_steps=self.warmup_steps)
        else:
            super().__init__(self.peak, decay_steps)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps}


def scaled_learning_rate(base: float, batch_size: int,
                         scaling: str = "linear") -> float:
    """SimCLR's batch-size scaling of the learning rate.

    "linear": base * batch / 256 (base 0.3 in the paper); "sqrt":
    base * sqrt(batch) (base 0.075, better for small batches); "none": base.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"Expected scaling in {SCALINGS}. Received: scaling={scaling!r}")
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    if scaling == "linear":
        return base * batch_size / 256.0
    if scaling == "sqrt":
        return base * math.sqrt(batch_size)
    return base


def exclude_from_decay(optimizer: keras.optimizers.Optimizer, variables,
                       extra=()) -> None:
    """Keeps batch-norm parameters and biases (the variables of rank <= 1
    among `variables`) and the variables in `extra` out of weight decay --
    and, for LARS, out of trust-ratio adaptation. Call before the optimizer
    is built; a `LossScaleOptimizer`'s inner optimizer is the one changed."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    inner.exclude_from_weight_decay(
        var_list=[v for v in variables if len(v.shape) <= 1] + list(extra))


def make_optimizer(name: str, learning_rate, weight_decay: float,
                   momentum: float = 0.9) -> keras.optimizers.Optimizer:
    """The optimiser a job asks for: "lars", "sgd" (momentum, with Keras'
    decoupled weight decay: w -= lr * weight_decay * w each step) or "adamw".
    `exclude_from_decay` keeps biases and batch-norm parameters out of the
    decay, as the spec asks."""
    if name == "lars":
        return LARS(learning_rate, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate, momentum=momentum,
                                         weight_decay=weight_decay or None)
    elif name == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate,
                                           weight_decay=weight_decay)
    else:
        raise ValueError(f"Expected optimizer in {OPTIMIZERS}. Received: {name!r}")
    return optimizer
