"""The ONNX runtimes of Lite0 on the CPU, measured in one run: how fast, and how close int8 is to fp32.

    python benchmarks/int8.py [--rounds 5]

Three models, exported into a temporary cache: the fp32 export as it was before its padding was folded (TF-style
"same" padding computed from tensor shapes at run time), the fp32 export `--runtime onnx` uses (padding folded to
constants) and its int8 quantisation, `--runtime onnx-int8` (imgsearch/encoders/int8.py, calibrated on the
shipped images). Prints images/s at batch 32 (the median over rounds that alternate the models) and the cosine of
each model's vectors to the fp32 ones (min / mean) on images the int8 model was not calibrated on: 4 scikit-image
photos with 7 edits each (mirror, crop, rotation, desaturation, brightening, downscaling) and 30 Fashion-MNIST
product images from the sample catalog. Recognition accuracy of the two runtimes:
`python benchmarks/recognition.py --compare efficientnet_lite0@onnx efficientnet_lite0@onnx-int8`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnxruntime
from PIL import Image, ImageEnhance, ImageOps

from imgsearch.encoders import load_encoder, load_torch_encoder
from imgsearch.encoders.int8 import CALIBRATION_DIR
from imgsearch.encoders.onnx_runtime import OnnxEncoder, export_onnx

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # not in the calibration set
BATCH = 32


def edited(photo: Image.Image) -> list[Image.Image]:
    width, height = photo.size
    return [
        photo, ImageOps.mirror(photo), photo.crop((width // 4, height // 4, width * 3 // 4, height * 3 // 4)),
        photo.rotate(90, expand=True), ImageEnhance.Color(photo).enhance(0.3), ImageEnhance.Brightness(photo).enhance(1.4),
        photo.resize((width // 3, height // 3)),
    ]


def evaluation_sets() -> dict[str, list[Image.Image]]:
    from skimage import data

    calibrated_on = {path.stem for path in CALIBRATION_DIR.iterdir()}
    products = sorted(path for path in (ROOT / "examples" / "catalog").glob("*/*.png") if path.stem not in calibrated_on)
    return {
        "photos": [edit for name in PHOTOS for edit in edited(Image.fromarray(getattr(data, name)()).convert("RGB"))],
        "products": [Image.open(path).convert("RGB") for path in products[5::10]],
    }


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds, alternating the models")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgsearch-int8-") as folder:
        cache = Path(folder)
        fp32 = load_encoder("efficientnet_lite0", device="cpu", runtime="onnx", onnx_cache=cache)
        started = time.perf_counter()
        int8 = load_encoder("efficientnet_lite0", device="cpu", runtime="onnx-int8", onnx_cache=cache)
        quantised_in = time.perf_counter() - started
        unfolded_path = export_onnx(load_torch_encoder("efficientnet_lite0", device="cpu"), cache / "unfolded.onnx", fold=False)
        shutil.copy(fp32.model_path.with_suffix(".json"), unfolded_path.with_suffix(".json"))  # the same card
        unfolded = OnnxEncoder(unfolded_path, lambda: None)
        models = {"fp32, computed padding (before)": unfolded, "fp32, padding folded (--runtime onnx)": fp32,
                  "int8 (--runtime onnx-int8)": int8}
        sets = evaluation_sets()
        inputs = {name: np.stack([fp32.preprocess(image) for image in images]) for name, images in sets.items()}
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; onnxruntime {onnxruntime.__version__}; "
              f"int8 quantised in {quantised_in:.1f} s on {len(list(CALIBRATION_DIR.iterdir()))} calibration images; "
              f"evaluated on {len(sets['photos'])} photos and {len(sets['products'])} product images", flush=True)
        reference = {name: fp32.encode(batch) for name, batch in inputs.items()}
        timing = np.concatenate(list(inputs.values()))[:BATCH]
        rates: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                model.encode(timing)
                started = time.perf_counter()
                for _ in range(3):
                    model.encode(timing)
                rates[name].append(3 * BATCH / (time.perf_counter() - started))
        base = statistics.median(rates[next(iter(models))])
        print("\n| model | images/s (batch 32, median) | × before | photos: cosine to fp32 min / mean | products: min / mean |\n"
              "|---|---|---|---|---|")
        for name, model in models.items():
            close = {set_name: cosines(model.encode(batch), reference[set_name]) for set_name, batch in inputs.items()}
            rate = statistics.median(rates[name])
            print(f"| {name} | {rate:.1f} | {rate / base:.2f} | {close['photos'].min():.4f} / {close['photos'].mean():.4f} | "
                  f"{close['products'].min():.4f} / {close['products'].mean():.4f} |", flush=True)


if __name__ == "__main__":
    main()
