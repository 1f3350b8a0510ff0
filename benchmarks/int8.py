"""Static int8 quantisation of the Lite0 ONNX export with onnxruntime: how close to fp32, and how fast.

    python benchmarks/int8.py [CONFIG ...]      # default: every configuration below

For each configuration, the cached fp32 export (the one `--runtime onnx` uses) is quantised with
`onnxruntime.quantization.quantize_static` (QDQ format, int8 weights per channel, uint8 activations unless said
otherwise, after `quant_pre_process`), calibrated on colour photos: 20 scikit-image photos, each whole, cropped to
its top-left 2/3 and mirrored at 1/3 size (60 images). It is evaluated on other images: every third image of
the sample catalog and the example queries. Prints the cosine of each int8 vector to its fp32 vector (min and
mean) and images/s of both at batch 32, measured in the same run. Nothing here is used by imgsearch itself: it
is the record of what was tried (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

from imgsearch.encoders import load_encoder
from imgsearch.images import load_image

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "coins", "colorwheel", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "logo", "moon", "page", "rocket", "text", "horse", "clock", "retina", "cat",
)
BATCH = 32


def calibration_images() -> list[Image.Image]:
    from skimage import data

    images = []
    for name in CALIBRATION_PHOTOS:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        small = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((max(32, photo.width // 3), max(32, photo.height // 3)))
        images += [photo, photo.crop((0, 0, photo.width * 2 // 3, photo.height * 2 // 3)), small]
    return images


def evaluation_paths() -> list[Path]:
    catalog = sorted(path for path in (ROOT / "examples" / "catalog").rglob("*") if path.is_file())
    return catalog[::3] + sorted((ROOT / "examples" / "queries").iterdir())


class Batches(CalibrationDataReader):
    def __init__(self, inputs: np.ndarray, size: int) -> None:
        self.batches = iter([inputs[start : start + size] for start in range(0, len(inputs), size)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch}


def configurations(model: onnx.ModelProto) -> dict[str, dict]:
    names = [node.name for node in model.graph.node]
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    head = [name for name in names if name.startswith(("/module/conv_head/", "/module/bn2/", "/module/global_pool/pool"))]
    tail = names[-6:]  # flatten and L2 normalisation
    depthwise = [name for name in convs if "conv_dw" in name]
    percentile = {"calibrate_method": CalibrationMethod.Percentile, "extra_options": {"CalibPercentile": 99.999}}
    return {
        "minmax": {"calibrate_method": CalibrationMethod.MinMax},
        "percentile 99.999": percentile,
        "percentile 99.99": {"calibrate_method": CalibrationMethod.Percentile, "extra_options": {"CalibPercentile": 99.99}},
        "percentile, stem + last conv + tail in fp32": {**percentile, "nodes_to_exclude": [convs[0], convs[-1], *tail]},
        "entropy, stem + last conv + tail in fp32": {"calibrate_method": CalibrationMethod.Entropy, "nodes_to_exclude": [convs[0], convs[-1], *tail]},
        "percentile, head conv + pooling in fp32": {**percentile, "nodes_to_exclude": head},
        "percentile, depthwise convs in fp32": {**percentile, "nodes_to_exclude": depthwise},
        "percentile, 7-bit weights (reduce_range)": {**percentile, "reduce_range": True},
        "percentile, uint8 weights (U8U8)": {**percentile, "weight_type": QuantType.QUInt8},
        "percentile, per-tensor weights": {**percentile, "per_channel": False},
        "percentile, int8 symmetric activations": {
            "calibrate_method": CalibrationMethod.Percentile, "activation_type": QuantType.QInt8,
            "extra_options": {"CalibPercentile": 99.999, "ActivationSymmetric": True},
        },
    }


def run(path: str, inputs: np.ndarray) -> tuple[np.ndarray, float]:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    vectors = np.concatenate([session.run(None, {"images": inputs[i : i + BATCH]})[0] for i in range(0, len(inputs), BATCH)])
    batch = inputs[:BATCH]
    session.run(None, {"images": batch})
    started = time.perf_counter()
    for _ in range(6):
        session.run(None, {"images": batch})
    return vectors, 6 * BATCH / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="names of configurations to run (default: all)")
    args = parser.parse_args()
    encoder = load_encoder("efficientnet_lite0", device="cpu", runtime="onnx")
    calibration = np.stack([encoder.preprocess(image) for image in calibration_images()])
    evaluation = np.stack([encoder.preprocess(load_image(path, min_side=encoder.input_size)) for path in evaluation_paths()])
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; onnxruntime {onnxruntime.__version__}; "
          f"{len(calibration)} calibration images, {len(evaluation)} evaluation images", flush=True)
    with tempfile.TemporaryDirectory(prefix="imgsearch-int8-") as folder:
        prepared = str(Path(folder) / "prepared.onnx")
        quant_pre_process(str(encoder.model_path), prepared, skip_symbolic_shape=True)
        reference, fp32_speed = run(str(encoder.model_path), evaluation)
        print(f"fp32: {fp32_speed:.1f} images/s", flush=True)
        print("\n| configuration | cosine to fp32: min | mean | images/s | × fp32 |\n|---|---|---|---|---|")
        for name, options in configurations(onnx.load(prepared)).items():
            if args.configs and name not in args.configs:
                continue
            quantized = str(Path(folder) / "int8.onnx")
            settings = {"per_channel": True, "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, **options}
            size = 10  # calibration batches of one size: the histogram calibrators stack them
            quantize_static(prepared, quantized, Batches(calibration, size), quant_format=QuantFormat.QDQ, **settings)
            vectors, speed = run(quantized, evaluation)
            cosines = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
            print(f"| {name} | {cosines.min():.4f} | {cosines.mean():.4f} | {speed:.1f} | {speed / fp32_speed:.2f} |", flush=True)


if __name__ == "__main__":
    main()
