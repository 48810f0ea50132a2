"""The import job: a published SimCLR / SimCLRv2 model as this package's runs.

`run_import(config)` is what `experiments/import_simclr.py` calls. It writes

    <output_dir>/encoder/      a pretraining run (simclr.keras, encoder.keras,
                               summary.json): what experiments.finetune
                               --encoder, experiments.predict --embeddings,
                               experiments.export --kind=encoder and
                               experiments.distill --student_encoder take
    <output_dir>/classifier/   a classifier run (classifier.keras,
                               class_names.json), where the source has a
                               supervised head: for experiments.predict,
                               experiments.distill --teacher, experiments.export
    <output_dir>/summary.json  the architecture found, what was skipped, and
                               the largest differences from the source on a
                               probe batch (SavedModel sources)
"""

from __future__ import annotations

import dataclasses
import os
import time

from contrastive_tf.jobs.config import ImportConfig
from contrastive_tf.method.augment import SimCLRAugmenter
from contrastive_tf.method.heads import ProjectionHead
from contrastive_tf.method.model import SimCLR
from contrastive_tf.runs import artifacts
from contrastive_tf.runs.simclr_import import SimCLRImportError, import_simclr
from contrastive_tf.runtime import progress
from contrastive_tf.runtime.files import write_json

log = progress.logger("import")
ENCODER_DIR = "encoder"
CLASSIFIER_DIR = "classifier"


def _class_names(path: str, count: int) -> tuple[str, ...]:
    if not path:
        return tuple(str(i) for i in range(count))
    with open(path) as handle:
        names = tuple(line.strip() for line in handle if line.strip())
    if len(names) != count:
        raise SimCLRImportError(f"{path} names {len(names)} classes; the supervised head has "
                                f"{count} outputs")
    return names


def _check(summary: dict, limit: float) -> None:
    """Refuses an import that does not reproduce its source."""
    for name in ("h", "logits"):
        found = summary["check"].get(name)
        if not found:
            continue
        relative = found["max_abs_difference"] / max(found["max_abs_reference"], 1e-12)
        found["relative"] = relative
        if relative > limit:
            raise SimCLRImportError(
                f"the imported model's {name} differs from the source's by "
                f"{found['max_abs_difference']:.3g} (largest source value "
                f"{found['max_abs_reference']:.3g}; relative {relative:.2g} > {limit:g}): "
                "the source is not laid out as the reference code lays it out")


def _save_encoder(imported, folder: str, image_size: int) -> str:
    """The encoder and head as a pretraining run; a SimCLRv1 model (no
    head in the source) gets a fresh head that fine-tuning skips (ft_layer 0)."""
    head = imported.projection_head
    note = "the source's"
    if head is None:
        width = int(imported.encoder.output.shape[-1])
        head = ProjectionHead(num_layers=2, output_dim=128, ft_layer=0, name="projection_head")
        head.build((None, width))
        note = "none in the source (SimCLRv1): a fresh 2-layer head; fine-tuning starts from h"
    model = SimCLR(imported.encoder, SimCLRAugmenter(image_size), head)
    os.makedirs(folder, exist_ok=True)
    artifacts.save_pretrained(model, folder)
    return note


def run_import(config: ImportConfig, verbose: int = 1) -> dict:
    """Imports `config.source`; returns the summary it writes."""
    started = time.time()
    artifacts.claim_output_dir(config.output_dir, "import", config.to_dict())
    imported = import_simclr(config.source, image_size=config.image_size,
                             head_input=config.head_input)
    arch = imported.architecture
    summary = {"job": "import", "source": imported.source, "source_kind": imported.source_kind,
               "architecture": {**dataclasses.asdict(arch), "name": arch.name},
               "image_size": config.image_size, "skipped": imported.skipped,
               "check": imported.check}
    _check(summary, config.max_relative_difference)
    log.info(f"{imported.source_kind} {imported.source}: ResNet-{arch.depth} "
             f"{arch.width_multiplier}x, SK {'on' if arch.sk_ratio else 'off'}, "
             f"{arch.projection_layers}-layer projection head, "
             + (f"supervised head of {arch.num_classes} classes on {arch.head_input}"
                if arch.num_classes else "no supervised head"))
    if imported.skipped:
        log.info("not imported, deliberately: " + ", ".join(
            f"{count} {reason}" for reason, count in sorted(imported.skipped.items())))
    if imported.check.get("compared"):
        shown = "; ".join(f"{name} {imported.check[name]['max_abs_difference']:.2g} (largest "
                          f"{imported.check[name]['max_abs_reference']:.3g})"
                          for name in ("h", "logits", "z") if name in imported.check)
        log.info(f"against the source on a probe batch, largest differences: {shown}")
    else:
        log.info(f"not compared with the source: {imported.check.get('why')}")

    encoder_dir = os.path.join(config.output_dir, ENCODER_DIR)
    summary["projection_head"] = _save_encoder(imported, encoder_dir, config.image_size)
    artifacts.write_summary(encoder_dir, {"job": "import", "source": imported.source,
                                          "architecture": summary["architecture"]})
    summary["encoder"] = encoder_dir
    if imported.classifier is not None:
        names = _class_names(config.class_names, arch.num_classes)
        classifier_dir = os.path.join(config.output_dir, CLASSIFIER_DIR)
        artifacts.save_classifier(imported.classifier, names, classifier_dir)
        # Which encoder it was fine-tuned from, as a fine-tuning run says it:
        # experiments.distill starts its student there by default.
        write_json(os.path.join(classifier_dir, artifacts.JOB_MARKER),
                   {"job": "import", "settings": {"encoder": os.path.join("..", ENCODER_DIR),
                                                  "source": imported.source}})
        summary["classifier"] = classifier_dir
    summary["wall_s"] = round(time.time() - started, 1)
    artifacts.write_summary(config.output_dir, summary)
    written = [ENCODER_DIR] + ([CLASSIFIER_DIR] if "classifier" in summary else [])
    log.info(f"done: {'/, '.join(written)}/ and summary.json in {config.output_dir} ({summary['wall_s']} s)")
    return summary
