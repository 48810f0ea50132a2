"""Installs contrastive_tf.

CPU (default): pip install -e .
GPU:           pip install -e .[gpu]   (TensorFlow with CUDA, Linux x86-64)
The pinned set used by CI is requirements.txt / requirements-dev.txt.
"""

import re

from setuptools import find_packages, setup

# The version is written once, in contrastive_tf/version.py.
with open("contrastive_tf/version.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

CORE = [
    "keras>=3.15,<4",
    "keras-cv==0.9.0",
    "tensorflow-datasets>=4.9.10",
    "importlib_resources",
    "absl-py>=2.1",
    "tensorboard>=2.21",
    "numpy",
    "pillow",
    "matplotlib",
    "psutil",
]

setup(
    name="contrastive_tf",
    version=VERSION,
    description="SimCLR / SimCLRv2 self-supervised learning in Keras 3 on TensorFlow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["contrastive_tf", "contrastive_tf.*"]),
    package_data={"contrastive_tf.data": ["embedded/*.npz", "embedded/LICENSE*"]},
    install_requires=CORE,
    extras_require={
        "cpu": ["tensorflow-cpu==2.21.0"],
        "gpu": ["tensorflow[and-cuda]==2.21.0"],
        "test": ["pytest==9.2.0", "hypothesis==6.170.17"],
    },
)
