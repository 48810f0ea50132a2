"""Atomic writes leave the old file or the whole new one, never a part."""

import json
import os

import pytest

from contrastive_tf.runtime import files


def test_atomic_path_replaces_on_success_and_keeps_the_extension(tmp_path):
    path = str(tmp_path / "model.keras")
    with files.atomic_path(path) as tmp:
        assert tmp.endswith(".keras") and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "w") as f:
            f.write("new")
        assert not os.path.exists(path)  # nothing at the target until the end
    assert open(path).read() == "new"
    assert os.listdir(tmp_path) == ["model.keras"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "results.json")
    files.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        with files.atomic_open(path) as f:
            f.write('{"a": 2, "trunc')
            raise RuntimeError("disk full")
    assert json.load(open(path)) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_write_json_round_trip_and_options(tmp_path):
    path = str(tmp_path / "x.json")
    files.write_json(path, {"b": [1, 2], "a": None})
    assert files.read_json(path) == {"a": None, "b": [1, 2]}
    assert open(path).read().startswith('{\n  "a"')  # indented, keys sorted
    files.write_json(path, {"i": [1, 2]}, indent=None)
    assert open(path).read() == '{"i": [1, 2]}'
