import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import keras
from PIL import Image

import contrastive_tf as ct
from contrastive_tf.serving import export, signatures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def encoder_export(tmp_path_factory):
    keras.utils.set_random_seed(0)
    encoder = ct.resnet(18, input_shape=(28, 28, 1), base_width=4)
    head = ct.ProjectionHead(2, 8)
    head.build(encoder.output.shape)
    root = str(tmp_path_factory.mktemp("exports"))
    path = export.export_encoder(encoder, root, "enc", projection_head=head,
                                 card={"training_data": "embedded"},
                                 max_image_pixels=64 * 64)
    return encoder, head, root, path


def _images(count=3, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (count, 28, 28), np.uint8)


def test_layout_versions_and_model_card(encoder_export):
    encoder, head, root, path = encoder_export
    assert path == os.path.join(root, "enc", "1")
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    card = json.load(open(os.path.join(path, "model_card.json")))
    assert card["kind"] == "encoder" and card["version"] == 1
    assert card["input"]["image_size"] == 28 and card["input"]["channels"] == 1
    assert card["input"]["max_image_pixels"] == 64 * 64
    assert card["training_data"] == "embedded"
    assert card["libraries"]["tensorflow"] == tf.__version__
    second = export.export_encoder(encoder, root, "enc")
    assert second.endswith(os.path.join("enc", "2"))
    with pytest.raises(export.ExportError, match="exists"):
        export.export_encoder(encoder, root, "enc", version=1)
    assert export.versions(os.path.join(root, "enc")) == [1, 2]
    assert [n for n in os.listdir(os.path.join(root, "enc")) if not n.isdigit()] == []


def test_saved_model_cli_show_lists_serving_signature(encoder_export):
    path = encoder_export[3]
    shown = subprocess.run([CLI, "show", "--all", "--dir", path],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    section = shown.stdout.split("signature_def['serving_default']")[1]
    section = section.split("signature_def[")[0]
    assert "inputs['images']" in section and "DT_STRING" in section
    assert "outputs['embedding']" in section and "outputs['projection']" in section
    assert "Method name is: tensorflow/serving/predict" in section
    assert "signature_def['predict_images']" in shown.stdout
    assert "signature_def['features']" in shown.stdout


def test_saved_model_cli_run_matches_in_memory_model(encoder_export, tmp_path):
    encoder, head, _, path = encoder_export
    images = np.random.RandomState(1).rand(2, 28, 28, 1).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    run = subprocess.run(
        [CLI, "run", "--dir", path, "--tag_set", "serve",
         "--signature_def", "predict_images", "--inputs", f"images={tmp_path / 'x.npy'}",
         "--outdir", str(tmp_path / "out")], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    embedding = np.load(tmp_path / "out" / "embedding.npy")
    np.testing.assert_allclose(embedding, encoder(images, training=False), atol=1e-5)
    projection = np.load(tmp_path / "out" / "projection.npy")
    np.testing.assert_allclose(projection, head(encoder(images), training=False), atol=1e-5)


def test_fresh_process_reproduces_bytes_and_float_endpoints(encoder_export, tmp_path):
    encoder, _, _, path = encoder_export
    images = _images()
    encoded = [_png(image) for image in images]
    for i, data in enumerate(encoded):
        (tmp_path / f"{i}.png").write_bytes(data)
    script = f"""
import numpy as np, tensorflow as tf
from PIL import Image
model = tf.saved_model.load({path!r})
files = [open({str(tmp_path)!r} + f"/{{i}}.png", "rb").read() for i in range(3)]
a = model.signatures["serving_default"](images=tf.constant(files))["embedding"].numpy()
x = np.stack([np.asarray(Image.open({str(tmp_path)!r} + f"/{{i}}.png")) for i in range(3)])
b = model.signatures["predict_images"](images=tf.constant(x[..., None] / 255.0, tf.float32))["embedding"].numpy()
np.save({str(tmp_path / 'a.npy')!r}, a); np.save({str(tmp_path / 'b.npy')!r}, b)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=180, env=dict(os.environ, PYTHONPATH=""))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = encoder(images[..., None].astype(np.float32) / 255.0, training=False)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), expected, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), expected, atol=1e-5)


def test_bad_serving_input_errors_and_model_keeps_answering(encoder_export):
    model = tf.saved_model.load(encoder_export[3])
    serve = model.signatures["serving_default"]
    # Unreadable elements are flagged, and the rest of the batch is answered.
    good_png = _png(_images(1)[0])
    garbage = [b"not an image at all", b"", os.urandom(300), b"\x89PNG\r\n\x1a\njunk"]
    answer = serve(images=tf.constant([good_png, *garbage]))
    assert answer["readable"].numpy().tolist() == [True] + [False] * len(garbage)
    alone = serve(images=tf.constant([good_png]))["embedding"].numpy()
    np.testing.assert_allclose(answer["embedding"].numpy()[0], alone[0], atol=1e-5)
    assert not np.any(answer["embedding"].numpy()[1:])
    rejected = (TypeError, ValueError, tf.errors.InvalidArgumentError)
    with pytest.raises(rejected, match="4-dimensional|rank|shape"):
        model.signatures["predict_images"](images=tf.zeros((2, 28, 28), tf.float32))
    with pytest.raises(rejected, match="string|dtype|DT_FLOAT"):
        serve(images=tf.zeros((2,), tf.float32))
    # Too many pixels (limit 64 x 64 here): refused from the header, also
    # when the header lies about a 60000 x 60000 image it does not hold.
    big = np.zeros((100, 41), np.uint8)
    forged = bytearray(_png(big))
    forged[16:24] = (60000).to_bytes(4, "big") * 2  # IHDR width, height
    for too_big in (_png(big), bytes(forged)):
        with pytest.raises(tf.errors.InvalidArgumentError, match="image too large"):
            serve(images=tf.constant([_png(_images(1)[0]), too_big]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="image too large"):
        model.signatures["predict_images"](images=tf.zeros((1, 65, 64, 1), tf.float32))
    good = serve(images=tf.constant([_png(_images(1)[0])]))["embedding"]
    assert good.shape == (1, 32) and np.all(np.isfinite(good))
    edge = serve(images=tf.constant([_png(np.zeros((64, 64), np.uint8))]))["embedding"]
    assert edge.shape == (1, 32)


@pytest.mark.parametrize("fmt, mode, options", [
    ("PNG", "RGB", {}), ("PNG", "I;16", {}), ("JPEG", "RGB", {}),
    ("JPEG", "L", {"progressive": True}), ("GIF", "P", {}), ("BMP", "RGB", {}),
    ("WEBP", "RGB", {}), ("WEBP", "RGB", {"lossless": True}), ("WEBP", "RGBA", {}),
])
def test_image_size_from_header_matches_pil(fmt, mode, options):
    for width, height in [(1, 1), (300, 7), (7, 300), (257, 1030)]:
        buffer = io.BytesIO()
        Image.new(mode, (width, height)).save(buffer, fmt, **options)
        got = signatures.encoded_image_size(tf.constant(buffer.getvalue()))
        with Image.open(io.BytesIO(buffer.getvalue())) as reread:
            assert reread.size == (width, height)
        assert (int(got[0]), int(got[1])) == (height, width), (fmt, mode, options)
    # Not an image: (0, 0), and tf.io.decode_image refuses it later.
    assert [int(v) for v in signatures.encoded_image_size(tf.constant(b"hello"))] == [0, 0]


def test_finetuning_an_export_trains_its_variables(encoder_export):
    path = encoder_export[3]
    features = export.load_for_finetuning(path, output="finetune_features")
    assert len(features.trainable_weights) > 10
    inputs = keras.Input((28, 28, 1))
    classifier = keras.Model(inputs, keras.layers.Dense(3)(features(inputs)))
    classifier.compile(optimizer=keras.optimizers.Adam(3e-3),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.RandomState(2).rand(32, 28, 28, 1).astype(np.float32)
    y = np.arange(32) % 3
    before = [w.numpy().copy() for w in features.trainable_weights]
    first = classifier.evaluate(x, y, verbose=0)
    classifier.fit(x, y, epochs=15, batch_size=32, verbose=0)
    after = [w.numpy() for w in features.trainable_weights]
    assert sum(not np.allclose(a, b) for a, b in zip(before, after)) > len(before) // 2
    assert classifier.evaluate(x, y, verbose=0) < first


def test_classifier_export_returns_probabilities_and_names(tmp_path):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    logits = keras.layers.Dense(3)(x)
    classifier = keras.Model(inputs, logits)
    path = export.export_classifier(classifier, str(tmp_path), "clf",
                                    class_names=["cat", "dog", "owl"])
    model = tf.saved_model.load(path)
    image = np.random.RandomState(0).randint(0, 256, (20, 24, 3), np.uint8)
    out = model.signatures["serving_default"](images=tf.constant([_png(image)]))
    probabilities = out["probabilities"].numpy()
    expected = tf.nn.softmax(classifier(tf.image.resize(image[None] / 255.0, (16, 16))))
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert out["class_name"].numpy()[0].decode() == ["cat", "dog", "owl"][
        int(out["class_id"].numpy()[0])]
    with pytest.raises(export.ExportError, match="class names"):
        export.export_classifier(classifier, str(tmp_path), "clf", class_names=["a"])


def test_interrupted_export_leaves_no_version_behind(encoder_export, tmp_path, monkeypatch):
    encoder, _, _, _ = encoder_export
    root = str(tmp_path)
    first = export.export_encoder(encoder, root, "enc")
    real_archive = signatures.Servable.archive

    def crashing_archive(self):
        archive = real_archive(self)
        real_write = archive.write_out

        def write_then_crash(directory, **kwargs):
            real_write(directory, **kwargs)  # half-way: SavedModel written, card not
            raise KeyboardInterrupt("killed mid-export")

        archive.write_out = write_then_crash
        return archive

    monkeypatch.setattr(signatures.Servable, "archive", crashing_archive)
    with pytest.raises(KeyboardInterrupt):
        export.export_encoder(encoder, root, "enc")
    assert sorted(os.listdir(os.path.join(root, "enc"))) == ["1"]
    assert os.path.exists(os.path.join(first, "model_card.json"))


def _version_contents(base):
    """{version: {relative path: bytes}} of every integer-named folder."""
    contents = {}
    for version in export.versions(base):
        folder = os.path.join(base, str(version))
        files = {}
        for directory, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(directory, name)
                files[os.path.relpath(path, folder)] = open(path, "rb").read()
        contents[version] = files
    return contents


@pytest.mark.slow
def test_export_killed_at_random_points_leaves_only_complete_versions(tmp_path):
    root = str(tmp_path / "exports")
    base = os.path.join(root, "enc")
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    worker = [sys.executable, "-m", "tests.export_worker", root]
    first = subprocess.Popen([*worker, "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    assert first.stdout.readline().strip() == "ready"
    started = time.time()
    assert first.stdout.readline().startswith("exported")
    export_seconds = time.time() - started
    assert first.wait() == 0
    complete = set(_version_contents(base)[1])  # the files of a whole export
    assert {"saved_model.pb", "model_card.json", "variables/variables.index"} <= complete
    rng = np.random.RandomState(8)
    before = _version_contents(base)
    killed_mid_write = 0
    for round_ in range(6):
        proc = subprocess.Popen(worker, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip() == "ready"
        if round_ % 2:  # at any moment of the first or second export
            time.sleep(rng.uniform(0.0, 2 * export_seconds))
        else:  # while files are being written: most of an export is tracing
            deadline = time.time() + 10 * export_seconds
            while time.time() < deadline and not any(
                    n.startswith(".tmp-") for n in os.listdir(base)):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        killed_mid_write += any(n.startswith(".tmp-") for n in os.listdir(base))
        after = _version_contents(base)
        for version, files in after.items():
            assert set(files) == complete, (round_, version, sorted(files))
            card = json.loads(files["model_card.json"])
            assert card["version"] == version
        # Versions other than 1 (the one being overwritten) never change;
        # version 1 is always whole, the old or the new one.
        assert set(before) <= set(after)
        for version in before:
            if version != 1:
                assert after[version] == before[version], (round_, version)
        before = after
    assert killed_mid_write >= 1, "no kill landed while a version was being written"
    # Every version loads and serves; the next export removes the killed
    # exports' staging folders (nothing but integer folders is left).
    for version in export.versions(base):
        served = tf.saved_model.load(os.path.join(base, str(version)))
        out = served.signatures["serving_default"](images=tf.constant([_png(_images(1)[0])]))
        assert out["embedding"].shape == (1, 32)
    subprocess.run([*worker, "1"], cwd=ROOT, env=env, check=True, capture_output=True)
    assert all(name.isdigit() for name in os.listdir(base)), os.listdir(base)


def test_abandoned_overwrite_is_put_back(tmp_path):
    base = tmp_path / "enc"
    os.makedirs(base / ".old-3-999999999-abcd1234")  # moved aside by a dead process
    (base / ".old-3-999999999-abcd1234" / "saved_model.pb").write_bytes(b"x")
    os.makedirs(base / ".tmp-4-999999999-abcd1234")  # a dead process' staging
    live = f".tmp-5-{os.getpid()}-abcd1234"  # a live process' staging
    os.makedirs(base / live)
    export._remove_abandoned(str(base))
    assert sorted(os.listdir(base)) == [live, "3"]
    assert (base / "3" / "saved_model.pb").read_bytes() == b"x"


def _client():
    spec = importlib.util.spec_from_file_location("client", os.path.join(ROOT, "export", "client.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_client_rest_body_is_tf_serving_predict_format():
    client = _client()
    body = client.rest_request_body([b"\x89PNG-bytes", b"jpeg"])
    assert body == {"signature_name": "serving_default",
                    "instances": [{"b64": base64.b64encode(b"\x89PNG-bytes").decode()},
                                  {"b64": base64.b64encode(b"jpeg").decode()}]}
    json.dumps(body)  # plain JSON


def test_client_grpc_request():
    pytest.importorskip("tensorflow_serving", reason="tensorflow-serving-api not installed")
    request = _client().grpc_request("enc", [b"abc", b"de"], version=3)
    assert request.model_spec.name == "enc" and request.model_spec.version.value == 3
    assert request.model_spec.signature_name == "serving_default"
    assert tf.make_ndarray(request.inputs["images"]).tolist() == [b"abc", b"de"]


@pytest.mark.slow
def test_export_job_from_a_pretraining_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    run_dir = str(tmp_path / "run")
    pretrain = subprocess.run(
        [sys.executable, "-m", "experiments.pretrain", "--image_size=16", "--base_width=4",
         "--projection_layers=2", "--projection_dim=8", "--batch_size=32",
         "--train_steps=2", "--knn_bank_size=100", f"--model_dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert pretrain.returncode == 0, pretrain.stderr[-2000:]
    exported = subprocess.run(
        [sys.executable, "-m", "experiments.export", f"--model_dir={run_dir}",
         f"--export_root={tmp_path / 'exports'}", "--model_name=enc"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]
    path = tmp_path / "exports" / "enc" / "1"
    card = json.load(open(path / "model_card.json"))
    assert card["training_config"]["dataset"] == "embedded"
    assert "loss" in card["metrics"]
