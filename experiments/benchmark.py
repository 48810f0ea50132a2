"""Throughput benchmark of the SimCLR training step and its parts.

    python -m experiments.benchmark                 # everything, appends to BENCHMARKS.md
    python -m experiments.benchmark --only=r18_b128_32px_bf16 --nowrite

Prints one line per measurement, `bench NAME key=value ...`, and appends a
dated section (command, machine, library versions, table) to BENCHMARKS.md.
Step times are medians of --steps timed steps after --warmup steps. FLOPs are
counted from the layers (1 multiply-add = 2 FLOPs; backward = 2x forward) and
compared with the tf.matmul peak measured in the same run and precision
(measured just before and just after the timed steps; mfu uses the higher).
"""

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_list("only", None, "Run only these measurements (see --list).")
flags.DEFINE_bool("list", False, "List the measurements and exit.")
flags.DEFINE_integer("steps", 5, "Timed steps per measurement.")
flags.DEFINE_integer("warmup", 2, "Untimed warm-up steps.")
flags.DEFINE_bool("write", True, "Append the results to BENCHMARKS.md.")
flags.DEFINE_string("output", "BENCHMARKS.md", "Where results are appended.")
flags.DEFINE_bool("smoke", False, "Tiny sizes, for the test suite.")
flags.DEFINE_integer("inter_op_threads", 0, "TensorFlow inter-op threads (0: its default).")
flags.DEFINE_integer("intra_op_threads", 0, "TensorFlow intra-op threads (0: its default).")
flags.DEFINE_bool("profile", False, "Also trace --steps training steps with the TF "
                  "profiler and report where their time goes, by op type "
                  "(a NAME_profile row).")

# name -> (depth, image size, batch, precision, base width)
STEPS = {
    # The size of make demo's pretraining model (experiments/configs/demo.flags;
    # 3 input channels here, 1 there).
    "demo_r18w16_b256_28px_fp32": (18, 28, 256, "float32", 16),
    "demo_r18w16_b256_28px_bf16": (18, 28, 256, "mixed_bfloat16", 16),
    "r18_b128_32px_fp32": (18, 32, 128, "float32", 64),
    "r18_b128_32px_bf16": (18, 32, 128, "mixed_bfloat16", 64),
    "r50_b64_64px_bf16": (50, 64, 64, "mixed_bfloat16", 64),
    "r50_b8_224px_bf16": (50, 224, 8, "mixed_bfloat16", 64),
    # The demo model on 224 px photos (the large-folder figures).
    "demo_r18w16_b64_224px_bf16": (18, 224, 64, "mixed_bfloat16", 16),
    "demo_r18w16_b64_224px_fp32": (18, 224, 64, "float32", 16),
}
# Where the step time goes: one 3x3 convolution (+ BN + ReLU) at the shape
# of each ResNet-18 stage at 32 px, batch 128 (256 views), per precision.
CONV_STAGES = {"conv_stages_fp32": "float32", "conv_stages_bf16": "mixed_bfloat16"}
STAGE_SHAPES = ((32, 64), (16, 128), (8, 256), (4, 512))  # (spatial size, channels)
# Fine-tuning steps and inference of classifiers at 224 px: the models a user
# imports (ResNet-50 1x, SK off / on, as `import_simclr` builds them, read
# from the first projection layer, 1000 classes), the smaller student
# `--student_depth=18` makes of it (on h, 10 classes) and the demo-size model
# (on h, 10 classes). name -> (mode, depth, sk_ratio, batch, precision, base width, size)
CLASSIFIER_STEPS = {
    f"{mode}_{model}_b{batch}_224px_{precision}": (mode, depth, sk, batch, policy, width, 224)
    for mode, batches in (("finetune", (32, 64)), ("infer", (64, 256)))
    for model, depth, sk, width in (("r50_sk0", 50, 0.0, 64), ("r50_sk1", 50, 0.0625, 64),
                                    ("r18", 18, 0.0, 64), ("demo_r18w16", 18, 0.0, 16))
    for precision, policy in (("fp32", "float32"), ("bf16", "mixed_bfloat16"))
    for batch in (batches[depth == 18],)
}
GPU_STEPS = {
    "r18_b512_32px_fp16": (18, 32, 512, "mixed_float16", 64),
    "r50_b256_224px_bf16": (50, 224, 256, "mixed_bfloat16", 64),
}
NTXENT_BATCHES = (256, 1024, 4096, 8192)


def _median_time(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_step(step, precision, steps, warmup):
    """(first step s, median step s, matmul figure before, after). The first
    step holds graph tracing and compilation, which dominate short runs on
    slow machines. The matmul figure drifts on a shared VM: it is measured
    before and after the steps, and mfu divides by the higher one, so a slow
    moment cannot flatter it."""
    start = time.perf_counter()
    step()
    first_step_s = time.perf_counter() - start
    peak_before = matmul_peak(precision)
    step_s = _median_time(step, steps, warmup)
    return first_step_s, step_s, peak_before, matmul_peak(precision)


def matmul_peak(precision: str, size: int = 2048) -> float:
    """GFLOP/s of a size x size matmul in a tf.function."""
    import tensorflow as tf
    dtype = tf.bfloat16 if "bfloat16" in precision else (
        tf.float16 if "float16" in precision else tf.float32)
    a = tf.random.normal((size, size), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
    f = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, b), tf.float32)))
    seconds = _median_time(lambda: f().numpy(), 7, 2)
    return 2 * size ** 3 / seconds / 1e9


def forward_flops(model) -> float:
    """FLOPs of one forward pass of one image, from conv and dense layers."""
    import keras
    total = 0.0
    for layer in _leaf_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            out = layer.output.shape
            k = layer.kernel.shape
            total += 2.0 * out[1] * out[2] * k[0] * k[1] * k[2] * k[3]
        elif isinstance(layer, keras.layers.Dense):
            total += 2.0 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return total


def _leaf_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from _leaf_layers(layer)
        else:
            yield layer


def op_type_shares(step, steps: int, top: int = 12) -> dict:
    """Runs `step` `steps` times under the TF profiler; returns each op type's
    share of the traced op self-time (idle excluded), the `top` largest, the
    rest summed as `other`, and `traced_ms_per_step`."""
    import json
    import tempfile
    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            step()
        tf.profiler.experimental.stop()
        paths = [os.path.join(root, f) for root, _, files in os.walk(logdir)
                 for f in files if f.endswith(".xplane.pb")]
        table = json.loads(plugin.xspace_to_tools_data(paths, "framework_op_stats", {})[0])[0]
    columns = [c["id"] for c in table["cols"]]
    kind, self_time = columns.index("type"), columns.index("total_self_time")
    totals = {}
    for row in table["rows"]:
        values = [c.get("v") if c else None for c in row["c"]]
        if values[kind] != "IDLE":
            op = str(values[kind]).replace("_MklNative", "").replace("_Mkl", "")
            totals[op] = totals.get(op, 0.0) + float(values[self_time])
    total = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    shares = {op: round(t / total, 3) for op, t in ranked[:top]}
    shares["other"] = round(sum(t for _, t in ranked[top:]) / total, 3)
    shares["traced_ms_per_step"] = round(total / 1e3 / steps, 1)
    return shares


def bench_step(name, depth, size, batch, precision, base_width, steps, warmup,
               profile=False):
    import keras
    import numpy as np
    import tensorflow as tf
    import contrastive_tf as ct

    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    encoder = ct.resnet(depth, input_shape=(size, size, 3), base_width=base_width)
    head = ct.ProjectionHead(2, 128)
    augmenter = ct.SimCLRAugmenter(size, blur=size > 32, seed=0)
    model = ct.SimCLR(encoder, augmenter, head, temperature=0.5)
    model.compile(optimizer=ct.LARS(0.1))
    images = np.random.RandomState(0).randint(0, 256, (batch, size, size, 3)).astype(np.uint8)
    images = tf.constant(images)
    step = lambda: model.train_on_batch(images)  # noqa: E731
    first_step_s, step_s, peak_before, peak_after = _time_step(step, precision, steps, warmup)
    augment = tf.function(lambda x: (augmenter(x), augmenter(x)))
    augment_s = _median_time(lambda: [v.numpy() for v in augment(images)], steps, warmup)
    head_flops = 2.0 * sum(int(np.prod(w.shape)) for w in head.weights if len(w.shape) == 2)
    flops_step = 3 * 2 * batch * (forward_flops(encoder) + head_flops)
    peak = max(peak_before, peak_after)
    shares = op_type_shares(step, steps) if profile else None
    keras.mixed_precision.set_global_policy("float32")
    result = {
        "images_per_s": round(batch / step_s, 2),
        "views_per_s": round(2 * batch / step_s, 2),
        "step_s": round(step_s, 4),
        "first_step_s": round(first_step_s, 2),
        "gflop_per_step": round(flops_step / 1e9, 2),
        "gflops": round(flops_step / step_s / 1e9, 1),
        "matmul_peak_gflops": round(peak, 1),
        "matmul_peak_low_gflops": round(min(peak_before, peak_after), 1),
        "mfu": round(flops_step / step_s / 1e9 / peak, 3),
        "augment_s": round(augment_s, 4),
        "augment_share": round(augment_s / step_s, 3),
        "augment_images_per_s": round(2 * batch / augment_s, 1),
        "forward_gflop_per_image": round(forward_flops(encoder) / 1e9, 3),
    }
    return result, shares


def bench_classifier(mode, depth, sk_ratio, batch, precision, base_width, size, steps,
                     warmup):
    """images/s of a fine-tuning step (`ClassifierTrainer.train_on_batch`:
    crop + flip, SGD with momentum, as experiments.finetune) or of inference
    (the classifier's forward pass in inference mode, compiled)."""
    import keras
    import numpy as np
    import tensorflow as tf
    import contrastive_tf as ct

    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    big = depth >= 50
    encoder = ct.resnet(depth, input_shape=(size, size, 3), base_width=base_width,
                        sk_ratio=sk_ratio, layout="reference" if big else "default",
                        synchronized_bn=False)
    head = ct.ProjectionHead(3, 128, ft_layer=1) if big else None
    classifier = ct.build_classifier(encoder, 1000 if big else 10, head)
    rng = np.random.RandomState(0)
    images = tf.constant(rng.randint(0, 256, (batch, size, size, 3)).astype(np.uint8))
    labels = tf.constant(rng.randint(0, 10, batch))
    if mode == "finetune":
        trainer = ct.classifier.ClassifierTrainer(classifier, ct.finetune_augmenter(size))
        optimizer = ct.optim.make_optimizer("sgd", 0.05, 1e-4)
        trainer.compile(optimizer=ct.precision.loss_scaled(optimizer, precision))
        step = lambda: trainer.train_on_batch(images, labels)  # noqa: E731
    else:
        floats = tf.cast(images, tf.float32) / 255.0
        forward = tf.function(lambda x: classifier(x, training=False))
        step = lambda: forward(floats).numpy()  # noqa: E731
    first_step_s, step_s, peak_before, peak_after = _time_step(step, precision, steps, warmup)
    keras.mixed_precision.set_global_policy("float32")
    # the head's layers up to ft_layer (the classifier reads the first)
    head_flops = 2.0 * sum(int(np.prod(getattr(head, f"dense_{i}").kernel.shape))
                           for i in range(head.ft_layer)) if head else 0.0
    per_image = forward_flops(classifier) + head_flops
    flops_step = (3 if mode == "finetune" else 1) * batch * per_image
    peak = max(peak_before, peak_after)
    return {
        "images_per_s": round(batch / step_s, 2),
        "step_s": round(step_s, 4),
        "batch": batch,
        "first_step_s": round(first_step_s, 2),
        "gflops": round(flops_step / step_s / 1e9, 1),
        "matmul_peak_gflops": round(peak, 1),
        "matmul_peak_low_gflops": round(min(peak_before, peak_after), 1),
        "mfu": round(flops_step / step_s / 1e9 / peak, 3),
        "forward_gflop_per_image": round(per_image / 1e9, 3),
        "parameters_m": round(classifier.count_params() / 1e6, 2),
    }


def bench_conv_stages(precision, steps, warmup, views=256, shapes=STAGE_SHAPES):
    """GFLOP/s of a 3x3 convolution forward and forward+backward at each
    stage shape, and the time of BN + ReLU forward+backward beside it."""
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(precision)
    result = {}
    for size, channels in shapes:
        conv = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)
        norm = keras.layers.BatchNormalization()
        x = tf.random.uniform((views, size, size, channels))
        conv.build(x.shape)
        norm.build(x.shape)

        @tf.function
        def forward(x):
            return tf.reduce_sum(tf.cast(conv(x), tf.float32))

        @tf.function
        def conv_train(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.cast(conv(x), tf.float32))
            return tape.gradient(loss, [x, conv.kernel])

        @tf.function
        def norm_train(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.cast(tf.nn.relu(norm(x, training=True)), tf.float32))
            return tape.gradient(loss, [x, *norm.trainable_weights])

        flops = 2.0 * views * size * size * 9 * channels * channels
        forward_s = _median_time(lambda: forward(x).numpy(), steps, warmup)
        train_s = _median_time(lambda: [g.numpy() for g in conv_train(x)], steps, warmup)
        norm_s = _median_time(lambda: [g.numpy() for g in norm_train(x)], steps, warmup)
        key = f"{size}px_c{channels}"
        result[f"{key}_fwd_gflops"] = round(flops / forward_s / 1e9, 1)
        result[f"{key}_fwdbwd_gflops"] = round(3 * flops / train_s / 1e9, 1)
        result[f"{key}_bnrelu_share"] = round(norm_s / (train_s + norm_s), 3)
    keras.mixed_precision.set_global_policy("float32")
    result["matmul_peak_gflops"] = round(matmul_peak(precision), 1)
    return result


def bench_ntxent(batch, steps, warmup):
    """Runs in a child process so its peak memory is its own."""
    # Peak memory from VmHWM: exec starts a fresh address space, whereas
    # ru_maxrss would carry over the parent's peak.
    code = f"""
import json, time, statistics, tensorflow as tf, contrastive_tf as ct
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
z1 = tf.random.normal(({batch}, 128)); z2 = tf.random.normal(({batch}, 128))
f = tf.function(lambda a, b: ct.nt_xent(a, b, 0.1))
base = hwm()
for _ in range({warmup}): f(z1, z2).numpy()
times = []
for _ in range({steps}):
    s = time.perf_counter(); f(z1, z2).numpy(); times.append(time.perf_counter() - s)
peak = hwm()
print(json.dumps({{"step_s": statistics.median(times), "peak_rss_mb": peak,
                  "extra_rss_mb": peak - base}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=900)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:200]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: round(v, 4 if k == "step_s" else 1) for k, v in result.items()}


RELEVANT_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def machine() -> str:
    """CPU model, its flags that decide the precision, cores, GPUs, and the
    precision `--precision=auto` picks here."""
    from contrastive_tf.runtime import precision
    cpu = precision.cpu_model()
    if cpu == "unknown":
        cpu = platform.processor() or "unknown CPU"
    flags_here = precision.cpu_flags()
    shown = [f for f in RELEVANT_CPU_FLAGS if f in flags_here] or ["none of " + "/".join(
        RELEVANT_CPU_FLAGS)]
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    gpu = ", ".join(tf.config.experimental.get_device_details(g).get("device_name", g.name)
                    for g in gpus) or "no GPU"
    auto = precision.choose("auto")
    return (f"{cpu} (flags: {' '.join(shown)}), {os.cpu_count()} cores, {gpu}; "
            f"--precision=auto -> {auto.policy}")


def plan_measurements(tf):
    """(step configurations, conv-stage precisions, NT-Xent batches) for
    this machine and the flags: no bf16 where it is emulated (unless named
    with --only), GPU configurations where TensorFlow sees a GPU."""
    from contrastive_tf.runtime import precision
    steps_table = dict(STEPS, **CLASSIFIER_STEPS)
    if tf.config.list_physical_devices("GPU"):
        steps_table.update(GPU_STEPS)
    if precision.choose("auto").policy != "mixed_bfloat16" and not FLAGS.only:
        # bf16 is emulated here (several times slower than fp32): measuring
        # it would take most of the run and say nothing about a useful setting.
        steps_table = {k: v for k, v in steps_table.items() if "mixed_bfloat16" not in v}
        print("bench note: this machine has no native bfloat16; bf16 configurations "
              "are skipped (name them with --only to run them anyway)", flush=True)
    if FLAGS.smoke:
        smoke_classifiers = {
            f"smoke_{mode}_r50_sk1_b4_32px_fp32": (mode, 50, 0.0625, 4, "float32", 4, 32)
            for mode in ("finetune", "infer")}
        return ({"smoke_r18_b8_16px_fp32": (18, 16, 8, "float32", 4), **smoke_classifiers},
                {"smoke_conv_stages_fp32": "float32"}, (64,))
    conv_stages = {k: v for k, v in CONV_STAGES.items()
                   if v != "mixed_bfloat16" or any(v in c for c in steps_table.values())}
    return steps_table, conv_stages, NTXENT_BATCHES


def measure(name: str, steps_table: dict, conv_stages: dict) -> list:
    """[(row name, results)] of one measurement (and its op profile)."""
    if name.startswith("ntxent_b"):
        return [(name, bench_ntxent(int(name[len("ntxent_b"):]), FLAGS.steps, FLAGS.warmup))]
    if name in conv_stages:
        return [(name, bench_conv_stages(conv_stages[name], FLAGS.steps, FLAGS.warmup,
                                         **({"views": 8, "shapes": ((8, 8),)}
                                            if FLAGS.smoke else {})))]
    if steps_table[name][0] in ("finetune", "infer"):  # a classifier measurement
        return [(name, bench_classifier(*steps_table[name], FLAGS.steps, FLAGS.warmup))]
    result, shares = bench_step(name, *steps_table[name], FLAGS.steps, FLAGS.warmup,
                                profile=FLAGS.profile)
    return [(name, result)] + ([(f"{name}_profile", shares)] if shares else [])


def write_rows(rows: list, peak_rss: float, tf, keras, keras_cv) -> None:
    """Appends the run (command, machine, libraries, results) to --output."""
    command = "python -m experiments.benchmark " + " ".join(sys.argv[1:])
    lines = [f"\n## {datetime.date.today().isoformat()}: `{command.strip()}`\n",
             f"- machine: {machine()}",
             f"- libraries: tensorflow {tf.__version__}, keras {keras.__version__}, "
             f"keras-cv {keras_cv.__version__}, Python {platform.python_version()}",
             f"- process peak RSS: {peak_rss:.0f} MB\n",
             "| measurement | results |", "|---|---|"]
    for name, result in rows:
        lines.append(f"| {name} | " + ", ".join(f"{k}={v}" for k, v in result.items()) + " |")
    with open(FLAGS.output, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {FLAGS.output}")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import keras
    import tensorflow as tf
    import keras_cv
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
    steps_table, conv_stages, ntxent_batches = plan_measurements(tf)
    names = (list(steps_table) + list(conv_stages)
             + [f"ntxent_b{b}" for b in ntxent_batches])
    if FLAGS.list:
        print("\n".join(names))
        return
    unknown = set(FLAGS.only or []) - set(names)
    if unknown:
        raise app.UsageError(f"--only: {sorted(unknown)} not in {names}")
    rows = []
    for name in names:
        if FLAGS.only and name not in FLAGS.only:
            continue
        for row_name, values in measure(name, steps_table, conv_stages):
            print(f"bench {row_name} " + " ".join(f"{k}={v}" for k, v in values.items()),
                  flush=True)
            rows.append((row_name, values))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"bench process peak_rss_mb={peak_rss:.0f}", flush=True)
    if FLAGS.write:
        write_rows(rows, peak_rss, tf, keras, keras_cv)


if __name__ == "__main__":
    app.run(main)
