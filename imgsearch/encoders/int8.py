"""`--runtime onnx-int8`: the cached fp32 export quantised to int8 with onnxruntime's static QDQ quantisation.

Weights int8 per channel, activations uint8 with ranges from a percentile (99.99) calibration over the images
shipped in `calibration/` (real photos and product images, examples/make_int8_calibration_set.py). Every node is
quantised: keeping some in fp32 measured worse (docs/benchmarks.md). The result is cached beside the fp32 export
with its own card; it needs neither torch nor the training data. Its vectors are close to the fp32 ones (cosine
checked in tests), but not equal: a collection records the precision that filled it (store/schema.py) and runtime auto
keeps to it. Runtime auto picks int8 for a new collection only on a CPU with int8 dot-product instructions
(cpu_has_int8_dot_product).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time
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


# /proc/cpuinfo flags (x86) and features (aarch64) of instructions that add uint8 x int8 products in 32 bits. Without
# them onnxruntime's int8 kernels add pairs of products in 16 bits, which saturate: on an AVX2-only AMD EPYC the int8
# vectors measured min cosine 0.77 to fp32, and ran slower than fp32 (docs/benchmarks.md).
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


class QuantizationError(ImgsearchError):
    """The export could not be quantised; use --runtime onnx."""


@functools.cache
def cpu_has_int8_dot_product() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI on x86, dotprod on Arm): where int8 is both faster
    than fp32 and close to it. Apple's Arm CPUs all have them; elsewhere without /proc/cpuinfo: no (fp32 is safe)."""
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    try:
        return int8_dot_product_in(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return False


def int8_dot_product_in(cpuinfo: str) -> bool:
    """Whether every processor that /proc/cpuinfo's text lists has one of INT8_DOT_PRODUCT_FLAGS."""
    flag_lines = [line.partition(":")[2].split() for line in cpuinfo.splitlines()
                  if line.partition(":")[0].strip() in ("flags", "Features")]
    return bool(flag_lines) and all(INT8_DOT_PRODUCT_FLAGS.intersection(flags) for flags in flag_lines)


@functools.cache  # once per process
def warn_int8_without_dot_product() -> None:
    log.warning(
        "this CPU has no int8 dot-product instructions (VNNI): on such a CPU (an AVX2 AMD EPYC) int8 measured slower "
        "than fp32 and its vectors drifted from fp32 ones (cosine as low as 0.77); --runtime onnx was faster and closer"
    )


def calibration_batches(preprocess, input_size: int) -> list[np.ndarray]:
    """The shipped calibration images, preprocessed as the encoder does, one per batch (the histogram calibrator
    stacks batches, so they must be of one size)."""
    from imgsearch.images import load_image

    paths = sorted(path for path in CALIBRATION_DIR.iterdir() if path.suffix in (".jpg", ".png"))
    return [np.asarray(preprocess(load_image(path, min_side=input_size)), dtype=np.float32)[None] for path in paths]


def calibration_ranges(model_path: Path, batches: list[np.ndarray], folder: Path):
    """The activation ranges onnxruntime's percentile calibration computes for `batches`, one batch at a time
    instead of all at once, in two passes: the first finds each tensor's extremes, which fix the histogram's
    bins; the second counts into those bins. The histograms, hence the ranges, are the ones all at once gives
    (checked in tests), which onnxruntime's own strided collection does not promise (its merged bins moved the
    vectors to cosine 0.998)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorsData, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calibrator = create_calibrator(
        model_path, list(set(QLinearOpsRegistry) | set(QDQRegistry)), augmented_model_path=str(folder / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Percentile, extra_options={"percentile": CALIBRATION_PERCENTILE},
    )  # what quantize_static builds: the model with every tensor to calibrate as an output, and its collector
    session = calibrator.infer_session
    names = [output.name for output in session.get_outputs()]
    wanted = [index for index, name in enumerate(names) if name in calibrator.tensors_to_calibrate]
    input_name = session.get_inputs()[0].name

    def activations():  # one batch at a time, each run alone as onnxruntime runs it (a larger batch rounds differently)
        for batch in batches:
            outputs = session.run(None, {input_name: batch})
            yield {names[index]: outputs[index] for index in wanted}

    extremes: dict[str, list] = {}  # tensor: [min, max, min |x|, max |x|]
    for chunk in activations():
        for name, values in chunk.items():
            magnitudes = np.abs(values)
            found = [np.nanmin(values), np.nanmax(values), np.nanmin(magnitudes), np.nanmax(magnitudes)]
            known = extremes.setdefault(name, found)
            extremes[name] = [min(known[0], found[0]), max(known[1], found[1]), min(known[2], found[2]), max(known[3], found[3])]
    counts: dict[str, np.ndarray] = {}
    edges: dict[str, np.ndarray] = {}
    for chunk in activations():
        for name, values in chunk.items():
            # numpy scalars, not Python floats: np.histogram then spaces the bins in float32, as it does from the data
            hist, edges[name] = np.histogram(np.abs(values), bins=calibrator.num_bins, range=tuple(extremes[name][2:]))
            counts[name] = counts[name] + hist if name in counts else hist
    collector = _histogram_collector(calibrator)  # the calibrator makes its own only inside collect_data
    collector.histogram_dict = {  # the symmetric percentile collector's entry: counts of |x|, edges, min, max
        name: (counts[name], edges[name].astype(batches[0].dtype), extremes[name][0], extremes[name][1]) for name in counts
    }
    return TensorsData(CalibrationMethod.Percentile, collector.compute_collection_result())


def _histogram_collector(calibrator):
    from onnxruntime.quantization.calibrate import HistogramCollector

    return HistogramCollector(
        method=calibrator.method, symmetric=calibrator.symmetric, num_bins=calibrator.num_bins,
        num_quantized_bins=calibrator.num_quantized_bins, percentile=calibrator.percentile, scenario=calibrator.scenario,
    )


def int8_encoder(name: str, weights: Path | None, cache_dir: Path | None, load_torch, *, in_child: bool = False) -> OnnxEncoder:
    """The ONNX export of `name` quantised to int8, cached beside the fp32 export it is made from (`in_child`: as
    onnx_encoder)."""
    if not cpu_has_int8_dot_product():
        warn_int8_without_dot_product()
    quantized_path = int8_path(export_path(name, weights, cache_dir))
    if (quantized := load_cached(quantized_path, load_torch)) is not None:
        prune_stale_exports(quantized_path)
        return quantized
    fp32 = onnx_encoder(name, weights, cache_dir, load_torch, in_child=in_child)
    return OnnxEncoder(quantize_export(fp32.model_path, fp32.preprocess, fp32.input_size), load_torch, fp32.built_torch_encoder)


def int8_path(fp32_path: Path) -> Path:
    return fp32_path.with_name(fp32_path.stem + ".int8.onnx")


def quantize_export(fp32_path: Path, preprocess, input_size: int) -> Path:
    """Quantise the export at `fp32_path` (its card beside it) unless the int8 file and its card are there."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = int8_path(fp32_path)
    card_path = path.with_suffix(".json")
    if path.is_file() and card_path.is_file():
        return path
    batches = calibration_batches(preprocess, input_size)

    log.info("quantising %s to int8, calibrated on %d images (once: it is cached)", fp32_path.name, len(batches))
    started = time.perf_counter()
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    quiet = contextlib.ExitStack()  # onnxruntime's quantiser prints its progress and logs each rescaled weight
    quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))  # stdout carries --json
    quiet.enter_context(_root_log_level(logging.WARNING))
    try:
        with tempfile.TemporaryDirectory(prefix="imgsearch-int8-", dir=path.parent) as folder, quiet:
            prepared = Path(folder) / "prepared.onnx"
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            ranges = Path(folder) / "ranges.json"
            save_tensors_data(calibration_ranges(prepared, batches, Path(folder)), ranges)
            quantize_static(
                str(prepared), str(temporary), None, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.Percentile, calibration_cache_path=str(ranges),
            )
    except Exception as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) or disk_nearly_full(path.parent):
            raise cache_error(path.parent, error) from None
        raise QuantizationError(f"cannot quantise {fp32_path.name} to int8 ({type(error).__name__}: {error}); use --runtime onnx") from None
    log.info("quantised %s in %.1f s", fp32_path.name, time.perf_counter() - started)
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
