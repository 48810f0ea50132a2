"""The decoded cache: whole decoded images of a folder on local disk, built
once (in chunks that each land atomically), keyed by the files, reused by
later jobs on the same folder and rebuilt when a file changes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time

import numpy as np
import tensorflow as tf

from contrastive_tf.runtime import progress
from contrastive_tf.runtime.files import write_json

log = progress.logger("data")

CACHE_VERSION = 1
CHUNK = 1024


def _stat(path: str) -> tuple[int, int]:
    if "://" in path:
        stat = tf.io.gfile.stat(path)
        return stat.length, stat.mtime_nsec
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def cache_key(paths, channels: int, short_side: int) -> str:
    """Changes when any file is added, removed, resized or touched, or the
    decoding changes (channels, stored size, cache format)."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} c{channels} s{short_side}".encode())
    for path in paths:
        size, mtime = _stat(path)
        digest.update(f"\n{path}\t{size}\t{mtime}".encode())
    return digest.hexdigest()[:20]


class DiskCache:
    """Whole decoded images of a file list on local disk, for random access.

    Chunks of `CHUNK` images (`chunk_NNNNN.bin`, raw uint8, and
    `chunk_NNNNN.json`, where each image lies and its shape, or why it could
    not be decoded) are each written atomically; `complete.json` marks a
    finished cache. A build that is killed keeps its finished chunks and the
    next one continues from them; a cache whose files changed has another
    key and is rebuilt beside it.
    """

    def __init__(self, root: str, paths, channels: int, short_side: int):
        self.paths, self.channels, self.short_side = tuple(paths), channels, short_side
        self.key = cache_key(self.paths, channels, short_side)
        self.directory = os.path.join(root, f"decoded-{self.key}")
        self._index = None
        self._files: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def complete(self) -> bool:
        return os.path.exists(os.path.join(self.directory, "complete.json"))

    def build(self, decode_one) -> None:
        """Decodes every image not yet in a finished chunk (in parallel,
        through tf.data) and writes the chunks, then the completion mark."""
        os.makedirs(self.directory, exist_ok=True)
        count = len(self.paths)
        chunks = math.ceil(count / CHUNK)
        todo = [c for c in range(chunks) if not os.path.exists(self._chunk(c, ".json"))]
        if not todo:
            return self._finish()
        log.info(f"building the decoded cache {self.directory}: {count} images "
                 f"({chunks - len(todo)} of {chunks} chunks already there)")
        started = time.time()

        def load(index):
            try:
                return decode_one(int(index)), ""
            except Exception as error:  # Pillow raises many types for bad files
                return (np.zeros((0, 0, self.channels), np.uint8),
                        f"{type(error).__name__}: {error}")

        def mapped(index):
            image, problem = tf.numpy_function(load, [index], (tf.uint8, tf.string))
            return image, problem

        for done, chunk in enumerate(todo):
            indices = np.arange(chunk * CHUNK, min(count, (chunk + 1) * CHUNK))
            dataset = tf.data.Dataset.from_tensor_slices(indices).map(
                mapped, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            records, offset = [], 0
            partial = self._chunk(chunk, ".bin") + f".partial-{os.getpid()}"
            with open(partial, "wb") as out:
                for image, problem in dataset.as_numpy_iterator():
                    out.write(image.tobytes())
                    records.append([offset, *image.shape, problem.decode()])
                    offset += image.nbytes
            os.replace(partial, self._chunk(chunk, ".bin"))
            write_json(self._chunk(chunk, ".json"), records)
            if done % 20 == 19 or done == len(todo) - 1:
                log.info(f"decoded cache: {(done + 1) * CHUNK if done < len(todo) - 1 else count}"
                         f" images ({time.time() - started:.0f} s)")
        self._finish()

    def _finish(self):
        size = sum(os.path.getsize(self._chunk(c, ".bin"))
                   for c in range(math.ceil(len(self.paths) / CHUNK)))
        write_json(os.path.join(self.directory, "complete.json"),
                   {"images": len(self.paths), "bytes": size, "channels": self.channels,
                    "short_side": self.short_side})
        log.info(f"decoded cache {self.directory}: {len(self.paths)} images, "
                 f"{size / 2 ** 30:.2f} GB")

    def _chunk(self, chunk: int, suffix: str) -> str:
        return os.path.join(self.directory, f"chunk_{chunk:05d}{suffix}")

    def _load_index(self):
        records = []
        for chunk in range(math.ceil(len(self.paths) / CHUNK)):
            with open(self._chunk(chunk, ".json")) as f:
                records += [(chunk, *r) for r in json.load(f)]
        return records

    def get(self, index: int) -> np.ndarray:
        """Image `index`; raises OSError with the decoding problem for a
        file that could not be decoded."""
        with self._lock:
            if self._index is None:
                self._index = self._load_index()
            chunk, offset, height, width, channels, problem = self._index[index]
            if chunk not in self._files:
                self._files[chunk] = os.open(self._chunk(chunk, ".bin"), os.O_RDONLY)
            fd = self._files[chunk]
        if problem:
            raise OSError(problem)
        raw = os.pread(fd, height * width * channels, offset)
        return np.frombuffer(raw, np.uint8).reshape(height, width, channels)
