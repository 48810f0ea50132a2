import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import keras

import contrastive_tf as ct
from contrastive_tf import data
from contrastive_tf.jobs import finetune, pipeline, pipeline_data
from contrastive_tf.jobs.config import PipelineConfig, PretrainConfig
from contrastive_tf.method import classifier
from contrastive_tf.method.distiller import Distiller
from tests.testing import tiny_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _separable(count, seed=0):
    """Images whose class is their brightness: easy to learn quickly."""
    rng = np.random.RandomState(seed)
    labels = np.arange(count) % 3
    images = (labels[:, None, None, None] * 100 + rng.randint(0, 40, (count, 16, 16, 1)))
    return data.from_arrays(images.astype(np.uint8), labels, ["dark", "mid", "bright"])


def test_build_classifier_starts_from_the_chosen_head_layer():
    encoder = tiny_encoder(16, 1)
    head = ct.ProjectionHead(3, 8, ft_layer=1)
    head.build(encoder.output.shape)
    classifier = ct.build_classifier(encoder, 5, head)
    x = np.random.RandomState(0).rand(2, 16, 16, 1).astype("float32")
    features = head.finetune_features(encoder(x, training=False), training=False)
    logits_layer = classifier.get_layer("logits")
    np.testing.assert_allclose(
        classifier(x, training=False),
        features @ logits_layer.kernel.numpy() + logits_layer.bias.numpy(), atol=1e-5)
    # shares, not copies, the encoder's weights
    assert any(w is encoder.weights[0] for w in classifier.weights)


def test_classifier_refuses_uint8_images_passed_as_numbers():
    # 0-255 values fed as floats used to be classified silently (and wrongly).
    classifier = ct.build_classifier(tiny_encoder(16, 1), 3)
    images = np.random.RandomState(0).rand(2, 16, 16, 1).astype("float32")
    assert classifier.predict(images, verbose=0).shape == (2, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[0, 1\].*divide by 255"):
        classifier.predict((images * 255).astype("uint8"), verbose=0)


def test_evaluate_classifier_matches_numpy_argmax():
    # Reference: the classifier on images / 255 (16 px: evaluation
    # preprocessing is only the scaling), argmax in NumPy, 37 images so the
    # last batch of the pipeline is partial.
    source = _separable(37, 3)
    keras.utils.set_random_seed(1)
    classifier = ct.build_classifier(tiny_encoder(16, 1), 3)
    logits = classifier.predict(source.images.astype("float32") / 255.0, verbose=0)
    expected = np.mean(np.argmax(logits, axis=1) == source.labels)
    assert 0 < expected < 1  # an untrained classifier: some right, some wrong
    assert finetune.evaluate_classifier(classifier, source) == pytest.approx(expected)


def test_train_classifier_learns_and_keeps_best_validation_weights():
    train, val, test = _separable(48), _separable(30, 1), _separable(30, 2)
    keras.utils.set_random_seed(0)
    classifier = ct.build_classifier(tiny_encoder(16, 1), 3)
    result = finetune.train_classifier(classifier, train, val, test, epochs=8,
                                       batch_size=16, learning_rate=0.05, patience=3)
    assert result.test_accuracy > 0.8
    assert 1 <= result.best_epoch <= result.epochs_run <= 8
    assert finetune.evaluate_classifier(classifier, test) == pytest.approx(result.test_accuracy)


def test_train_classifier_runs_the_whole_schedule_without_patience():
    train, test = _separable(48), _separable(30, 2)
    # Validation labels shuffled: its accuracy wanders from epoch to epoch, so
    # the last epoch's weights score differently from the best epoch's (0.25
    # against 0.33 here when the restore is switched off).
    noisy = _separable(60, 1)
    val = data.from_arrays(noisy.images, np.random.RandomState(0).permutation(noisy.labels),
                           noisy.class_names)
    keras.utils.set_random_seed(0)
    classifier = ct.build_classifier(tiny_encoder(16, 1), 3)
    result = finetune.train_classifier(classifier, train, val, test, epochs=6,
                                       batch_size=16, learning_rate=0.05)
    assert result.epochs_run == 6 and result.best_epoch < 6
    # the kept weights are those of the best validation epoch
    assert finetune.evaluate_classifier(classifier, val) == pytest.approx(result.val_accuracy)
    with pytest.raises(ValueError, match="patience"):
        finetune.train_classifier(classifier, train, val, test, epochs=1, patience=-1)


def test_best_epoch_ties_go_to_the_latest_and_patience_stops():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    keeper = classifier.KeepBestEpoch(patience=0)
    keeper.set_model(model)
    keeper.on_train_begin()
    for epoch, accuracy in enumerate([0.5, 0.7, 0.6, 0.7, 0.6]):
        model.layers[0].bias.assign([float(epoch)])  # marks the epoch's weights
        keeper.on_epoch_end(epoch, {"val_accuracy": accuracy})
    keeper.on_train_end()
    assert keeper.best_epoch == 4 and keeper.best == 0.7
    assert float(model.layers[0].bias.numpy()[0]) == 3.0  # epoch 4's weights
    patient = classifier.KeepBestEpoch(patience=2)
    patient.set_model(model)
    patient.on_train_begin()
    for epoch, accuracy in enumerate([0.5, 0.7, 0.7, 0.6]):
        patient.on_epoch_end(epoch, {"val_accuracy": accuracy})
    assert model.stop_training and patient.best_epoch == 3  # a tie does not reset patience


def test_labelled_splits_are_disjoint_class_balanced_and_repeatable():
    pre = PretrainConfig(dataset="embedded", image_size=28, model_dir="unused")
    config = PipelineConfig(output_dir="unused", pretrain=pre, fractions=(0.01, 0.1),
                            val_fraction=0.1, seed=3)
    splits = pipeline_data.labelled_splits(config)
    n = splits.full.num_examples
    assert splits.val.num_examples + splits.pool.num_examples == n
    val_rows = set(range(n)) - set(splits.pool_index.tolist())
    assert len(val_rows) == splits.val.num_examples == round(0.1 * n)
    for fraction in (0.01, 0.1):
        rows = splits.pool_index[splits.chosen[fraction]]
        assert not set(rows.tolist()) & val_rows
        counts = np.bincount(splits.subsets[fraction].labels, minlength=10)
        assert (counts == round(fraction * n / 10)).all(), counts
        np.testing.assert_array_equal(splits.subsets[fraction].labels,
                                      splits.full.labels[rows])
    again = pipeline_data.labelled_splits(config)
    np.testing.assert_array_equal(again.pool_index, splits.pool_index)
    np.testing.assert_array_equal(again.chosen[0.01], splits.chosen[0.01])


def test_fresh_models_use_the_pretraining_precision():
    # The supervised baseline must run in the precision of the pretrained
    # encoder it is compared with, whatever the global policy is.
    pre = PretrainConfig(dataset="embedded", image_size=16, channels=1, base_width=4,
                         precision="mixed_bfloat16", model_dir="unused")
    encoder, head = pipeline.fresh_parts(pre)
    assert encoder.get_layer("stem_conv").compute_dtype == "bfloat16"
    assert head.dense_0.compute_dtype == "bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"


class _RecordTraining(keras.callbacks.Callback):
    """Records the optimizer a fit used and its per-epoch losses."""

    def on_train_begin(self, logs=None):
        self.optimizer, self.losses = self.model.optimizer, []

    def on_epoch_end(self, epoch, logs=None):
        self.losses.append(float(logs["loss"]))


def test_finetuning_and_distillation_under_mixed_float16():
    # Regression: both were built after pretraining reset the global policy
    # to float32, so their optimizer was not loss-scaled while the encoder
    # computed in float16.
    train, val, test = _separable(48), _separable(30, 1), _separable(30, 2)
    keras.utils.set_random_seed(0)
    pre = PretrainConfig(dataset="embedded", image_size=16, channels=1, base_width=4,
                         projection_layers=2, ft_layer=0, batch_size=16,
                         precision="mixed_float16", model_dir="unused")
    encoder, _ = pipeline.fresh_parts(pre)
    teacher = ct.build_classifier(encoder, 3)
    record = _RecordTraining()
    result = finetune.train_classifier(teacher, train, val, test, epochs=8, batch_size=16,
                                       learning_rate=0.05, callbacks=[record])
    assert isinstance(record.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.all(np.isfinite(record.losses)) and record.losses[-1] < record.losses[0]
    assert result.test_accuracy > 0.8
    assert keras.mixed_precision.global_policy().name == "float32"

    config = PipelineConfig(output_dir="unused", pretrain=pre, student_init="scratch",
                            distill_learning_rate=0.05)
    record = _RecordTraining()
    student = pipeline.distill_student(config, pre, teacher, _separable(96, 3),
                                       epochs=6, callbacks=[record])
    assert isinstance(record.optimizer, keras.optimizers.LossScaleOptimizer)
    assert student.get_layer("logits").dtype_policy.name == "float32"
    assert pipeline.precision.precision_of(student) == "mixed_float16"
    assert np.all(np.isfinite(record.losses)) and record.losses[-1] < record.losses[0]
    assert finetune.evaluate_classifier(student, test) > 0.6
    assert keras.mixed_precision.global_policy().name == "float32"


def test_distiller_moves_the_student_towards_the_teacher():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    teacher = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    student = ct.build_classifier(tiny_encoder(16, 1), 3)
    distiller = Distiller(teacher, student, ct.finetune_augmenter(16, 0.5))
    distiller.compile(optimizer=keras.optimizers.Adam(3e-3))
    images = _separable(64).images
    history = distiller.fit(tf.data.Dataset.from_tensor_slices(images).batch(32).repeat(),
                            steps_per_epoch=10, epochs=4, verbose=0)
    loss = history.history["loss"]
    assert loss[-1] < loss[0]
    assert history.history["teacher_agreement"][-1] > history.history["teacher_agreement"][0]
    teacher_before = [w.numpy().copy() for w in teacher.weights]
    distiller.fit(tf.data.Dataset.from_tensor_slices(images).batch(32), epochs=1, verbose=0)
    for before, w in zip(teacher_before, teacher.weights):
        np.testing.assert_array_equal(before, w.numpy())  # the teacher is frozen


def test_distillation_with_a_separate_labelled_set_learns_from_its_labels():
    # The teacher is untrained (its soft labels carry no information); with a
    # heavy labelled term the student still learns the task from the
    # separate labelled batches.
    from contrastive_tf.jobs import distill
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    teacher = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    student = ct.build_classifier(tiny_encoder(16, 1), 3)
    pool = dataclasses.replace(_separable(64, 5), labels=None)
    labelled, test = _separable(48), _separable(60, 2)
    distill.distill(teacher, student, pool, labelled=labelled, label_weight=5.0, epochs=8,
                    batch_size=16, learning_rate=0.05, verbose=0)
    assert finetune.evaluate_classifier(student, test) > 0.8
    assert finetune.evaluate_classifier(teacher, test) < 0.6


def test_distillation_weight_decay_shrinks_the_student_as_asked():
    # The same seeded run with and without a large decoupled decay
    # (w -= lr * wd * w each step): with it, the classifier layer's kernel
    # ends with a much smaller norm.
    from contrastive_tf.jobs import distill
    inputs = keras.Input((16, 16, 1))
    teacher = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    pool = dataclasses.replace(_separable(32, 5), labels=None)
    norms = {}
    for decay in (0.0, 0.5):
        keras.utils.set_random_seed(0)
        student = ct.build_classifier(tiny_encoder(16, 1), 3)
        distill.distill(teacher, student, pool, epochs=2, batch_size=16, learning_rate=0.5,
                        weight_decay=decay, verbose=0)
        norms[decay] = float(np.linalg.norm(student.get_layer("logits").kernel.numpy()))
    assert norms[0.5] < 0.8 * norms[0.0], norms


def test_distiller_rejects_mismatched_classes():
    inputs = keras.Input((8, 8, 1))
    a = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    b = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(inputs)))
    with pytest.raises(ValueError, match="classes"):
        Distiller(a, b, ct.finetune_augmenter(8))


@pytest.mark.slow
def test_pipeline_end_to_end_on_a_tiny_budget(tmp_path):
    out = tmp_path / "run"
    args = ["--dataset=embedded", "--image_size=16", "--base_width=4",
            "--projection_layers=2", "--projection_dim=8", "--batch_size=64",
            "--train_steps=3", "--knn_bank_size=200", "--finetune_epochs=2",
            "--finetune_min_steps=2", "--probe_steps=20", "--distill_epochs=1",
            "--supervised_epochs=2", "--label_seeds=2",
            f"--output_dir={out}"]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-m", "experiments.pipeline", *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| simclr_finetune |" in result.stdout
    report = json.load(open(out / "results.json"))
    for method in pipeline_data.METHODS:
        assert report[method], method
        assert all(0.0 <= v <= 1.0 for v in report[method].values())
    assert set(report["simclr_finetune"]) == {"0.01", "0.1"}
    assert set(report["linear_probe"]) == {"0.01", "0.1", "1.0"}
    assert set(report["distilled_student"]) == {"0.01", "0.1"}
    assert report["wall_s"] > 0 and report["config"]["pretrain"]["dataset"] == "embedded"
    assert os.path.getsize(out / "label_efficiency.png") > 1000
    assert (out / "results.md").read_text().startswith("# Label efficiency")
    subset = json.load(open(out / "labelled_0.01.json"))
    assert subset["count"] == 100 and len(set(subset["indices"])) == 100
    # Two label draws: another class-balanced subset, and each method's
    # mean and standard deviation over the draws (the plain keys hold the mean).
    other = json.load(open(out / "labelled_0.01_draw1.json"))
    assert other["count"] == 100 and other["indices"] != subset["indices"]
    first = {}
    for method in ("simclr_finetune", "supervised_baseline", "distilled_student"):
        for key in ("0.01", "0.1"):
            draws = report["spread"][method][key]
            assert len(draws["values"]) == 2
            assert draws["mean"] == pytest.approx(np.mean(draws["values"]))
            assert draws["std"] == pytest.approx(np.std(draws["values"]))
            assert report[method][key] == pytest.approx(draws["mean"])
            first[method, key] = draws["values"][0]
    assert " ± " in (out / "results.md").read_text()
    # The exported classifier reproduces the fine-tuned model's test accuracy.
    test = data.load("embedded", "test")
    served = tf.saved_model.load(str(out / "exports" / "simclr_classifier" / "1"))
    predict = served.signatures["predict_images"]
    correct = 0
    for start in range(0, test.num_examples, 500):
        images = tf.constant(test.images[start:start + 500] / 255.0, tf.float32)
        correct += int(np.sum(predict(images=images)["class_id"].numpy()
                              == test.labels[start:start + 500]))
    # (the exports are draw 0's models)
    assert correct / test.num_examples == pytest.approx(first["simclr_finetune", "0.1"],
                                                        abs=1e-3)
    # The tuning tool uses the pipeline's splits and settings: its default
    # supervised trial reproduces the pipeline's 1% baseline.
    tune_dir = tmp_path / "tune"
    args = [a for a in args if not a.startswith("--output_dir=")]
    tuned = subprocess.run(
        [sys.executable, "-m", "experiments.tune_finetune", *args, f"--output_dir={tune_dir}",
         f"--model_dir={out / 'pretrain'}", "--fraction=0.01", "--trials=supervised:",
         "--trials=simclr:distill=1", "--trials=simclr:from=h"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    records = [json.loads(line) for line in open(tune_dir / "tuning_0.01.jsonl")]
    assert [r["method"] for r in records] == ["supervised", "simclr", "simclr"]
    assert records[0]["labels"] == 100
    assert records[0]["test_accuracy"] == pytest.approx(
        first["supervised_baseline", "0.01"], abs=1e-6)
    # ... and its default fine-tuning + distillation, the 1% teacher and student.
    assert records[1]["test_accuracy"] == pytest.approx(
        first["simclr_finetune", "0.01"], abs=1e-6)
    assert records[1]["student_test_accuracy"] == pytest.approx(
        first["distilled_student", "0.01"], abs=1e-6)
    assert "student_test_accuracy" not in records[2]
    assert all(0 <= r["val_accuracy"] <= 1 for r in records)


def test_pipeline_config_distil_and_export_fractions():
    pre = PretrainConfig(model_dir="unused")
    config = PipelineConfig(output_dir="unused", pretrain=pre, fractions=(0.01, 0.1))
    assert config.teacher_fractions == (0.01, 0.1) and config.fraction_to_export() == 0.1
    config = PipelineConfig(output_dir="unused", pretrain=pre, fractions=(0.01, 0.1),
                            distill_fractions=(0.01,))
    assert config.teacher_fractions == (0.01,) and config.fraction_to_export() == 0.01
    with pytest.raises(ValueError, match="distill_fractions must be among the fractions"):
        PipelineConfig(output_dir="unused", pretrain=pre, fractions=(0.1,),
                       distill_fractions=(0.01,))
    with pytest.raises(ValueError, match="export_fraction must be one of the distilled"):
        PipelineConfig(output_dir="unused", pretrain=pre, fractions=(0.01, 0.1),
                       distill_fractions=(0.1,), export_fraction=0.01)


def test_tune_finetune_trial_parsing():
    from absl import app
    from experiments.tune_finetune import parse_trial
    assert parse_trial("simclr:lr=0.05,epochs=40,from=h") == (
        "simclr", {"lr": 0.05, "epochs": 40, "from": "h"})
    assert parse_trial("supervised:") == ("supervised", {})
    assert parse_trial("simclr:distill=3") == ("simclr", {"distill": 3})
    with pytest.raises(app.UsageError, match="unknown key 'learning_rate'"):
        parse_trial("simclr:learning_rate=0.1")
    with pytest.raises(app.UsageError, match="simclr or supervised"):
        parse_trial("scratch:lr=0.1")
    with pytest.raises(app.UsageError, match="from must be head or h"):
        parse_trial("simclr:from=z")
    with pytest.raises(app.UsageError, match="epochs='x' is not a int"):
        parse_trial("simclr:epochs=x")
