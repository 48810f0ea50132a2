"""The data layer: where images come from and how they reach a model.

Owns dataset specs and their loaders, `Source` (what every loader returns),
conversion to a model's size and channels, class-balanced label subsets and
the tf.data pipelines that feed `model.fit`. It may import the runtime
helpers (`contrastive_tf.runtime`) and the method's colour definition
(`contrastive_tf.method.color`, so a gray image here is the gray of the
augmentation); nothing from runs, serving or jobs.

Specs:
    embedded                 ~10k/2k class-balanced Fashion-MNIST shipped in
                             the package (the default; no network, no install)
    fashion_mnist            the full 60k/10k set, found offline
    tfds:<name>[:<config>]   any TFDS image classification dataset
    folder:<path>            your own images: one subfolder per class, or a
                             flat folder of unlabelled images
Arrays: `from_arrays(images, labels)`.

Modules: `source` (Source, DataError, from_arrays), `builtin` (embedded,
fashion_mnist, tfds), `folders`, `decode` (one image file, with Pillow),
`stream` (a folder as a stream of files: training crops of the whole
image, evaluation images, the decoded cache), `loading` (load a spec),
`convert`, `labels` (label subsets), `pipelines` (tf.data). The names below are the
package's API: `contrastive_tf.data.load(...)` and so on.
"""

from contrastive_tf.data.builtin import (DEBIAN_FASHION_MNIST_DIR, EMBEDDED_PATH,
                                         EMBEDDED_PER_CLASS, EMBEDDED_SEED,
                                         FASHION_MNIST_CLASSES, load_embedded,
                                         load_fashion_mnist, load_tfds, read_fashion_mnist_dir,
                                         read_idx)
from contrastive_tf.data.convert import conform, conversion_note, head, square_resize, to_memory
from contrastive_tf.data.folders import (IMAGE_EXTENSIONS, SPLIT_FOLDERS, infer_channels,
                                         list_folder, load_folder, split_folders)
from contrastive_tf.data.labels import (class_balanced_indices, match_classes, validation_split,
                                        write_indices)
from contrastive_tf.data.loading import load, load_images, load_labelled, load_whole, whole_split
from contrastive_tf.data.pipelines import pipeline, training_stream
from contrastive_tf.data.source import DataError, Source, from_arrays
from contrastive_tf.data.decode import SKIPPED
from contrastive_tf.data.stream import eval_stream, view_stream

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR", "EMBEDDED_PATH", "EMBEDDED_PER_CLASS", "EMBEDDED_SEED",
    "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS",
    "SKIPPED", "SPLIT_FOLDERS", "DataError", "eval_stream", "view_stream", "Source",
    "class_balanced_indices", "conform", "conversion_note",
    "from_arrays", "head", "infer_channels", "list_folder", "load", "load_embedded",
    "load_fashion_mnist", "load_folder", "load_images", "load_labelled", "load_tfds",
    "load_whole", "match_classes", "pipeline",
    "read_fashion_mnist_dir", "read_idx", "split_folders", "square_resize",
    "to_memory", "training_stream", "validation_split", "whole_split", "write_indices",
]
