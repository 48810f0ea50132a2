"""Frozen configs of the jobs, written as JSON beside their outputs."""

from __future__ import annotations

import dataclasses
import json
import os

from contrastive_tf.backbones import SUPPORTED_DEPTHS
from contrastive_tf.optim import OPTIMIZERS, SCALINGS
from contrastive_tf.precision import PRECISIONS
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")

# Fields that fix the shapes of the weights: a checkpoint written under other
# values cannot be resumed.
ARCHITECTURE_FIELDS = ("image_size", "channels", "depth", "width_multiplier",
                       "sk_ratio", "base_width", "projection_layers",
                       "projection_dim", "ft_layer", "optimizer")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on."""
    model_dir: str
    dataset: str = "embedded"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int = 32
    channels: int = 1
    depth: int = 18
    width_multiplier: int = 1
    sk_ratio: float = 0.0
    base_width: int = 64
    projection_layers: int = 3
    projection_dim: int = 128
    ft_layer: int = 1
    temperature: float = 0.5
    color_strength: float = 0.5
    blur: bool = False
    crop_min_area: float = 0.08
    batch_size: int = 256
    epochs: int = 100
    train_steps: int = 0
    optimizer: str = "lars"
    learning_rate: float = 1.0
    lr_scaling: str = "none"
    warmup_epochs: float = 10.0
    weight_decay: float = 1e-6
    momentum: float = 0.9
    precision: str = "auto"  # see contrastive_tf.precision.choose
    strategy: str = "default"
    checkpoint_steps: int = 500
    keep_checkpoints: int = 3
    knn_every_epochs: int = 0
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_bank_size: int = 10000
    seed: int = 0
    deterministic: bool = False
    log_images: bool = True

    def __post_init__(self):
        checks = [
            (self.depth in SUPPORTED_DEPTHS, f"depth must be one of {SUPPORTED_DEPTHS}"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.batch_size > 0, "batch_size must be > 0"),
            (self.epochs > 0 or self.train_steps > 0,
             "give epochs > 0 or train_steps > 0"),
            (self.train_steps >= 0, "train_steps must be >= 0"),
            (self.image_size >= 8, "image_size must be >= 8"),
            (self.channels in (1, 3), "channels must be 1 or 3"),
            (self.width_multiplier >= 1, "width_multiplier must be >= 1"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.lr_scaling in SCALINGS, f"lr_scaling must be one of {SCALINGS}"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}"),
            (self.checkpoint_steps > 0, "checkpoint_steps must be > 0"),
            (0 < self.crop_min_area <= 1, "crop_min_area must be in (0, 1]"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.projection_layers >= 1, "projection_layers must be >= 1"),
            (0 <= self.ft_layer < self.projection_layers,
             "ft_layer must be in [0, projection_layers)"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("Invalid pretraining config: " + "; ".join(problems)
                             + f". Received: {self.to_dict()}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def architecture(self) -> dict:
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}


def write_json(path: str, payload: dict) -> None:
    """Writes JSON atomically (temp file + rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The semi-supervised pipeline: pretrain, probe, fine-tune, baseline, distil."""
    output_dir: str
    pretrain: PretrainConfig
    fractions: tuple[float, ...] = (0.01, 0.1)
    val_fraction: float = 0.1
    finetune_epochs: int = 30
    finetune_batch_size: int = 64
    finetune_learning_rate: float = 0.05
    finetune_min_steps: int = 10
    supervised_learning_rate: float = 0.1
    supervised_epochs: int = 60
    patience: int = 0
    finetune_crop_min_area: float = 0.3
    probe_steps: int = 1000
    knn_k: int = 20
    distill_fractions: tuple[float, ...] = ()  # (): every fraction
    export_fraction: float = 0.0  # 0: the largest distilled fraction
    distill_epochs: int = 3
    distill_temperature: float = 1.0
    distill_learning_rate: float = 0.05
    student_base_width: int = 0  # 0: same size as the teacher
    student_init: str = "pretrained"  # or "scratch"
    seed: int = 0

    def __post_init__(self):
        checks = [
            (all(0 < f <= 1 for f in self.fractions), "fractions must lie in (0, 1]"),
            (0 < self.val_fraction < 0.5, "val_fraction must lie in (0, 0.5)"),
            (all(f in self.fractions for f in self.distill_fractions),
             "distill_fractions must be among the fractions"),
            (self.export_fraction in (0.0, *self.teacher_fractions),
             "export_fraction must be one of the distilled fractions"),
            (self.finetune_epochs > 0 and self.supervised_epochs > 0
             and self.distill_epochs > 0, "epochs must be > 0"),
            (self.patience >= 0, "patience must be >= 0 (0: no early stopping)"),
            (self.distill_temperature > 0, "distill_temperature must be > 0"),
            (self.student_init in ("pretrained", "scratch"),
             "student_init must be 'pretrained' or 'scratch'"),
            (self.student_init == "scratch" or self.student_base_width in (0, self.pretrain.base_width),
             "a student of another width must start from scratch (student_init='scratch')"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("Invalid pipeline config: " + "; ".join(problems))

    @property
    def teacher_fractions(self) -> tuple[float, ...]:
        """The fractions whose fine-tuned classifiers are distilled."""
        return tuple(self.distill_fractions or self.fractions)

    @property
    def exported_fraction(self) -> float:
        """The fraction whose classifier and student are exported."""
        return self.export_fraction or max(self.teacher_fractions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
