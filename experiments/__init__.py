"""absl-flag entry points, one per job."""

import os

# TensorFlow's C++ INFO lines (oneDNN, CPU-feature notes) say nothing a user acts on;
# warnings and errors still show. Set TF_CPP_MIN_LOG_LEVEL=0 to see them all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
