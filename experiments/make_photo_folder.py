"""Writes a large flat folder of photo-like JPEGs of mixed sizes, for the
large-folder figures (BENCHMARKS.md): what a user's own photos or scans
look like to the input pipeline, at any count.

    python -m experiments.make_photo_folder --output=/data/photos --count=20000

Each image is a smooth random colour field with a few soft-edged shapes
(so it compresses and decodes like a photo, not like noise or a flat
card), about --side pixels on its longer side (within a fifth of it), in landscape,
portrait or square aspect (4:3, 3:4, 3:2, 1:1), saved as JPEG at quality 90.
The same --seed writes the same files; files are named photo_<n>.jpg and
written atomically, so a folder interrupted midway can be completed by
running the command again (existing files are kept).
"""

import os

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageFilter

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Folder to write (created; existing photos are kept).")
flags.DEFINE_integer("count", 2000, "Number of photos.")
flags.DEFINE_integer("side", 500, "Typical longer side in pixels (each photo varies by up to a fifth).")
flags.DEFINE_integer("seed", 0, "Random seed: the same seed writes the same photos.")

ASPECTS = ((4, 3), (3, 4), (3, 2), (1, 1))


def photo(index: int, side: int, seed: int) -> Image.Image:
    """Photo `index` of the folder: the same for the same (index, side, seed)."""
    rng = np.random.RandomState([seed, index])
    across, down = ASPECTS[rng.randint(len(ASPECTS))]
    longer = int(side * rng.uniform(0.8, 1.2))
    width = longer if across >= down else longer * across // down
    height = longer * down // across if across >= down else longer
    coarse = (rng.rand(6, 8, 3) * 255).astype(np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 6)):
        x, y = rng.randint(0, width), rng.randint(0, height)
        r = rng.randint(side // 20, side // 4)
        colour = tuple(int(c) for c in rng.randint(0, 256, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(radius=1.5))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.output:
        raise app.UsageError("--output is required")
    if FLAGS.count < 1 or FLAGS.side < 32:
        raise app.UsageError("--count must be >= 1 and --side >= 32")
    os.makedirs(FLAGS.output, exist_ok=True)
    written = 0
    for index in range(FLAGS.count):
        path = os.path.join(FLAGS.output, f"photo_{index:07d}.jpg")
        if os.path.exists(path):
            continue
        temporary = f"{path}.tmp-{os.getpid()}"
        photo(index, FLAGS.side, FLAGS.seed).save(temporary, "JPEG", quality=90)
        os.replace(temporary, path)
        written += 1
        if written % 1000 == 0:
            print(f"[make_photo_folder] {written} written", flush=True)
    print(f"[make_photo_folder] {FLAGS.output}: {FLAGS.count} photos ({written} written now, "
          f"{FLAGS.count - written} were there)", flush=True)


if __name__ == "__main__":
    app.run(main)
