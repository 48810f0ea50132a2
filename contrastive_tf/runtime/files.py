"""Writing outputs atomically: a file is either the old one or the whole new
one, never half written (a crash, a kill or a full disk mid-write leaves the
previous version in place)."""

from __future__ import annotations

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside `path` to write to; when the block
    ends without error the file is renamed onto `path` in one step
    (`os.replace`), otherwise the temporary file is removed.

    The temporary name keeps `path`'s extension, since some writers choose
    their format by it (Keras' `.keras`, NumPy's `.npy`, Matplotlib's
    `.png`).

    Example:
    >>> with atomic_path("model.keras") as tmp:
    ...     model.save(tmp)
    """
    root, extension = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{extension}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    """`open(path, mode)` through `atomic_path`, flushed to disk before the
    rename."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, payload, **dump_kwargs) -> None:
    """Writes `payload` as JSON, atomically (indented, sorted keys unless
    `dump_kwargs` say otherwise)."""
    options = {"indent": 2, "sort_keys": True, **dump_kwargs}
    with atomic_open(path) as f:
        json.dump(payload, f, **options)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
