"""Large-folder figures (BENCHMARKS.md): what streaming a folder costs.

    python -m experiments.make_photo_folder --output=/data/photos2k --count=2000
    python -m experiments.make_photo_folder --output=/data/photos20k --count=20000
    python -m experiments.benchmark_folder --folders=/data/photos2k,/data/photos20k

For each folder, `experiments.pretrain` (the demo model at --image_size) runs
in its own process for --steps steps, and the table gets its peak RSS (the
process's own, from wait4) and the time from the process's start to the end
of its first training step (a run of one step). With --input_only it also
measures the input pipeline alone (images/s of training pairs, no model)
and, with --cache_dir, the same from the decoded cache; with --predict the
predict job over each folder (encoder embeddings, peak RSS, images/s).
Results go to stdout as Markdown rows, with the CPU and its flags.
"""

import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("folders", None, "Folders of images to measure, in order.")
flags.DEFINE_integer("image_size", 224, "Training image side.")
flags.DEFINE_integer("steps", 4, "Training steps of the RSS run.")
flags.DEFINE_integer("batch_size", 64, "Global batch.")
flags.DEFINE_string("precision", "auto", "Pretraining precision.")
flags.DEFINE_bool("input_only", False, "Also measure the input pipeline alone.")
flags.DEFINE_string("cache_dir", "", "With --input_only: also measure reading from this cache.")
flags.DEFINE_bool("predict", False, "Also run experiments.predict over each folder.")
flags.mark_flag_as_required("folders")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in GB, output) of `python -m args` in its own process."""
    started = time.time()
    process = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.time() - started
    if status != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{output[-3000:]}")
    return seconds, usage.ru_maxrss / 2 ** 20, output


def _pretrain(folder: str, steps: int, work: str) -> list[str]:
    return ["experiments.pretrain", "--flagfile=experiments/configs/demo.flags",
            f"--dataset=folder:{folder}", f"--image_size={FLAGS.image_size}",
            f"--batch_size={FLAGS.batch_size}", f"--train_steps={steps}",
            f"--checkpoint_steps={steps}", f"--precision={FLAGS.precision}",
            "--log_images=false", f"--model_dir={work}"]


def _input_rate(folder: str, cache_dir: str | None, batches: int = 20) -> float:
    """Training pairs per second of the input pipeline alone (second pass
    over `batches` batches, so a cache or the memory store is warm)."""
    from contrastive_tf import data
    source = data.load(f"folder:{folder}", "all", image_size=FLAGS.image_size, stream=True)
    stream = data.view_stream(source, FLAGS.batch_size, image_size=FLAGS.image_size,
                              cache_dir=cache_dir)
    for _ in stream.take(2):
        pass
    started = time.time()
    for _ in stream.take(batches):
        pass
    return batches * FLAGS.batch_size / (time.time() - started)


def main(argv):
    del argv
    from contrastive_tf.runtime import precision
    flags_seen = " ".join(sorted(precision.cpu_flags() & {
        "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    print(f"CPU: {precision.cpu_model()} ({os.cpu_count()} cores; {flags_seen}); "
          f"image_size {FLAGS.image_size}, batch {FLAGS.batch_size}, {time.strftime('%Y-%m-%d')}")
    print("| folder | images | first step s (1-step run) | peak RSS GB "
          f"({FLAGS.steps}-step run) | wall s |")
    print("|---|---|---|---|---|")
    for folder in FLAGS.folders:
        count = sum(1 for _ in os.scandir(folder))
        with tempfile.TemporaryDirectory() as work:
            first, _, _ = _run(_pretrain(folder, 1, os.path.join(work, "one")))
            wall, rss, _ = _run(_pretrain(folder, FLAGS.steps, os.path.join(work, "run")))
        print(f"| {folder} | {count} | {first:.1f} | {rss:.2f} | {wall:.1f} |", flush=True)
    if FLAGS.input_only:
        for folder in FLAGS.folders:
            rate = _input_rate(folder, None)
            line = f"input pipeline {folder}: {rate:.0f} pairs/s decoding"
            if FLAGS.cache_dir:
                line += f", {_input_rate(folder, FLAGS.cache_dir):.0f} pairs/s from the cache"
            print(line, flush=True)
    if FLAGS.predict:
        for folder in FLAGS.folders:
            with tempfile.TemporaryDirectory() as work:
                _run(_pretrain(folder, 1, os.path.join(work, "run")))
                wall, rss, _ = _run(["experiments.predict", f"--model={work}/run",
                                     f"--dataset=folder:{folder}",
                                     f"--output={work}/p.csv",
                                     f"--embeddings={work}/h.npy"])
            print(f"predict {folder}: {wall:.1f} s, peak RSS {rss:.2f} GB", flush=True)


if __name__ == "__main__":
    app.run(main)
