"""Exports a tiny encoder over and over, for the kill -9 export test.

Run as `python -m tests.export_worker EXPORT_ROOT [COUNT]`: alternately writes
the next version and overwrites version 1, printing a line after each, until
killed (or COUNT exports).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import contrastive_tf as ct  # noqa: E402
from contrastive_tf.serving import export  # noqa: E402


def main(root, count):
    keras.utils.set_random_seed(0)
    encoder = ct.resnet(18, input_shape=(28, 28, 1), base_width=4)
    print("ready", flush=True)
    done = 0
    while count <= 0 or done < count:
        if done % 2 and export.versions(os.path.join(root, "enc")):
            path = export.export_encoder(encoder, root, "enc", version=1, overwrite=True,
                                         card={"export_number": done})
        else:
            path = export.export_encoder(encoder, root, "enc", card={"export_number": done})
        done += 1
        print("exported", path, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
