"""Do bigger models gain more from SimCLR at few labels? The demo recipe at
several encoder sizes, each fine-tuned at 1 and 10 percent of the labels against
the supervised baseline of the same size, over several label draws.

    python -m experiments.scaling --output_dir=runs/scaling --base_widths=8,16,32

Each size is one run of `experiments.pipeline` (in its own process, so each
gets a fresh runtime and its own wall time) with the flags of
`--flagfile` and `--base_width=W --label_seeds=N`, written to
OUTPUT_DIR/width_W/; a size whose results.json exists is read, not rerun, so
a killed sweep continues where it stopped. The report compares, per size and
fraction, fine-tuning with the baseline on the same label draw (the gain is
the mean and standard deviation of the per-draw differences) and writes
OUTPUT_DIR/scaling.json, scaling.md and scaling.png.
"""

import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from contrastive_tf.jobs import visualize
from contrastive_tf.method.backbones import resnet
from contrastive_tf.runtime import files

FLAGS = flags.FLAGS


def define_flags():
    """The sweep's flags; defined when it runs, not on import (its names,
    --depth and --output_dir among them, are other jobs' flags too)."""
    flags.DEFINE_string("output_dir", None, "Where each size's pipeline run and the report go.")
    flags.DEFINE_list("base_widths", ["8", "16", "32"], "ResNet base widths to compare.")
    flags.DEFINE_integer("depth", 18, "ResNet depth of every size.")
    flags.DEFINE_integer("label_seeds", 3, "Class-balanced label draws per fraction.")
    flags.DEFINE_string("flagfile_recipe", "experiments/configs/demo_pipeline.flags",
                        "The pipeline recipe every size runs.")
    flags.DEFINE_list("extra", ["--distill_fractions=0.01"],
                      "Further pipeline flags for every size (default: distil the 1 percent teachers "
                      "only; the students are not what this sweep compares).")


METHODS = ("simclr_finetune", "supervised_baseline", "linear_probe", "distilled_student")


def encoder_parameters(depth: int, base_width: int, image_size: int = 28,
                       channels: int = 1) -> int:
    """Parameters of the encoder a size stands for (the projection head not counted)."""
    model = resnet(depth, base_width=base_width, input_shape=(image_size, image_size, channels),
                   synchronized_bn=False)
    return int(model.count_params())


def paired_gain(finetuned: list, supervised: list) -> dict:
    """Per-draw gain of fine-tuning over the baseline on the same labels, in points."""
    if len(finetuned) != len(supervised) or not finetuned:
        raise ValueError(f"Expected one baseline per fine-tuning draw. Received: "
                         f"{len(finetuned)} fine-tuned and {len(supervised)} supervised values")
    gains = 100 * (np.asarray(finetuned, float) - np.asarray(supervised, float))
    # np.std over the draws, as the pipeline's own spread
    return {"mean": float(gains.mean()), "std": float(gains.std()),
            "values": [float(g) for g in gains]}


def summarise(sizes: dict) -> dict:
    """{width: {"parameters", "wall_s", "results": pipeline results.json}} ->
    per size and fraction: accuracies (mean, std, values) and the paired gain."""
    report = {}
    for width, size in sorted(sizes.items(), key=lambda item: int(item[0])):
        spread = size["results"]["spread"]
        row = {"parameters": size["parameters"], "wall_s": size["wall_s"],
               "timings": size["results"].get("timings", {}), "fractions": {}}
        for fraction in sorted(spread["simclr_finetune"], key=float):
            entry = {method: spread[method][fraction] for method in METHODS
                     if fraction in spread.get(method, {})}
            entry["gain"] = paired_gain(spread["simclr_finetune"][fraction]["values"],
                                        spread["supervised_baseline"][fraction]["values"])
            row["fractions"][fraction] = entry
        report[width] = row
    return report


def table(report: dict, depth: int) -> str:
    fractions = sorted({f for row in report.values() for f in row["fractions"]}, key=float)
    head = "| encoder | parameters | wall time |"
    rule = "|---|---|---|"
    for fraction in fractions:
        pct = f"{100 * float(fraction):g}%"
        head += f" {pct} fine-tuned | {pct} supervised | {pct} gain (points) |"
        rule += "---|---|---|"
    lines = [head, rule]
    for width, row in report.items():
        line = (f"| ResNet-{depth}, base width {width} | {row['parameters'] / 1e6:.2f} M | "
                f"{row['wall_s'] / 60:.1f} min |")
        for fraction in fractions:
            entry = row["fractions"][fraction]
            tuned, sup, gain = (entry["simclr_finetune"], entry["supervised_baseline"],
                                entry["gain"])
            line += (f" {100 * tuned['mean']:.2f} ± {100 * tuned['std']:.2f} |"
                     f" {100 * sup['mean']:.2f} ± {100 * sup['std']:.2f} |"
                     f" {gain['mean']:+.2f} ± {gain['std']:.2f} |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def run_size(width: int) -> dict:
    out = os.path.join(FLAGS.output_dir, f"width_{width}")
    results_path = os.path.join(out, "results.json")
    timing_path = os.path.join(out, "scaling_wall_s.json")
    if not os.path.exists(results_path):
        command = [sys.executable, "-m", "experiments.pipeline",
                   f"--flagfile={FLAGS.flagfile_recipe}", f"--depth={FLAGS.depth}",
                   f"--base_width={width}", f"--label_seeds={FLAGS.label_seeds}",
                   f"--output_dir={out}", *FLAGS.extra]
        print(f"[scaling] width {width}: {' '.join(command[1:])}", flush=True)
        start = time.monotonic()
        subprocess.run(command, check=True)
        files.write_json(timing_path, {"wall_s": time.monotonic() - start,
                                              "command": command[1:]})
    else:
        print(f"[scaling] width {width}: reading {results_path} (already run)", flush=True)
    results = files.read_json(results_path)
    wall = results.get("wall_s")
    if os.path.exists(timing_path):
        wall = files.read_json(timing_path)["wall_s"]
    return {"parameters": encoder_parameters(FLAGS.depth, width), "wall_s": wall,
            "results": results}


def main(argv):
    del argv
    if not FLAGS.output_dir:
        raise app.UsageError("--output_dir required")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    sizes = {str(w): run_size(int(w)) for w in FLAGS.base_widths}
    report = summarise(sizes)
    files.write_json(os.path.join(FLAGS.output_dir, "scaling.json"), report)
    text = table(report, FLAGS.depth)
    with files.atomic_open(os.path.join(FLAGS.output_dir, "scaling.md")) as f:
        f.write(text)
    picture = visualize.plot_scaling(report, os.path.join(FLAGS.output_dir, "scaling.png"),
                                     f"ResNet-{FLAGS.depth}")
    print(text)
    print(f"[scaling] wrote {FLAGS.output_dir}/scaling.json, scaling.md, {picture}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
