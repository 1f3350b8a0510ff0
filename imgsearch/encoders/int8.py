"""`--runtime onnx-int8`: the cached fp32 export quantised to int8 with onnxruntime's static QDQ quantisation.

Weights int8 per channel, activations uint8 with ranges from a percentile (99.99) calibration over the images
shipped in `calibration/` (real photos and product images, examples/make_int8_calibration_set.py). Every node is
quantised: keeping some in fp32 measured worse (docs/benchmarks.md). The result is cached beside the fp32 export
with its own card; it needs neither torch nor the training data. Its vectors are close to the fp32 ones (cosine
checked in tests), but not equal: a collection records the precision that filled it (store/schema.py) and runtime auto
keeps to it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from imgsearch.encoders.onnx_runtime import (
    OnnxEncoder,
    cache_error,
    disk_nearly_full,
    export_path,
    load_cached,
    onnx_encoder,
    prune_stale_exports,
    write_card_and_model,
)
from imgsearch.errors import ImgsearchError

log = logging.getLogger(__name__)

CALIBRATION_DIR = Path(__file__).parent / "calibration"
CALIBRATION_PERCENTILE = 99.99
QUANTIZATION = {
    "format": "QDQ", "weights": "int8, per channel", "activations": "uint8",
    "calibration": f"percentile {CALIBRATION_PERCENTILE}", "calibration_images": "imgsearch/encoders/calibration",
}


class QuantizationError(ImgsearchError):
    """The export could not be quantised; use --runtime onnx."""


def calibration_batches(preprocess, input_size: int) -> list[np.ndarray]:
    """The shipped calibration images, preprocessed as the encoder does, one per batch (the histogram calibrator
    stacks batches, so they must be of one size)."""
    from imgsearch.images import load_image

    paths = sorted(path for path in CALIBRATION_DIR.iterdir() if path.suffix in (".jpg", ".png"))
    return [np.asarray(preprocess(load_image(path, min_side=input_size)), dtype=np.float32)[None] for path in paths]


def int8_encoder(name: str, weights: Path | None, cache_dir: Path | None, load_torch) -> OnnxEncoder:
    """The ONNX export of `name` quantised to int8, cached beside the fp32 export it is made from."""
    quantized_path = int8_path(export_path(name, weights, cache_dir))
    if (quantized := load_cached(quantized_path, load_torch)) is not None:
        prune_stale_exports(quantized_path)
        return quantized
    fp32 = onnx_encoder(name, weights, cache_dir, load_torch)
    return OnnxEncoder(quantize_export(fp32.model_path, fp32.preprocess, fp32.input_size), load_torch, fp32.built_torch_encoder)


def int8_path(fp32_path: Path) -> Path:
    return fp32_path.with_name(fp32_path.stem + ".int8.onnx")


def quantize_export(fp32_path: Path, preprocess, input_size: int) -> Path:
    """Quantise the export at `fp32_path` (its card beside it) unless the int8 file and its card are there."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = int8_path(fp32_path)
    card_path = path.with_suffix(".json")
    if path.is_file() and card_path.is_file():
        return path
    batches = calibration_batches(preprocess, input_size)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(batches)

        def get_next(self):
            batch = next(self.remaining, None)
            return None if batch is None else {"images": batch}

    log.info("quantising %s to int8, calibrated on %d images (once: it is cached)", fp32_path.name, len(batches))
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    quiet = contextlib.ExitStack()  # onnxruntime's quantiser prints its progress and logs each rescaled weight
    quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))  # stdout carries --json
    quiet.enter_context(_root_log_level(logging.WARNING))
    try:
        with tempfile.TemporaryDirectory(prefix="imgsearch-int8-", dir=path.parent) as folder, quiet:
            prepared = Path(folder) / "prepared.onnx"
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(temporary), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.Percentile, extra_options={"CalibPercentile": CALIBRATION_PERCENTILE},
            )
    except Exception as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) or disk_nearly_full(path.parent):
            raise cache_error(path.parent, error) from None
        raise QuantizationError(f"cannot quantise {fp32_path.name} to int8 ({type(error).__name__}: {error}); use --runtime onnx") from None
    card = json.loads(fp32_path.with_suffix(".json").read_text(encoding="utf-8")) | {"quantization": QUANTIZATION}
    try:
        write_card_and_model(card, card_path, temporary, path)  # last and atomic, as for the fp32 export
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise cache_error(path.parent, error) from None
    return path


@contextlib.contextmanager
def _root_log_level(level: int):
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(level, previous))
    try:
        yield
    finally:
        root.setLevel(previous)
