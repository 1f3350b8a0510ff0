"""Rebuild examples/catalog and examples/queries (needs Debian's dataset-fashion-mnist and scikit-image).

Fashion-MNIST (MIT licence) product images go into class folders, so their folder is their label;
a few scikit-image photos sit at the catalog root, unlabeled, with three edited copies for `imgsearch duplicates`.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
PER_CLASS = 30
HERE = Path(__file__).parent


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def main() -> None:
    from skimage import data as photos

    catalog, queries = HERE / "catalog", HERE / "queries"
    for folder in (catalog, queries):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    images = read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
    for class_index, name in enumerate(CLASSES):
        (catalog / name).mkdir()
        for n, index in enumerate(np.flatnonzero(labels == class_index)[:PER_CLASS]):
            Image.fromarray(images[index]).save(catalog / name / f"{name}_{n:03d}.png", optimize=True)
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        Image.fromarray(getattr(photos, name)()).save(catalog / f"{name}.jpg", quality=85)
    edited_copies(catalog, photos)
    test_images = read_idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    test_labels = read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    for name in ("bag", "sneaker"):
        index = int(np.flatnonzero(test_labels == CLASSES.index(name))[0])
        Image.fromarray(test_images[index]).save(queries / f"unseen_{name}.png")
    cat = Image.fromarray(photos.chelsea())
    width, height = cat.size
    edited = ImageOps.mirror(cat.crop((width // 10, height // 10, width - width // 10, height - height // 10)))
    edited.save(queries / "chelsea_cropped_mirrored.jpg", quality=60)


def edited_copies(catalog: Path, photos) -> None:
    """Copies for `imgsearch duplicates` to find: re-encoded and resized, cropped, brightened."""
    cat = Image.fromarray(photos.chelsea())
    cat.resize((cat.width // 2, cat.height // 2), Image.BICUBIC).save(catalog / "chelsea_small.jpg", quality=60)
    coffee = Image.fromarray(photos.coffee())
    width, height = coffee.size
    coffee.crop((width // 20, height // 20, width - width // 20, height - height // 20)).save(catalog / "coffee_cropped.jpg", quality=85)
    ImageEnhance.Brightness(Image.fromarray(photos.rocket())).enhance(1.15).save(catalog / "rocket_brighter.jpg", quality=85)


if __name__ == "__main__":
    main()
