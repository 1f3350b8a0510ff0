"""Labeled image sets for `imgsearch eval` and `train-head`: a folder of class sub-folders, or Fashion-MNIST
read from the IDX files of Debian's `dataset-fashion-mnist` (nothing is downloaded)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imgsearch.config import DEFAULT_MAX_PIXELS
from imgsearch.errors import CatalogError
from imgsearch.images import find_images, load_image
from imgsearch.storage import image_source

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
FASHION_MNIST_PREFIX = "fashion-mnist"


class ArrayImage:
    """A grayscale array that becomes an RGB image when called (picklable, for DataLoader workers)."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels

    def __call__(self) -> Image.Image:
        return Image.fromarray(self.pixels, "L").convert("RGB")


class FileImage:
    """An image file, or an object in a bucket, decoded when called."""

    def __init__(self, path: Path | str, min_side: int = 224, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.path = path
        self.min_side = min_side
        self.max_pixels = max_pixels

    def __call__(self) -> Image.Image:
        return load_image(image_source(self.path), max_pixels=self.max_pixels, min_side=self.min_side, name=str(self.path))


@dataclass
class LabeledSet:
    classes: list[str]
    sources: list  # callables returning a PIL image
    targets: np.ndarray  # index into classes
    names: list[str]  # file path, or "fashion-mnist:test:123"

    def subset(self, indices: np.ndarray) -> LabeledSet:
        return LabeledSet(self.classes, [self.sources[i] for i in indices], self.targets[indices], [self.names[i] for i in indices])


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): a big-endian header, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise CatalogError(f"cannot read {path}: {error}") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise CatalogError(f"{path} is not an unsigned-byte IDX file")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(split: str, folder: Path | None = None) -> LabeledSet:
    folder = Path(folder) if folder else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [folder / f"{prefix}-{kind}.gz", folder / f"{prefix}-{kind}"]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise CatalogError(
                f"Fashion-MNIST {split} files not found in {folder} (expected {candidates[0].name}); "
                "`apt-get install dataset-fashion-mnist`, or pass fashion-mnist:/path/to/idx/folder"
            )
        files.append(found)
    images, labels = read_idx(files[0]), read_idx(files[1])
    if len(images) != len(labels):
        raise CatalogError(f"{files[0]} has {len(images)} images but {files[1]} has {len(labels)} labels")
    return LabeledSet(
        classes=list(FASHION_MNIST_CLASSES),
        sources=[ArrayImage(pixels) for pixels in images],
        targets=labels.astype(np.int64),
        names=[f"{FASHION_MNIST_PREFIX}:{split}:{index}" for index in range(len(labels))],
    )


def class_folders(root: Path, min_side: int = 224, max_pixels: int = DEFAULT_MAX_PIXELS) -> LabeledSet:
    """Every image under each immediate sub-folder of `root`, labeled by that sub-folder."""
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(f"dataset folder not found: {root}")
    classes = sorted(child.name for child in root.iterdir() if child.is_dir())
    sources, targets, names = [], [], []
    for index, name in enumerate(classes):
        for path in find_images([root / name]):
            sources.append(FileImage(path, min_side, max_pixels))
            targets.append(index)
            names.append(str(path))
    if len(set(targets)) < 2:
        raise CatalogError(f"{root} needs at least two class sub-folders with images")
    return LabeledSet(classes, sources, np.array(targets, dtype=np.int64), names)


def parse_dataset(spec: str) -> tuple[str, Path | None]:
    """`fashion-mnist`, `fashion-mnist:PATH`, or a folder path."""
    if spec == FASHION_MNIST_PREFIX or spec.startswith(FASHION_MNIST_PREFIX + ":"):
        rest = spec[len(FASHION_MNIST_PREFIX) + 1 :]
        return FASHION_MNIST_PREFIX, Path(rest) if rest else None
    return "folder", Path(spec)
