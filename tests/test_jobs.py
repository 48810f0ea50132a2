"""The own-data jobs: fine-tune, distil and predict on folders you have."""

import csv
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import contrastive_tf as ct
from contrastive_tf import data
from contrastive_tf.runs import artifacts
from contrastive_tf.runs.artifacts import OutputDirError, claim_output_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended to the README's commands: the same jobs on a tiny budget (a flag
# given twice takes its last value).
TINY = {
    "make_example_folders": ["--unlabelled=300", "--test_per_class=4",
                             "--labels_per_class=4"],
    "pretrain": ["--epochs=1", "--base_width=4", "--batch_size=64", "--projection_dim=8",
                 "--checkpoint_steps=2"],
    "finetune": ["--epochs=2", "--min_steps=2"],
    "distill": ["--epochs=1", "--batch_size=64"],
    "pipeline": ["--epochs=1", "--base_width=4", "--batch_size=64", "--projection_dim=8",
                 "--finetune_epochs=1", "--supervised_epochs=1", "--finetune_min_steps=2",
                 "--distill_epochs=1", "--probe_steps=10"],
}


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")


def _readme_commands(heading):
    """The `python -m experiments.*` commands of the first bash block after
    `heading` in the README, continuation lines joined."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines()
            if line.startswith("python -m experiments.")]


def _folder_accuracy(run, folder) -> float:
    """Accuracy of a run's classifier.keras on a folder of class subfolders,
    computed here: Pillow decodes each file, NumPy scales it to [0, 1] and
    takes the argmax (the files are already at the model's size)."""
    import keras
    classifier = keras.models.load_model(os.path.join(run, "classifier.keras"))
    names = json.load(open(os.path.join(run, "class_names.json")))
    size = classifier.input.shape[1]
    hits = []
    for label, name in enumerate(names):
        for file in sorted(os.listdir(os.path.join(folder, name))):
            image = np.asarray(Image.open(os.path.join(folder, name, file)), np.float32) / 255
            assert image.shape[:2] == (size, size)
            image = image.reshape(1, size, size, -1)
            hits.append(int(np.argmax(classifier.predict(image, verbose=0))) == label)
    return float(np.mean(hits))


def _run(words, work):
    """Runs a README command from the repository root (as the README does:
    its flag files name each other relative to it), with its folders
    (own_images/, runs/, exports/) placed under `work`."""
    module = words[2].split(".")[1]
    words = [re.sub(r"(=|:)(own_images|runs|exports)\b", lambda m: f"{m.group(1)}{work}/"
                    f"{m.group(2)}", w) for w in words]
    command = [sys.executable, *words[1:], *TINY.get(module, [])]
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (module, result.stdout[-2000:], result.stderr[-3000:])
    # Nothing is printed as a traceback, and Keras' dataset warnings are gone
    # (an evaluation pass over a folder ends; no run was "interrupted").
    assert "Traceback" not in result.stderr and "shuffle=True" not in result.stderr
    assert "ran out of data" not in result.stderr
    return result


@pytest.mark.slow
def test_readme_walkthrough_runs_on_generated_folders(tmp_path):
    commands = _readme_commands("## Your own images")
    modules = [c[2] for c in commands]
    assert modules == ["experiments.make_example_folders", "experiments.pretrain",
                       "experiments.finetune", "experiments.distill", "experiments.predict",
                       "experiments.export"]
    outputs = {c[2].split(".")[1]: _run(c, tmp_path).stdout for c in commands}
    # every unlabelled image is used (a flat folder is not cut into splits)
    assert re.findall(r"own_images/unlabelled: (\d+) images", outputs["pretrain"]) == ["300"]
    summary = json.load(open(tmp_path / "runs/own/finetune/summary.json"))
    assert summary["num_labelled"] == 40 and summary["num_val"] == 10
    assert summary["num_train"] == 30 and summary["num_test"] == 40
    # The fine-tuned classifier's test accuracy is what its saved model
    # scores on the test folder, computed here from the files.
    assert summary["test_accuracy"] == pytest.approx(_folder_accuracy(
        tmp_path / "runs/own/finetune", tmp_path / "own_images/test"), abs=1e-6)
    student = json.load(open(tmp_path / "runs/own/student/summary.json"))
    # By default the student starts from the encoder the teacher was fine-tuned from.
    log = outputs["distill"]
    assert re.search(r"from the pretrained encoder \S*runs/own/pretrain \(the encoder the "
                     r"teacher was fine-tuned from\)", log), log[-2000:]
    assert student["num_images"] == 300 and student["num_test"] == 40
    rows = list(csv.DictReader(open(tmp_path / "runs/own/predictions.csv")))
    assert len(rows) == 40
    names = json.load(open(tmp_path / "runs/own/student/class_names.json"))
    assert names == sorted(os.listdir(tmp_path / "own_images/test"))
    assert all(os.path.exists(row["image"]) for row in rows)
    # Each row's label is the class folder its file is in, and the student's
    # reported test accuracy is the share of rows whose prediction is it.
    assert all(row["label"] == os.path.basename(os.path.dirname(row["image"])) for row in rows)
    hits = np.mean([row["class_name"] == row["label"] for row in rows])
    assert student["test_accuracy"] == pytest.approx(hits, abs=1e-6)
    # The exported student answers serving requests (PNG bytes) as predict
    # did: the README's predict computes in this machine's precision (bf16
    # where native), the export in float32, so their probabilities agree to
    # bf16's precision; predict in float32 agrees with the server to 1e-4.
    import tensorflow as tf
    served = tf.saved_model.load(str(tmp_path / "exports/own_classifier/1"))
    png = open(rows[0]["image"], "rb").read()
    answer = served.signatures["serving_default"](images=tf.constant([png, b"not an image"]))
    assert answer["class_name"].numpy()[0].decode() == rows[0]["class_name"]
    served_probability = float(np.max(answer["probabilities"].numpy()[0]))
    assert served_probability == pytest.approx(float(rows[0]["probability"]), abs=1e-2)
    exact = tmp_path / "runs/own/predictions_fp32.csv"
    _run(["python", "-m", "experiments.predict", "--model=runs/own/student",
          "--dataset=folder:own_images/test", f"--output={exact}", "--precision=float32"],
         tmp_path)
    first = next(row for row in csv.DictReader(open(exact)) if row["image"] == rows[0]["image"])
    assert served_probability == pytest.approx(float(first["probability"]), abs=1e-4)
    # An unreadable element of the batch is flagged; the others are answered.
    assert answer["readable"].numpy().tolist() == [True, False]
    assert answer["class_id"].numpy()[1] == -1 and answer["class_name"].numpy()[1] == b""


@pytest.mark.slow
def test_finetuning_from_an_export_matches_the_run_directory(tmp_path):
    folders = tmp_path / "own_images"
    for words in _readme_commands("## Your own images")[:2]:
        _run(words, tmp_path)
    _run(["python", "-m", "experiments.export", "--model_dir=runs/own/pretrain",
          "--export_root=exports", "--model_name=encoder"], tmp_path)
    accuracies = []
    for source in (tmp_path / "runs/own/pretrain", tmp_path / "exports/encoder/1"):
        out = tmp_path / f"runs/ft_{len(accuracies)}"
        _run(["python", "-m", "experiments.finetune", f"--encoder={source}",
              f"--dataset=folder:{folders}/labelled", f"--test_dataset=folder:{folders}/test",
              f"--output_dir={out}"], tmp_path)
        summary = json.load(open(out / "summary.json"))
        accuracies.append((summary["val_accuracy"], summary["test_accuracy"]))
    # The export holds the same weights: the same seed gives the same run.
    assert accuracies[0] == pytest.approx(accuracies[1], abs=0.03)


@pytest.mark.slow
def test_pipeline_on_your_own_sets_reports_the_labelled_count(tmp_path):
    commands = _readme_commands("## Your own images")
    _run(commands[0], tmp_path)
    pipeline = _readme_commands("The whole pipeline takes your sets")[0]
    _run(pipeline, tmp_path)
    report = json.load(open(tmp_path / "runs/own_pipeline/results.json"))
    assert set(report["simclr_finetune"]) == {"40 labels"}
    assert set(report["supervised_baseline"]) == {"40 labels"}
    assert set(report["distilled_student"]) == {"40 labels"}
    table = open(tmp_path / "runs/own_pipeline/results.md").read()
    assert "| method | 40 labels |" in table


def _images(folder, count, size=(12, 12), mode="L", seed=0):
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        array = rng.randint(0, 255, (*size, 3 if mode == "RGB" else 1)).astype(np.uint8)
        Image.fromarray(array.squeeze(), mode).save(os.path.join(folder, f"{i}.png"))


def test_validation_split_is_class_balanced_and_refuses_single_image_classes(tmp_path):
    labels = np.repeat(np.arange(3), [10, 4, 2])
    source = data.from_arrays(np.zeros((16, 4, 4), np.uint8), labels, ["a", "b", "c"])
    train, val, note = data.validation_split(source, 0.1, seed=0)
    assert np.bincount(val.labels).tolist() == [1, 1, 1]
    assert train.num_examples == 13 and "one validation image per class" in note
    lonely = data.from_arrays(np.zeros((5, 4, 4), np.uint8), [0, 0, 0, 1, 0], ["a", "b"])
    with pytest.raises(data.DataError, match=r"'b' \(1\)"):
        data.validation_split(lonely, 0.1)


def test_test_classes_are_matched_by_name_and_unknown_ones_refused():
    test = data.from_arrays(np.zeros((2, 4, 4), np.uint8), [0, 1], ["cat", "dog"])
    matched = data.match_classes(test, ("ant", "cat", "dog"))
    assert matched.labels.tolist() == [1, 2]
    with pytest.raises(data.DataError, match=r"\['dog'\] are not among"):
        data.match_classes(test, ("ant", "cat"))


def test_images_of_another_size_and_channel_count_are_converted():
    # Each 20x30 RGB image: its central 20x20 square one colour, the 5-pixel
    # bands left and right another. Converted as the model's training images
    # were (the central square, gray by ITU-R 601 luma, resized), every pixel
    # is the luma of the square's colour; a top-left crop or a squash of the
    # whole image mixes in the bands, and for these colours the plain mean of
    # R, G and B is far from the luma.
    centre = np.array([[255, 0, 0], [0, 0, 255], [40, 200, 90]], np.uint8)
    bands = np.array([[0, 255, 255], [255, 255, 0], [250, 10, 250]], np.uint8)
    images = np.empty((3, 20, 30, 3), np.uint8)
    images[:] = bands[:, None, None]
    images[:, :, 5:25] = centre[:, None, None]
    rgb = data.from_arrays(images, [0, 1, 0])
    gray, note = data.conform(rgb, 8, 1)
    assert gray.images.shape == (3, 8, 8, 1) and "20x30x3 to 8x8x1" in note
    luma = np.round(centre.astype(np.float64) @ [0.299, 0.587, 0.114])  # 76, 29, 140
    np.testing.assert_array_equal(gray.images[..., 0], np.broadcast_to(
        luma[:, None, None], (3, 8, 8)))
    # Size alone: the square's colour, exactly.
    small, note = data.conform(rgb, 8, 3)
    assert "20x30x3 to 8x8x3" in note
    np.testing.assert_array_equal(small.images, np.broadcast_to(
        centre[:, None, None], (3, 8, 8, 3)))
    same, note = data.conform(gray, 8, 1)
    assert note is None and same is gray
    back, _ = data.conform(gray, 8, 3)
    np.testing.assert_array_equal(back.images, np.repeat(gray.images, 3, axis=-1))
    # `channels` is the model's count, never 0 ("infer"), which would have
    # tripled the channels.
    with pytest.raises(ValueError, match="channels=0"):
        data.conform(rgb, 8, 0)


def test_folder_layouts_channels_and_whole_splits(tmp_path):
    _images(tmp_path / "split" / "train" / "a", 3)
    _images(tmp_path / "split" / "train" / "b", 3)
    _images(tmp_path / "split" / "test" / "a", 2, mode="RGB")
    spec = f"folder:{tmp_path / 'split'}"
    assert data.whole_split(spec, "train") == "train"
    train = data.load_whole(spec, "train", image_size=8)
    test = data.load_whole(spec, "test", image_size=8)
    assert train.num_examples == 6 and train.images.shape[-1] == 1  # inferred: gray
    assert test.num_examples == 2 and test.images.shape[-1] == 3 and test.class_names == ("a",)
    _images(tmp_path / "flat", 5)
    flat = f"folder:{tmp_path / 'flat'}"
    assert data.whole_split(flat, "train") == "all"
    assert data.load_whole(flat, image_size=8).num_examples == 5  # nothing held back
    assert len(data.load_whole(flat, image_size=8).paths) == 5


def test_model_sources_and_output_folders_are_checked(tmp_path):
    with pytest.raises(artifacts.ModelSourceError, match="neither a pretraining run"):
        artifacts.load_pretrained(str(tmp_path))
    with pytest.raises(artifacts.ModelSourceError, match="fine-tuning"):
        artifacts.load_classifier(str(tmp_path))
    claim_output_dir(str(tmp_path / "a"), "finetune", {})
    claim_output_dir(str(tmp_path / "a"), "finetune", {})  # the same job again: fine
    with pytest.raises(OutputDirError, match="holds the results of a finetune job"):
        claim_output_dir(str(tmp_path / "a"), "distill", {})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "simclr.keras").write_text("")
    with pytest.raises(OutputDirError, match="not empty"):
        claim_output_dir(str(tmp_path / "b"), "finetune", {})
    assert (tmp_path / "b" / "simclr.keras").exists()


@pytest.mark.slow
def test_predict_lists_unreadable_files_and_bad_sources_stop_with_one_line(tmp_path):
    import keras
    from tests.testing import tiny_encoder
    keras.utils.set_random_seed(0)
    classifier = ct.build_classifier(tiny_encoder(16, 1), 2)
    artifacts.save_classifier(classifier, ["a", "b"], str(tmp_path / "model"))
    _images(tmp_path / "new", 3, size=(20, 10), mode="RGB")
    (tmp_path / "new" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.predict", f"--model={tmp_path / 'model'}",
         f"--dataset=folder:{tmp_path / 'new'}", f"--output={tmp_path / 'out.csv'}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert len(rows) == 4
    broken = [row for row in rows if row["image"].endswith("broken.png")]
    assert broken and broken[0]["error"] and not broken[0]["class_name"]
    assert "converted 3 images as the model was trained (sizes 10x20 -> 16x16 (central " \
           "square); RGB -> grayscale)" in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.distill", f"--teacher={tmp_path / 'new'}",
         f"--dataset=folder:{tmp_path / 'new'}", f"--output_dir={tmp_path / 'x'}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")


def test_distill_config_refuses_a_width_without_a_depth():
    from contrastive_tf.jobs.config import DistillConfig
    given = dict(teacher="t", dataset="folder:x", output_dir="o")
    with pytest.raises(ValueError, match="student_base_width sizes a student of student_depth"):
        DistillConfig(**given, student_base_width=16)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        DistillConfig(**given, weight_decay=-1.0)
    assert DistillConfig(**given, student_depth=18, student_base_width=16).weight_decay == 1e-4


def test_predict_streams_rows_in_file_order_with_embeddings(tmp_path, monkeypatch):
    # Chunks of 4 images: rows and embeddings are written as they come, in
    # file order, and match the encoder applied here to the in-memory
    # loader's images (central square, then the evaluation preprocessing).
    import keras
    from contrastive_tf.jobs import predict
    from contrastive_tf.jobs.config import PredictConfig
    from tests.testing import tiny_simclr

    monkeypatch.setattr(predict, "CHUNK", 4)
    _images(tmp_path / "new", 11, size=(14, 18), mode="RGB")
    (tmp_path / "new" / "5b.png").write_bytes(b"not a png")
    keras.utils.set_random_seed(0)
    model = tiny_simclr(image_size=12, channels=3)
    os.makedirs(tmp_path / "run")
    artifacts.save_pretrained(model, str(tmp_path / "run"))
    summary = predict.run_predict(PredictConfig(
        model=str(tmp_path / "run"), dataset=f"folder:{tmp_path / 'new'}",
        output=str(tmp_path / "out.csv"), embeddings=str(tmp_path / "h.npy"),
        precision="float32"), verbose=0)
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    files = sorted(os.listdir(tmp_path / "new"))
    assert [os.path.basename(r["image"]) for r in rows[:-1]] == [f for f in files if f != "5b.png"]
    assert rows[-1]["image"].endswith("5b.png") and rows[-1]["error"]
    assert summary["images"] == 11 and summary["unreadable"] == 1
    features = np.load(tmp_path / "h.npy")
    held = data.load_folder(str(tmp_path / "new"), 12)
    reloaded = artifacts.load_pretrained(str(tmp_path / "run")).encoder
    expected = reloaded(ct.finetune_augmenter(12)(held.images, training=False)).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_the_student_starts_from_the_teachers_encoder_by_default(tmp_path):
    from contrastive_tf.jobs.config import DistillConfig
    from contrastive_tf.runs import artifacts
    encoder = tmp_path / "pretrain"
    encoder.mkdir()
    (encoder / artifacts.SIMCLR_MODEL).write_bytes(b"")  # recognised by its file
    teacher = tmp_path / "finetune"
    artifacts.claim_output_dir(str(teacher), "finetune", {"encoder": str(encoder)})
    assert artifacts.teacher_encoder(str(teacher)) == str(encoder)
    # Relative to the run (as the import job writes it) or to where the job ran.
    artifacts.claim_output_dir(str(tmp_path / "imported"), "import", {})
    (tmp_path / "imported" / "classifier").mkdir()
    artifacts.write_summary(str(tmp_path / "imported" / "classifier"), {})
    from contrastive_tf.runtime.files import write_json
    write_json(str(tmp_path / "imported" / "classifier" / artifacts.JOB_MARKER),
               {"job": "import", "settings": {"encoder": "../../pretrain"}})
    assert artifacts.teacher_encoder(str(tmp_path / "imported" / "classifier")) == str(encoder)
    # A run that names nothing, or an encoder that is gone: None (a fresh student).
    assert artifacts.teacher_encoder(str(tmp_path / "pretrain")) is None
    (encoder / artifacts.SIMCLR_MODEL).unlink()
    assert artifacts.teacher_encoder(str(teacher)) is None
    given = dict(teacher="t", dataset="folder:x", output_dir="o")
    assert DistillConfig(**given).student_encoder == "auto"
    assert DistillConfig(**given, student_depth=18).student_depth == 18
    with pytest.raises(ValueError, match="give student_encoder or student_depth, not both"):
        DistillConfig(**given, student_encoder="runs/pre", student_depth=18)
