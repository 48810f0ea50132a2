"""Models saved by an earlier release load with this one and compute the same.

tests/fixtures/*_v0.1.0.keras were written by release 0.1.0 (the flat
module layout, commit 9b426f6) with fixtures/make_fixtures_v0.1.0.py; its
outputs on four probe images were recorded beside them. Keras finds the
package's classes by their registered names ("contrastive_tf>SimCLR"), not
by module path, so moving modules must not break a user's saved models.
"""

import os

import keras
import numpy as np

import contrastive_tf as ct

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def test_a_simclr_model_saved_by_0_1_0_loads_and_computes_the_same():
    recorded = np.load(os.path.join(FIXTURES, "outputs_v0.1.0.npz"))
    model = keras.models.load_model(os.path.join(FIXTURES, "simclr_v0.1.0.keras"))
    assert isinstance(model, ct.SimCLR)
    assert isinstance(model.augmenter, ct.SimCLRAugmenter)
    assert isinstance(model.projection_head, ct.ProjectionHead)
    assert isinstance(model.optimizer, ct.LARS)
    h = np.asarray(model.encoder(recorded["images"], training=False))
    np.testing.assert_allclose(h, recorded["h"], rtol=1e-5, atol=1e-6)
    # It trains on as before: one more step moves the weights.
    before = [w.numpy().copy() for w in model.encoder.trainable_weights]
    images = (recorded["images"] * 255).astype("uint8")
    model.fit(np.concatenate([images, images]), batch_size=4, epochs=1, verbose=0)
    assert any(not np.array_equal(b, w.numpy())
               for b, w in zip(before, model.encoder.trainable_weights))


def test_a_classifier_saved_by_0_1_0_loads_through_the_run_artifacts(tmp_path):
    recorded = np.load(os.path.join(FIXTURES, "outputs_v0.1.0.npz"))
    folder = tmp_path / "finetune_run"
    folder.mkdir()
    with open(os.path.join(FIXTURES, "classifier_v0.1.0.keras"), "rb") as f:
        (folder / ct.artifacts.CLASSIFIER_MODEL).write_bytes(f.read())
    classifier, names = ct.artifacts.load_classifier(str(folder))
    assert names == ("0", "1", "2")  # no class_names.json: numbered
    logits = np.asarray(classifier(recorded["images"], training=False))
    np.testing.assert_allclose(logits, recorded["logits"], rtol=1e-5, atol=1e-6)
