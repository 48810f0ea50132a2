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
flags.DEFINE_list("epoch_sizes", [], "Also time training epochs of the demo model at these "
                  "image sizes: the in-memory path (the folder decoded into arrays first) "
                  "against streaming with no store, the memory store and the decoded cache "
                  "(--cache_dir), on the first folder.")
flags.DEFINE_integer("epochs", 3, "With --epoch_sizes: epochs per path (all but the first timed).")
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


class _EpochTimes:
    def __init__(self):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(inner, epoch, logs=None):
                inner.started = time.time()

            def on_epoch_end(inner, epoch, logs=None):
                self.times.append(time.time() - inner.started)

        self.times, self.callback = [], Callback()


def _epochs(folder: str, size: int, path: str) -> list[float]:
    """Seconds per training epoch of the demo model at `size` on `folder`
    through `path`: "memory", "stream" (nothing kept), "store" (memory
    store) or "cache" (decoded cache in --cache_dir)."""
    import keras
    from contrastive_tf import data
    from contrastive_tf.jobs.config import PretrainConfig
    from contrastive_tf.jobs.models import build_simclr
    from contrastive_tf.method import optim
    from contrastive_tf.runtime import precision
    config = PretrainConfig(model_dir="-", image_size=size, channels=3, depth=18,
                            base_width=16, projection_layers=2, projection_dim=64,
                            temperature=0.2, crop_min_area=0.2, batch_size=FLAGS.batch_size)
    policy = precision.choose(FLAGS.precision).policy
    with precision.policy_scope(policy):
        keras.utils.set_random_seed(0)
        model = build_simclr(config)
        model.compile(optimizer=optim.make_optimizer("lars", 0.5, 1e-6))
    if path == "memory":
        source = data.load_folder(folder, size, 3)
        stream = data.training_stream(source, FLAGS.batch_size)
    else:
        source = data.load(f"folder:{folder}", "all", image_size=size, stream=True)
        stream = data.view_stream(
            source, FLAGS.batch_size, image_size=size, crop_area=(0.2, 1.0),
            cache_dir=FLAGS.cache_dir if path == "cache" else None,
            memory_budget=0 if path == "stream" else data.stream.MEMORY_BUDGET_BYTES)
    timer = _EpochTimes()
    model.fit(stream, steps_per_epoch=source.num_examples // FLAGS.batch_size,
              epochs=FLAGS.epochs, verbose=0, callbacks=[timer.callback])
    return timer.times


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
    for size in FLAGS.epoch_sizes:
        times = {path: _epochs(FLAGS.folders[0], int(size), path)
                 for path in ("memory", "stream", "store", "cache")}
        later = {path: sum(t[1:]) / len(t[1:]) for path, t in times.items()}
        print(f"epochs at {size} px on {FLAGS.folders[0]}: " + "; ".join(
            f"{path} first {t[0]:.1f} s, later {later[path]:.1f} s "
            f"({later[path] / later['memory']:.2f}x memory)" for path, t in times.items()),
            flush=True)
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
