"""Frozen configs of the jobs, written as JSON beside their outputs.

Every field carries its flag's help (and allowed values) beside its
default: experiments/jobs.py generates each job's flags from these
dataclasses, so they are the one source of every default.
"""

from __future__ import annotations

import dataclasses

from contrastive_tf.data import whole_split
from contrastive_tf.method.backbones import SUPPORTED_DEPTHS
from contrastive_tf.method.optim import OPTIMIZERS, SCALINGS
from contrastive_tf.runtime.distribution import STRATEGIES
from contrastive_tf.runtime.precision import PRECISIONS

# Fields that fix the shapes of the weights: a checkpoint written under other
# values cannot be resumed.
ARCHITECTURE_FIELDS = ("image_size", "channels", "depth", "width_multiplier",
                       "sk_ratio", "base_width", "projection_layers",
                       "projection_dim", "ft_layer", "optimizer")


def _refuse(kind: str, checks, detail: str = "") -> None:
    """Raises one ValueError naming every failed (ok, message) check."""
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ValueError(f"Invalid {kind} config: " + "; ".join(problems) + detail)


def _field(default, help: str, required: bool = False, choices: tuple = ()):
    """A config field with its flag help beside it: the jobs' flags are
    generated from these (experiments/jobs.py), so the dataclass is the one
    source of every default. A required field has no default (the job
    refuses to start without it); `choices` are the allowed values (checked
    by `_choice_checks` when the config is made, listed in the flag's help)."""
    metadata = {"help": help, "required": required, "choices": tuple(choices)}
    if required:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _choice_checks(config) -> list:
    """(ok, message) for every field whose value must be one of its choices."""
    return [(getattr(config, f.name) in f.metadata["choices"],
             f"{f.name} must be one of {f.metadata['choices']}")
            for f in dataclasses.fields(config) if f.metadata.get("choices")]


class _Config:
    """What every job config has: `to_dict`, and `__post_init__` refusing
    the values that fail its choices or its own `checks()`."""
    KIND = "job"

    def checks(self) -> list:
        return []

    def __post_init__(self):
        _refuse(self.KIND, _choice_checks(self) + self.checks(), self.refusal_detail())

    def refusal_detail(self) -> str:
        return ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

@dataclasses.dataclass(frozen=True)
class PretrainConfig(_Config):
    """Everything a pretraining run depends on."""
    model_dir: str = _field(None, "Where checkpoints, logs and models go.", required=True)
    dataset: str = _field("embedded", "embedded | fashion_mnist | tfds:<name>[:<config>] | folder:<path>")
    data_dir: str | None = _field(None, "TFDS data_dir, or the Fashion-MNIST folder.")
    train_split: str = _field("", "Split to pretrain on. Default: every image of a folder (or its train/ subfolder), a named dataset's 'train' split. Folders also take train/test: a fixed 80/20 split by file name (the pipeline's).")
    eval_split: str = _field("", "Held-out split for the kNN monitor. Default: the dataset's test split (test/ for folders laid out that way; none for a folder used whole).")
    image_size: int = _field(32, "Training image side in pixels.")
    channels: int = _field(0, "Channels for folder datasets (1 or 3; 0: 1 if every image is grayscale, else 3); other datasets use their own.", choices=(0, 1, 3))
    cache_dir: str = _field("", "Folder datasets: keep the decoded images here (a local folder; built once, reused by later runs on the same files, rebuilt when they change). Worth it where decoding, not the model, sets the pace: small models, small images, many epochs.")
    depth: int = _field(18, "ResNet depth.", choices=SUPPORTED_DEPTHS)
    width_multiplier: int = _field(1, "ResNet width multiplier.")
    sk_ratio: float = _field(0.0, "Selective-kernel ratio (0 = off; v2 uses 0.0625).")
    base_width: int = _field(64, "Channels of the first ResNet stage at 1x.")
    projection_layers: int = _field(3, "Projection head layers (v1: 2, v2: 3).")
    projection_dim: int = _field(128, "Projection output width.")
    ft_layer: int = _field(1, "Head layer that fine-tuning starts from (0: the encoder's features h).")
    temperature: float = _field(0.5, "NT-Xent temperature.")
    color_strength: float = _field(0.5, "Colour distortion strength s.")
    blur: bool = _field(False, "Gaussian blur (ImageNet recipe).")
    crop_min_area: float = _field(0.08, "Smallest random-crop area fraction.")
    batch_size: int = _field(256, "Global batch size.")
    epochs: int = _field(100, "Epochs over the training data.")
    train_steps: int = _field(0, "Total steps; overrides --epochs when > 0.")
    optimizer: str = _field("lars", "Optimizer.", choices=OPTIMIZERS)
    learning_rate: float = _field(1.0, "Base learning rate (before scaling).")
    lr_scaling: str = _field("none", "linear: lr*B/256, sqrt: lr*sqrt(B), none: lr.", choices=SCALINGS)
    warmup_epochs: float = _field(10.0, "Linear warmup epochs before cosine decay (at most 10% of the run).")
    weight_decay: float = _field(1e-6, "Weight decay (biases and batch norm excluded).")
    momentum: float = _field(0.9, "Momentum (LARS, SGD).")
    precision: str = _field("auto", "Compute precision. auto: mixed_bfloat16 where bf16 runs natively (CPU with amx_bf16 / avx512_bf16, GPU of compute capability >= 8.0), mixed_float16 on older GPUs, float32 otherwise.", choices=PRECISIONS)
    strategy: str = _field("default", "tf.distribute strategy.", choices=STRATEGIES)
    checkpoint_steps: int = _field(500, "Steps between checkpoints.")
    keep_checkpoints: int = _field(3, "Checkpoints kept.")
    knn_every_epochs: int = _field(0, "kNN monitor interval in epochs (0 = end only, when labels exist).")
    knn_k: int = _field(200, "Neighbours of the kNN monitor.")
    knn_temperature: float = _field(0.1, "Temperature of the kNN monitor's weighted vote.")
    knn_bank_size: int = _field(10000, "Labelled training images in the kNN bank.")
    seed: int = _field(0, "Random seed.")
    deterministic: bool = _field(False, "Enable TF op determinism.")
    log_images: bool = _field(True, "Write a few images and their two views to TensorBoard.")

    KIND = "pretraining"

    def checks(self) -> list:
        return [
            (self.temperature > 0, "temperature must be > 0"),
            (self.batch_size > 0, "batch_size must be > 0"),
            (self.epochs > 0 or self.train_steps > 0,
             "give epochs > 0 or train_steps > 0"),
            (self.train_steps >= 0, "train_steps must be >= 0"),
            (self.image_size >= 8, "image_size must be >= 8"),
            (self.width_multiplier >= 1, "width_multiplier must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.checkpoint_steps > 0, "checkpoint_steps must be > 0"),
            (0 < self.crop_min_area <= 1, "crop_min_area must be in (0, 1]"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.projection_layers >= 1, "projection_layers must be >= 1"),
            (0 <= self.ft_layer < self.projection_layers,
             "ft_layer must be in [0, projection_layers)"),
        ]

    def refusal_detail(self) -> str:
        return f". Received: {self.to_dict()}"

    def splits(self) -> tuple[str, str | None]:
        """The (training, kNN query) splits: `train_split` / `eval_split`,
        or what "" means for this dataset (`whole_split`); no query
        split when it would be the training images again."""
        train = self.train_split or whole_split(self.dataset, "train")
        query = self.eval_split or whole_split(self.dataset, "test")
        if query == "all" or (query == train and not self.eval_split):
            query = None
        return train, query

    def architecture(self) -> dict:
        return {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}


@dataclasses.dataclass(frozen=True)
class PipelineConfig(_Config):
    """The semi-supervised pipeline: pretrain, probe, fine-tune, baseline,
    distil, export, report. `pretrain` is the pretraining stage's config
    (its flags are the pretraining job's); `seed` is shared with it."""
    output_dir: str = _field(None, "Where every stage writes its outputs.", required=True)
    pretrain: PretrainConfig = dataclasses.field(metadata={"config": True})
    fractions: tuple[float, ...] = _field((0.01, 0.1), "Labelled fractions to fine-tune on.")
    val_fraction: float = _field(0.1, "Training images held out for model selection.")
    finetune_epochs: int = _field(30, "Fine-tuning epochs (the cosine schedule's length).")
    finetune_batch_size: int = _field(64, "Fine-tuning batch size.")
    finetune_learning_rate: float = _field(0.05, "Fine-tuning peak learning rate (0.01 / 0.05 / 0.1 tried on the validation split: BENCHMARKS.md).")
    finetune_min_steps: int = _field(10, "Minimum steps per fine-tuning epoch.")
    supervised_learning_rate: float = _field(0.1, "Supervised baseline peak learning rate (0.05 / 0.1 / 0.2 tried on the validation split: BENCHMARKS.md).")
    supervised_epochs: int = _field(60, "Supervised-baseline epochs (the cosine schedule's length).")
    patience: int = _field(0, "Early-stopping patience in epochs; 0: run the whole learning-rate schedule (the best validation epoch is kept either way).")
    finetune_crop_min_area: float = _field(0.3, "Smallest crop area when fine-tuning.")
    probe_steps: int = _field(1000, "Full-batch steps of the linear probe.")
    probe_knn_k: int = _field(20, "Neighbours for the kNN evaluation.")
    distill_fractions: tuple[float, ...] = _field((), "Fractions whose fine-tuned models each teach a student (default: every fraction).")
    export_fraction: float = _field(0.0, "Fraction whose fine-tuned classifier and student are exported (default: the largest distilled one).")
    distill_epochs: int = _field(3, "Distillation epochs over the training images.")
    distill_temperature: float = _field(1.0, "Distillation temperature.")
    distill_learning_rate: float = _field(0.05, "Distillation peak learning rate.")
    student_base_width: int = _field(0, "Student ResNet base width (0: the teacher's).")
    student_init: str = _field("pretrained", "Student starts from the pretrained encoder or from scratch.", choices=("pretrained", "scratch"))
    seed: int = _field(0, "Random seed.")
    unlabelled_dataset: str = _field("", "Your unlabelled images (e.g. folder:/data/pool, used whole): pretraining and distillation run on them. Default: the training images of --dataset.")
    labelled_dataset: str = _field("", "Your labelled images (class subfolders, used whole less a validation part), instead of fractions of --dataset; needs --test_dataset.")
    test_dataset: str = _field("", "Your labelled test images, with --labelled_dataset.")
    label_seeds: int = _field(1, "Class-balanced label draws per fraction; results.json reports each method's mean and standard deviation over them.")

    KIND = "pipeline"

    def __post_init__(self):
        if not isinstance(self.pretrain, PretrainConfig):
            raise ValueError("Invalid pipeline config: pretrain must be a PretrainConfig. "
                             f"Received: pretrain={self.pretrain!r}")
        super().__post_init__()

    def checks(self) -> list:
        return [
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
            (self.student_init == "scratch" or self.student_base_width in (0, self.pretrain.base_width),
             "a student of another width must start from scratch (student_init='scratch')"),
            (bool(self.labelled_dataset) == bool(self.test_dataset),
             "labelled_dataset and test_dataset go together"),
            (self.label_seeds >= 1, "label_seeds must be >= 1"),
            (self.label_seeds == 1 or not self.labelled_dataset,
             "label_seeds draws fractions of one labelled set: not with labelled_dataset"),
        ]

    @property
    def teacher_fractions(self) -> tuple[float, ...]:
        """The fractions whose fine-tuned classifiers are distilled."""
        return tuple(self.distill_fractions or self.fractions)

    def fraction_to_export(self) -> float:
        """The fraction whose classifier and student are exported:
        `export_fraction`, or (0) the largest distilled one."""
        return self.export_fraction or max(self.teacher_fractions)

@dataclasses.dataclass(frozen=True)
class FinetuneConfig(_Config):
    """Fine-tuning a pretrained encoder on a labelled set you have.

    Defaults are the pipeline's fine-tuning recipe (PipelineConfig)."""
    encoder: str = _field(None, "A pretraining run directory (experiments.pretrain's --model_dir) or an encoder export version directory (exports/<name>/<version>).", required=True)
    dataset: str = _field(None, 'Labelled images: folder:<path> with one subfolder per class (used whole, or its train/ subfolder), embedded, fashion_mnist or tfds:<name>.', required=True)
    output_dir: str = _field(None, 'Where classifier.keras, class_names.json and summary.json go.', required=True)
    test_dataset: str = _field("", 'Optional labelled test set with the same class names (a folder is used whole, or its test/ subfolder).')
    data_dir: str | None = _field(None, 'TFDS data_dir, or the Fashion-MNIST folder.')
    val_fraction: float = _field(0.1, "Share of each class's labelled images held out for model selection (at least one image per class).")
    labels_per_class: int = _field(0, 'If > 0, keep a class-balanced subset of this many labelled images per class (benchmarks); written to labelled_subset.json.')
    label_fraction: float = _field(0.0, 'If > 0, keep this class-balanced fraction of the labelled images instead.')
    from_layer: str = _field("head", "Where the classifier starts: 'head' (the projection-head layer the encoder was pretrained with, SimCLRv2) or 'h' (the encoder's features).", choices=("head", "h"))
    fine_tune_after_block: int = _field(-1, "Freeze the encoder up to here, for very few labels or little compute: -1 trains everything; k in 0..4 freezes the stem and the first k of the 4 stages (their batch norm in inference mode); 4 trains only what is above h.")
    epochs: int = _field(30, 'Epochs: the length of the cosine schedule; the best validation epoch is kept.')
    batch_size: int = _field(64, 'Batch size.')
    learning_rate: float = _field(0.05, 'Peak learning rate (SGD with momentum).')
    weight_decay: float = _field(1e-4, 'Decoupled weight decay (biases and batch norm excluded).')
    min_steps: int = _field(10, 'At least this many steps per epoch, so tiny labelled sets still get updates.')
    crop_min_area: float = _field(0.3, 'Smallest random-crop area (fine-tuning uses crop + flip only).')
    precision: str = _field("auto", "Compute precision (auto: bf16 where this machine runs it natively, else float32); the precision the encoder was saved in is not kept.", choices=PRECISIONS)
    strategy: str = _field("default", "tf.distribute strategy.", choices=STRATEGIES)
    seed: int = _field(0, 'Random seed.')

    KIND = "fine-tuning"

    def checks(self) -> list:
        return [
            (0 < self.val_fraction < 1, "val_fraction must lie in (0, 1)"),
            (self.labels_per_class >= 0 and 0 <= self.label_fraction <= 1,
             "labels_per_class must be >= 0 and label_fraction in [0, 1]"),
            (not (self.labels_per_class and self.label_fraction),
             "give labels_per_class or label_fraction, not both"),
            (self.epochs > 0 and self.batch_size > 0, "epochs and batch_size must be > 0"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (0 < self.crop_min_area <= 1, "crop_min_area must be in (0, 1]"),
            (-1 <= self.fine_tune_after_block <= 4, "fine_tune_after_block must be in [-1, 4]"),
        ]

@dataclasses.dataclass(frozen=True)
class DistillConfig(_Config):
    """Distilling a fine-tuned teacher into a student on unlabelled images."""
    teacher: str = _field(None, "A fine-tuning run directory (experiments.finetune's --output_dir) or a classifier export version directory.", required=True)
    dataset: str = _field(None, 'The images to distil on, labels unused: a flat folder of unlabelled images (used whole), or any dataset spec.', required=True)
    output_dir: str = _field(None, "Where the student's classifier.keras, class_names.json and summary.json go.", required=True)
    test_dataset: str = _field("", "Optional labelled test set (the teacher's class names).")
    data_dir: str | None = _field(None, 'TFDS data_dir, or the Fashion-MNIST folder.')
    labelled_dataset: str = _field("", 'Optional labelled set for a labelled cross-entropy term (with --label_weight).')
    label_weight: float = _field(0.0, 'Weight of the labelled term (0: pure distillation, as SimCLRv2).')
    student_encoder: str = _field("auto", "Start the student from this pretraining run or encoder export; auto: the encoder the teacher was fine-tuned from, where its run says (SimCLRv2's self-distillation), else as 'scratch'; scratch: the teacher's architecture, freshly initialised.")
    student_depth: int = _field(0, "A smaller (or other) student: a ResNet of this depth from scratch, e.g. 18 for an imported ResNet-50 teacher; 0: as --student_encoder says.")
    student_base_width: int = _field(0, 'Student ResNet base width, with --student_depth (0: 64).')
    temperature: float = _field(1.0, 'Distillation temperature t of softmax(logits / t).')
    epochs: int = _field(20, 'Epochs over the images (on images no recipe was tuned on, 20 kept the student 0.6 points from its teacher, 6 left it 2.4 behind: BENCHMARKS.md; fewer for a very large pool).')
    batch_size: int = _field(256, 'Batch size.')
    learning_rate: float = _field(0.05, 'Peak learning rate (SGD with momentum).')
    weight_decay: float = _field(1e-4, "Decoupled weight decay of the student (biases and batch norm excluded).")
    crop_min_area: float = _field(0.3, 'Smallest random-crop area of the views.')
    precision: str = _field("auto", "Compute precision of teacher and student (auto: bf16 where this machine runs it natively, else float32); the precision they were saved in is not kept.", choices=PRECISIONS)
    strategy: str = _field("default", "tf.distribute strategy.", choices=STRATEGIES)
    cache_dir: str = _field("", "Folder datasets: keep the decoded images here (see experiments.pretrain --cache_dir).")
    seed: int = _field(0, 'Random seed.')

    KIND = "distillation"

    def checks(self) -> list:
        return [
            (self.temperature > 0, "temperature must be > 0"),
            (self.label_weight >= 0, "label_weight must be >= 0"),
            (not self.label_weight or self.labelled_dataset,
             "label_weight > 0 needs a labelled_dataset"),
            (self.epochs > 0 and self.batch_size > 0, "epochs and batch_size must be > 0"),
            (self.student_depth in (0, *SUPPORTED_DEPTHS),
             f"student_depth must be 0 (the teacher's) or one of {SUPPORTED_DEPTHS}"),
            (not (self.student_encoder not in ("auto", "scratch", "") and self.student_depth),
             "give student_encoder or student_depth, not both"),
            (not self.student_base_width or self.student_depth,
             "student_base_width sizes a student of student_depth: give both"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
        ]

@dataclasses.dataclass(frozen=True)
class PredictConfig(_Config):
    """Predictions (or embeddings) of a model for a folder or dataset."""
    model: str = _field(None, 'A classifier (fine-tuning or distillation run, classifier export) or an encoder (pretraining run, encoder export).', required=True)
    dataset: str = _field(None, 'The images: folder:<path> (used whole; class subfolders add a label column and accuracy) or any dataset spec.', required=True)
    output: str = _field(None, 'The CSV file to write.', required=True)
    data_dir: str | None = _field(None, 'TFDS data_dir, or the Fashion-MNIST folder.')
    top_k: int = _field(3, 'Classes listed per image in the top_k column.')
    embeddings: str = _field("", "Also write the encoder's features h to this .npy file (encoders only; row order as the CSV).")
    batch_size: int = _field(256, 'Batch size.')
    precision: str = _field("auto", "Compute precision (auto: bf16 where this machine runs it natively, else float32); the model's saved precision is not kept.", choices=PRECISIONS)
    strategy: str = _field("default", "tf.distribute strategy: default, or mirrored for the GPUs of one machine (multi_worker: refused, the CSV is written by one process).", choices=STRATEGIES)

    KIND = "predict"

    def checks(self) -> list:
        return [(self.top_k >= 1, "top_k must be >= 1"),
                (self.batch_size > 0, "batch_size must be > 0")]


@dataclasses.dataclass(frozen=True)
class ImportConfig(_Config):
    """A published SimCLR / SimCLRv2 model (google-research/simclr TF2) as this package's models."""
    source: str = _field(None, "The reference model: a SavedModel folder of the TF2 code (<model>/saved_model, a numbered step in it, or the folder holding saved_model/) or a TF2 training checkpoint (prefix or directory).", required=True)
    output_dir: str = _field(None, "Where encoder/ (a pretraining run) and classifier/ (a classifier run, where the source has a supervised head) and summary.json go.", required=True)
    image_size: int = _field(224, "Side of the square images the imported models take (the published models: 224).")
    class_names: str = _field("", "A text file of class names, one per line, for the supervised head (default: numbered).")
    head_input: str = _field("auto", "What the supervised head reads: h (linear evaluation heads), hidden1 (SimCLRv2 fine-tuned from the first head layer), or auto (from the shapes, else the SavedModel's own logits).", choices=("auto", "h", "hidden1"))
    max_relative_difference: float = _field(1e-4, "Refuse the import when the imported model and the source SavedModel differ by more than this, relative to the source's largest value, on the probe batch.")

    KIND = "import"

    def checks(self) -> list:
        return [(self.image_size >= 32, "image_size must be >= 32"),
                (self.max_relative_difference > 0, "max_relative_difference must be > 0")]
