"""Shared helpers for the test suite: tiny models and reference maths."""

from __future__ import annotations

import numpy as np
import keras

import contrastive_tf as ct


def tiny_encoder(image_size: int = 32, channels: int = 3, base_width: int = 8,
                 depth: int = 18) -> keras.Model:
    return ct.resnet(depth, input_shape=(image_size, image_size, channels),
                     base_width=base_width)


def tiny_simclr(image_size: int = 32, channels: int = 3, num_classes=None,
                temperature: float = 0.2, seed: int = 0,
                **augmenter_kwargs) -> ct.SimCLR:
    probe = keras.layers.Dense(num_classes) if num_classes else None
    return ct.SimCLR(
        tiny_encoder(image_size, channels),
        ct.SimCLRAugmenter(image_size, seed=seed, **augmenter_kwargs),
        ct.ProjectionHead(num_layers=2, output_dim=16),
        temperature=temperature, probe=probe)


def random_images(count: int, size: int = 32, channels: int = 3,
                  seed: int = 0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (count, size, size, channels)).astype(np.uint8)


def numpy_nt_xent(z1: np.ndarray, z2: np.ndarray, temperature: float):
    """The paper's NT-Xent, written out anchor by anchor in float64.

    Returns (loss, accuracy).
    """
    z = np.concatenate([z1, z2], axis=0).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = z1.shape[0]
    total, correct = 0.0, 0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        sims = z @ z[i] / temperature
        others = [k for k in range(2 * n) if k != i]
        log_denominator = np.log(np.sum(np.exp(sims[others])))
        total += -(sims[j] - log_denominator)
        best = others[int(np.argmax(sims[others]))]
        correct += int(best == j)
    return total / (2 * n), correct / (2 * n)


def start_local_cluster(module_args, root: str, workers: int = 2, **popen_kwargs):
    """Starts one `python -m ...` process per MultiWorkerMirroredStrategy
    worker on free ports of 127.0.0.1, each with its TF_CONFIG.

    `module_args` is a list, or a function of the worker index giving one.
    """
    import json
    import os
    import subprocess
    import sys
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(workers)]}
    procs = []
    for index in range(workers):
        args = module_args(index) if callable(module_args) else module_args
        env = dict(os.environ, PYTHONPATH=root, CUDA_VISIBLE_DEVICES="",
                   TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": cluster,
                                         "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen([sys.executable, "-m", *args], cwd=root, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      **popen_kwargs))
    return procs


def free_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that were free a moment ago."""
    import socket
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
