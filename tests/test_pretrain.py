import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.testing import start_local_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset=embedded", "--image_size=16", "--base_width=4",
        "--projection_layers=2", "--projection_dim=8", "--batch_size=32",
        "--optimizer=lars", "--learning_rate=0.5", "--warmup_epochs=0",
        "--knn_bank_size=500", "--knn_k=20"]


def _run(args, timeout=300, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "experiments.pretrain", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def _checkpoints(model_dir):
    folder = os.path.join(model_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(f.split("-")[1].split(".")[0]) for f in os.listdir(folder)
                  if f.startswith("ckpt-") and f.endswith(".index"))


@pytest.mark.slow
def test_job_end_to_end_through_absl(tmp_path):
    model_dir = str(tmp_path / "run")
    result = _run([*TINY, "--train_steps=6", "--checkpoint_steps=4",
                   f"--model_dir={model_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[pretrain] done: step 6/6" in result.stdout
    assert ("312 steps/epoch, 6 steps in all" in result.stdout
            and "lines count checkpoint intervals of 4 steps" in result.stdout)
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    assert summary["step"] == 6 and summary["total_steps"] == 6
    assert summary["images_per_s"] > 0 and summary["wall_s"] > 0
    assert summary["epochs"] == pytest.approx(6 / (10000 // 32), abs=1e-3)
    assert {"loss", "contrastive_accuracy", "knn_accuracy"} <= set(summary["metrics"])
    assert 0 <= summary["metrics"]["knn_accuracy"] <= 1
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert config["depth"] == 18 and config["channels"] == 1
    assert _checkpoints(model_dir) == [4, 6]
    assert os.path.isdir(os.path.join(model_dir, "logs"))
    # The final models load without custom_objects.
    check = subprocess.run(
        [sys.executable, "-c",
         "import keras, contrastive_tf, numpy as np;"
         f"m = keras.models.load_model('{model_dir}/simclr.keras');"
         f"e = keras.models.load_model('{model_dir}/encoder.keras');"
         "x = np.zeros((2, 28, 28, 1), 'uint8');"
         "print(m.predict(x, verbose=0).shape)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert check.returncode == 0, check.stderr[-2000:]
    assert "(2, 32)" in check.stdout

    # Rerunning the finished job trains nothing and reports the same model
    # (the pipeline reuses a finished pretraining this way).
    again = _run([*TINY, "--train_steps=6", "--checkpoint_steps=4",
                  f"--model_dir={model_dir}"])
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.load(open(os.path.join(model_dir, "summary.json")))
    assert rerun["step"] == 6 and rerun["steps_this_run"] == 0
    assert rerun["metrics"]["knn_accuracy"] == pytest.approx(
        summary["metrics"]["knn_accuracy"])
    assert _checkpoints(model_dir) == [4, 6]

    # A different architecture in the same model_dir is refused.
    refused = _run([*TINY, "--base_width=8", "--train_steps=8",
                    f"--model_dir={model_dir}"])
    assert refused.returncode != 0
    assert "refusing to resume" in refused.stderr
    assert "base_width: checkpoint has 4, now 8" in refused.stderr


@pytest.mark.slow
def test_killed_job_resumes_and_ends_at_the_planned_step(tmp_path):
    model_dir = str(tmp_path / "run")
    args = [*TINY, "--train_steps=150", "--checkpoint_steps=4",
            f"--model_dir={model_dir}"]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    folder = os.path.join(model_dir, "checkpoints")
    rng = np.random.RandomState(3)
    killed_at = 0
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "experiments.pretrain", *args],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Wait for a checkpoint newer than the last kill, then kill after a
        # random delay up to about one checkpoint interval (4 steps): mid-step,
        # or while the next checkpoint is being written.
        deadline = time.time() + 240
        while time.time() < deadline and int(
                (tf.train.latest_checkpoint(folder) or "-0").rsplit("-", 1)[1]) <= killed_at:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = tf.train.latest_checkpoint(folder)
        assert latest is not None, "no checkpoint was completed in time"
        assert int(latest.rsplit("-", 1)[1]) > killed_at, "no progress since the last kill"
        killed_at = int(latest.rsplit("-", 1)[1])
        assert killed_at < 150, "the run finished before it could be killed"
        # Every checkpoint left on disk is readable.
        for step in _checkpoints(model_dir):
            tf.train.load_checkpoint(os.path.join(folder, f"ckpt-{step}"))
    result = _run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at step {killed_at}" in result.stdout
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    assert summary["step"] == 150
    assert summary["steps_this_run"] == 150 - killed_at
    assert _checkpoints(model_dir)[-1] == 150


def test_invalid_flags_fail_before_any_work(tmp_path):
    for bad, message in [("--temperature=0", "temperature must be > 0"),
                         ("--depth=20", "depth"),
                         ("--precision=fp8", "precision")]:
        started = time.time()
        result = _run([*TINY, bad, f"--model_dir={tmp_path / 'x'}"], timeout=120)
        assert result.returncode != 0
        assert message in result.stderr, result.stderr[-2000:]
        assert not os.path.exists(tmp_path / "x" / "checkpoints")
        assert time.time() - started < 60


_DETERMINISM_SCRIPT = """
import sys, numpy as np, keras
from contrastive_tf.jobs import pretrain
from contrastive_tf.jobs.config import PretrainConfig

class Crash(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == 4:
            raise KeyboardInterrupt("simulated crash")

config = PretrainConfig(model_dir=sys.argv[1], image_size=16, base_width=4,
                        projection_layers=2, projection_dim=8, batch_size=32,
                        train_steps=8, checkpoint_steps=4, warmup_epochs=0,
                        learning_rate=0.5, deterministic=True, log_images=False,
                        knn_bank_size=200, knn_k=10)
if sys.argv[2] == "crash":
    try:
        pretrain.pretrain(config, verbose=0, callbacks=[Crash()])
    except KeyboardInterrupt:
        pass
pretrain.pretrain(config, verbose=0)
model = keras.models.load_model(sys.argv[1] + "/simclr.keras")
np.savez(sys.argv[1] + "/weights.npz", *[w.numpy() for w in model.weights])
"""


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run_with_op_determinism(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    dirs = {}
    for mode in ("straight", "crash"):
        dirs[mode] = str(tmp_path / mode)
        result = subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT,
                                 dirs[mode], mode], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    straight = np.load(os.path.join(dirs["straight"], "weights.npz"))
    resumed = np.load(os.path.join(dirs["crash"], "weights.npz"))
    assert len(straight.files) > 10
    for key in straight.files:
        np.testing.assert_array_equal(straight[key], resumed[key])


def test_non_finite_loss_stops_without_overwriting_the_checkpoint(tmp_path):
    import keras
    import tensorflow as tf
    from contrastive_tf.method import optim
    from contrastive_tf.runs import checkpoints

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=3)
    manager.save(checkpoint_number=0)
    guard = checkpoints.CheckpointAndGuard(manager, every_steps=1, total_steps=10,
                                           schedule=optim.WarmupCosine(1.0, 0, 10))
    guard.set_model(model)
    model.optimizer.iterations.assign(1)
    with pytest.raises(checkpoints.NonFiniteLossError, match="at step 1"):
        guard.on_train_batch_end(0, {"loss": np.float32("nan")})
    assert manager.latest_checkpoint.endswith("ckpt-0")
    guard.on_train_batch_end(0, {"loss": np.float32(1.0)})
    assert manager.latest_checkpoint.endswith("ckpt-1")


def _finite_checkpoint(path):
    reader = tf.train.load_checkpoint(path)
    for name, dtype in reader.get_variable_to_dtype_map().items():
        if dtype.is_floating and not np.all(np.isfinite(reader.get_tensor(name))):
            return False
    return True


def test_job_help_texts_are_not_garbled():
    # absl formats a module docstring with %: a bare % garbled --help.
    import ast
    import glob
    for path in glob.glob(os.path.join(ROOT, "experiments", "*.py")):
        doc = ast.get_docstring(ast.parse(open(path).read())) or ""
        assert "%" not in doc.replace("%%", ""), path


def test_blown_up_run_keeps_only_finite_checkpoints(tmp_path):
    # A far too high learning rate: the loss of step 2 is still finite (it is
    # computed before step 2's update), but that update leaves NaN in
    # batch-norm moving variances. Nothing non-finite may be checkpointed.
    model_dir = str(tmp_path / "run")
    result = _run([*TINY, "--optimizer=sgd", "--learning_rate=1e12",
                   "--checkpoint_steps=1", "--train_steps=10", f"--model_dir={model_dir}"])
    assert result.returncode == 1
    assert "NaN/Inf" in result.stderr or "loss is nan" in result.stderr
    # A known error is one line, not a traceback.
    assert "Traceback" not in result.stderr and "\nerror: " in "\n" + result.stderr
    saved = _checkpoints(model_dir)
    assert saved, result.stderr[-2000:]
    folder = os.path.join(model_dir, "checkpoints")
    for step in saved:
        assert _finite_checkpoint(os.path.join(folder, f"ckpt-{step}")), f"ckpt-{step}"
    named = result.stderr.split("last good checkpoint is ")[1].split(" ")[0]
    assert named == os.path.join(folder, f"ckpt-{max(saved)}")


@pytest.mark.slow
def test_multi_worker_job_killed_and_restarted_finishes(tmp_path):
    """Two MultiWorkerMirroredStrategy workers on 127.0.0.1; worker 1 is
    killed mid-run, the cluster is restarted, training resumes from the
    chief's last checkpoint and finishes (BackupAndRestore semantics)."""
    model_dir = str(tmp_path / "run")
    args = [*TINY, "--strategy=multi_worker", "--train_steps=60", "--checkpoint_steps=4",
            f"--model_dir={model_dir}"]

    def start_cluster():
        return start_local_cluster(["experiments.pretrain", *args], ROOT, text=True)

    procs = start_cluster()
    checkpoints = os.path.join(model_dir, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and tf.train.latest_checkpoint(checkpoints) is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)  # a worker dies ...
    time.sleep(1)
    procs[0].send_signal(signal.SIGKILL)  # ... and the cluster is torn down
    for proc in procs:
        proc.wait(timeout=60)
    latest = tf.train.latest_checkpoint(checkpoints)
    assert latest is not None, "no checkpoint before the kill"
    resumed_from = int(latest.rsplit("-", 1)[1])
    assert resumed_from < 60

    procs = start_cluster()
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        outputs.append(out)
        assert proc.returncode == 0, out[-3000:]
    assert f"resuming at step {resumed_from}" in outputs[0]
    assert f"resuming at step {resumed_from}" in outputs[1]
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    assert summary["step"] == 60
    assert not any(name.startswith("worker_tmp") for name in os.listdir(model_dir))


def _file_size_limit(limit_bytes):
    """preexec_fn: writes past `limit_bytes` fail with EFBIG, as on a full disk."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    model_dir = str(tmp_path / "run")
    args = [*TINY, "--checkpoint_steps=4", "--knn_every_epochs=0",
            f"--model_dir={model_dir}"]
    first = _run([*args, "--train_steps=8"])
    assert first.returncode == 0, first.stderr[-3000:]
    folder = os.path.join(model_dir, "checkpoints")
    data_file = [f for f in os.listdir(folder) if f.startswith("ckpt-8.data")][0]
    size = os.path.getsize(os.path.join(folder, data_file))
    kept = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)
            if f.startswith("ckpt-8.")}

    # The next checkpoint (step 12) cannot be written: no file may grow past
    # half the size of a checkpoint's data file.
    full = _run([*args, "--train_steps=16"], preexec_fn=_file_size_limit(size // 2))
    assert full.returncode != 0
    assert "could not write checkpoint 12" in full.stderr, full.stderr[-3000:]
    assert "ckpt-8" in full.stderr and "intact" in full.stderr
    assert tf.train.latest_checkpoint(folder).endswith("ckpt-8")
    assert _checkpoints(model_dir) == [4, 8]
    for name, content in kept.items():  # byte for byte, and readable
        assert open(os.path.join(folder, name), "rb").read() == content
    tf.train.load_checkpoint(os.path.join(folder, "ckpt-8"))
    assert not [f for f in os.listdir(folder) if "temp" in f], os.listdir(folder)

    # With space again, the same command resumes from step 8 and finishes.
    resumed = _run([*args, "--train_steps=16"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 8" in resumed.stdout
    assert _checkpoints(model_dir)[-1] == 16


# -- the pretraining stages, one at a time -----------------------------------

def test_plan_run_counts_steps_and_clamps_warmup(caplog):
    from contrastive_tf import data
    from contrastive_tf.jobs import pretrain
    from contrastive_tf.jobs.config import PretrainConfig

    config = PretrainConfig(model_dir="unused", batch_size=100, epochs=3, warmup_epochs=2,
                            learning_rate=0.3, lr_scaling="linear")
    with caplog.at_level("INFO", logger="contrastive_tf"):
        plan = pretrain.plan_run(config, 1050, "folder:x")
    assert (plan.steps_per_epoch, plan.total_steps) == (10, 30)
    assert plan.warmup_steps == 3  # 20 asked for, 10% of 30 kept
    assert "warmup clamped from 20 to 3 steps" in caplog.text
    assert plan.chunk == 30  # checkpoint_steps 500 > the run
    peak = 0.3 * 100 / 256
    np.testing.assert_allclose(float(plan.schedule(3)), peak, rtol=1e-6)
    assert float(plan.schedule(30)) < 1e-6 * peak + 1e-12
    with pytest.raises(data.DataError, match="fewer than one batch of 100"):
        pretrain.plan_run(config, 99, "folder:x")


def test_load_training_data_fills_in_channels_and_the_query_set():
    from contrastive_tf.jobs import pretrain
    from contrastive_tf.jobs.config import PretrainConfig

    config, source, query = pretrain.load_training_data(PretrainConfig(
        model_dir="unused", dataset="embedded", image_size=28))
    assert config.channels == 1 and source.image_shape == (28, 28, 1)
    assert query is not None and query.split != source.split and query.labelled


def test_check_resumable_names_each_differing_setting(tmp_path):
    import dataclasses
    from contrastive_tf.jobs.config import PretrainConfig
    from contrastive_tf.runs import checkpoints
    from contrastive_tf.runtime.files import write_json

    config = PretrainConfig(model_dir=str(tmp_path), depth=18, base_width=16)
    write_json(str(tmp_path / "config.json"), config.to_dict())
    not_architecture = dataclasses.replace(config, epochs=7)
    checkpoints.check_resumable(str(tmp_path), not_architecture.architecture(), True)
    changed = dataclasses.replace(config, depth=34, base_width=8).architecture()
    with pytest.raises(checkpoints.ResumeError, match="depth: checkpoint has 18, now 34.*"
                                                      "base_width: checkpoint has 16, now 8"):
        checkpoints.check_resumable(str(tmp_path), changed, True)
    checkpoints.check_resumable(str(tmp_path), changed, False)  # no checkpoint: nothing to resume
