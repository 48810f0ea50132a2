from contrastive_tf.runtime import compat


def test_private_api_this_package_uses_still_exists(tmp_path):
    # An upgrade of Keras or TensorFlow that removes one fails here, naming it.
    assert compat.missing(str(tmp_path)) == []


def test_missing_names_what_is_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(compat, "PRIVATE_API", compat.PRIVATE_API + (
        ("keras.Model", "_no_such_attribute", "nothing"),))
    assert compat.missing(str(tmp_path)) == ["keras.Model._no_such_attribute (used by nothing)"]
