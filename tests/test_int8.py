"""The export's padding folded to constants, the int8 runtime (close to fp32 on photos it was not calibrated on), and
the export cache pruning what an upgrade left behind."""

from __future__ import annotations

import json
import os
import shutil
import uuid

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image, ImageEnhance, ImageOps

from helpers import auto_cpu_precision, fashion_images, run_cli
from imgsearch.encoders import load_encoder
from imgsearch.encoders.int8 import CALIBRATION_DIR, cpu_has_int8_dot_product, int8_dot_product_in, warn_int8_without_dot_product
from imgsearch.encoders.onnx_runtime import STALE_DAYS, fold_padding, prune_stale_exports

HELD_OUT_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def _padded_model(amounts_from_values: bool) -> onnx.ModelProto:
    """images -> Pad (amounts computed) -> ReduceMean: the amounts come from the input's shape (like TF "same"
    padding: 1 at the end of each spatial axis when the size is even) or from its values."""
    source = ["images"]
    nodes = [helper.make_node("ReduceMax", source, ["peak"], keepdims=0)] if amounts_from_values else [
        helper.make_node("Shape", source, ["shape"]),
        helper.make_node("Gather", ["shape", "two"], ["height"]),
        helper.make_node("Mod", ["height", "two"], ["odd"]),
        helper.make_node("Sub", ["one", "odd"], ["peak"]),
    ]
    nodes += [
        helper.make_node("Cast", ["peak"], ["peak_int"], to=TensorProto.INT64),
        helper.make_node("Mul", ["pattern", "peak_int"], ["amounts"]),
        helper.make_node("Pad", ["images", "amounts"], ["padded"]),
        helper.make_node("ReduceMean", ["padded"], ["features"], axes=[2, 3], keepdims=0),
    ]
    constants = [
        numpy_helper.from_array(np.array(2, np.int64), "two"), numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pattern"),
    ]
    graph = helper.make_graph(
        nodes, "padded", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3])], constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _features(path, images: np.ndarray) -> np.ndarray:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]


def test_padding_computed_from_the_shape_is_folded_and_padding_computed_from_values_is_kept(tmp_path):
    images = np.random.default_rng(1).uniform(1, 2, (2, 3, 8, 8)).astype(np.float32)
    for from_values in (False, True):
        path = tmp_path / f"values{from_values}.onnx"
        onnx.save(_padded_model(from_values), str(path))
        before = _features(path, images)
        fold_padding(path, 8)
        ops = [node.op_type for node in onnx.load(str(path)).graph.node]
        assert ("Shape" in ops or "ReduceMax" in ops) == from_values, ops
        assert ops[-2:] == ["Pad", "ReduceMean"]
        assert np.allclose(_features(path, images), before, atol=1e-6)
        assert not np.allclose(before, images.mean(axis=(2, 3)))  # the padding is there: it lowers the mean


def test_exports_of_the_same_model_unused_for_a_month_are_pruned_and_nothing_else(tmp_path):
    now = 2_000_000_000.0
    day = 86400

    def export(stem: str, age_days: float, int8: bool = True) -> list:
        files = [tmp_path / f"{stem}.onnx", tmp_path / f"{stem}.json"]
        files += [tmp_path / f"{stem}.int8.onnx", tmp_path / f"{stem}.int8.json"] if int8 else []
        for file in files:
            file.write_bytes(b"x")
            os.utime(file, (now - age_days * day, now - age_days * day))
        return files

    in_use = export("efficientnet_lite0-" + "a" * 16, 400)  # old, but in use now: its cards get touched
    stale = export("efficientnet_lite0-" + "b" * 16, STALE_DAYS + 1)
    stale.append(tmp_path / ("efficientnet_lite0-" + "b" * 16 + ".tmp4242"))  # an export interrupted long ago
    stale[-1].write_bytes(b"x")
    os.utime(stale[-1], (now - 90 * day, now - 90 * day))
    recent = export("efficientnet_lite0-" + "c" * 16, STALE_DAYS - 1, int8=False)  # another weights file, still used
    other_model = export("efficientnet_lite1-" + "d" * 16, 400)
    prefix_model = export("efficientnet_lite0_x-" + "e" * 16, 400)  # a name that only starts like it
    unrelated = tmp_path / "efficientnet_lite0-notes.json"
    unrelated.write_text("{}")
    os.utime(unrelated, (now - 400 * day, now - 400 * day))

    deleted = prune_stale_exports(in_use[2], now=now)  # the int8 export is the one loaded

    assert sorted(deleted) == sorted(stale)
    assert not any(file.exists() for file in stale)
    assert all(file.exists() for file in in_use + recent + other_model + prefix_model + [unrelated])
    assert in_use[1].stat().st_mtime == now and in_use[3].stat().st_mtime == now  # both cards marked as used
    # then the other weights file is the one in use: the first export goes once a month has passed since its use
    assert prune_stale_exports(recent[0], now=now + (STALE_DAYS - 1) * day) == []
    assert sorted(prune_stale_exports(recent[0], now=now + (STALE_DAYS + 1) * day)) == sorted(in_use)


def test_the_lite0_export_pads_by_constants(onnx_encoder):
    model = onnx.load(str(onnx_encoder.model_path))
    constants = {initializer.name for initializer in model.graph.initializer}
    pads = [node for node in model.graph.node if node.op_type == "Pad"]
    assert len(pads) == 5 and all(node.input[1] in constants for node in pads)


def _edited(photo: Image.Image) -> list[Image.Image]:
    width, height = photo.size
    return [
        photo, ImageOps.mirror(photo), photo.crop((width // 4, height // 4, width * 3 // 4, height * 3 // 4)),
        photo.rotate(90, expand=True), ImageEnhance.Color(photo).enhance(0.3), ImageEnhance.Brightness(photo).enhance(1.4),
        photo.resize((width // 3, height // 3)),
    ]


def test_calibrating_one_image_at_a_time_gives_onnxruntimes_all_at_once_ranges(onnx_encoder, tmp_path):
    """The quantiser's ranges, computed with one image's activations in memory instead of all of them (4.2 GB for
    the 52 calibration images), are exactly onnxruntime's own: the int8 model, hence its vectors, is unchanged."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from imgsearch.encoders.int8 import CALIBRATION_PERCENTILE, calibration_batches, calibration_ranges

    batches = calibration_batches(onnx_encoder.preprocess, onnx_encoder.input_size)[:3]
    prepared = tmp_path / "prepared.onnx"
    quant_pre_process(str(onnx_encoder.model_path), str(prepared), skip_symbolic_shape=True)
    ours = calibration_ranges(prepared, batches, tmp_path)
    calibrator = create_calibrator(
        prepared, list(set(QLinearOpsRegistry) | set(QDQRegistry)), augmented_model_path=str(tmp_path / "all.onnx"),
        calibrate_method=CalibrationMethod.Percentile, extra_options={"percentile": CALIBRATION_PERCENTILE},
    )

    class AllBatches:  # onnxruntime's calibration reads every batch, then makes the histograms
        remaining = iter(batches)

        def get_next(self):
            batch = next(self.remaining, None)
            return None if batch is None else {"images": batch}

    calibrator.collect_data(AllBatches())
    theirs = calibrator.compute_data()
    assert set(ours.data) == set(theirs.data) and len(theirs.data) > 50
    for name in theirs.data:
        assert [float(value) for value in ours.data[name].range_value] == [float(value) for value in theirs.data[name].range_value], name


INTEL_VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
ALDER_LAKE = "flags\t\t: fpu avx2 avx_vnni\n"
AMD_EPYC_AVX2 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma bmi2 sha_ni\n"
SKYLAKE_AVX512 = "flags\t\t: fpu avx2 avx512f avx512bw avx512vl\n"  # vpmaddubsw saturates there too
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd aes crc32 atomics asimddp sve\n"
CORTEX_A72 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"
MIXED = INTEL_VNNI + "processor\t: 2\nflags\t\t: fpu sse2 avx2\n"  # one core without: not safe to assume


@pytest.mark.parametrize("cpuinfo, has", [
    (INTEL_VNNI, True), (ALDER_LAKE, True), (GRAVITON, True),
    (AMD_EPYC_AVX2, False), (SKYLAKE_AVX512, False), (CORTEX_A72, False), (MIXED, False), ("", False),
    ("flags\t\t: avx512_vnni_not_really\n", False),
], ids=["intel-vnni", "alder-lake", "graviton", "amd-epyc-avx2", "skylake-avx512", "cortex-a72", "one-core-without", "empty",
        "look-alike-flag"])
def test_int8_is_picked_only_where_every_core_has_int8_dot_product_instructions(cpuinfo, has):
    assert int8_dot_product_in(cpuinfo) is has


def test_int8_vectors_stay_close_to_fp32_on_images_it_was_not_calibrated_on(onnx_encoder, int8_encoder, photos):
    if not cpu_has_int8_dot_product():  # measured min 0.77 on an AVX2-only CPU: why auto does not pick int8 there
        pytest.skip("this CPU has no int8 dot-product instructions (VNNI/dotprod): runtime auto uses fp32 here")
    calibrated_on = {path.stem for path in CALIBRATION_DIR.iterdir()}
    assert len(calibrated_on) >= 50 and not calibrated_on & set(HELD_OUT_PHOTOS)
    products = [path for path in fashion_images(4) if path.stem not in calibrated_on]
    assert len(products) == 30
    for images, least, mean in (
        ([edit for name in HELD_OUT_PHOTOS for edit in _edited(photos[name])], 0.95, 0.98),
        ([Image.open(path).convert("RGB") for path in products], 0.90, 0.97),  # 28-px greys, upscaled: harder
    ):
        fp32, int8 = onnx_encoder.encode_images(images), int8_encoder.encode_images(images)
        cosines = (fp32 * int8).sum(axis=1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
        assert cosines.min() >= least and cosines.mean() >= mean, (cosines.min(), cosines.mean())
    assert np.allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)


def test_the_int8_model_is_cached_with_its_card(onnx_encoder, int8_encoder, caplog):
    assert int8_encoder.model_path != onnx_encoder.model_path and int8_encoder.model_path.parent == onnx_encoder.model_path.parent
    card = json.loads(int8_encoder.model_path.with_suffix(".json").read_text())
    assert card["quantization"]["weights"] == "int8, per channel"
    assert (int8_encoder.name, int8_encoder.dim, int8_encoder.preprocess_version) == (
        onnx_encoder.name, onnx_encoder.dim, onnx_encoder.preprocess_version,
    )
    quantized = onnx.load(str(int8_encoder.model_path))
    assert sum(node.op_type == "QuantizeLinear" for node in quantized.graph.node) >= 49  # at least one per conv
    stamp = int8_encoder.model_path.stat().st_mtime_ns
    warn_int8_without_dot_product.cache_clear()  # said once per process: the session's fixture said it first
    with caplog.at_level("WARNING"):
        again = load_encoder("efficientnet_lite0", device="cpu", runtime="onnx-int8", onnx_cache=onnx_encoder.model_path.parent)
    assert again.model_path == int8_encoder.model_path and again.model_path.stat().st_mtime_ns == stamp
    assert "torch_encoder" not in again.__dict__
    assert ("no int8 dot-product instructions" in caplog.text) is (not cpu_has_int8_dot_product()), caplog.text


@pytest.mark.slow
def test_the_int8_runtime_through_the_cli_keeps_json_clean_and_imports_no_torch(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "IMGSEARCH_MILVUS_URI": str(tmp_path / "int8.db"), "CUDA_VISIBLE_DEVICES": "",
           "IMGSEARCH_ONNX_CACHE": str(tmp_path / "onnx")}
    catalog = tmp_path / "catalog"
    for path in fashion_images(1):
        (catalog / path.parent.name).mkdir(parents=True)
        (catalog / path.parent.name / path.name).write_bytes(path.read_bytes())
    # the first run exports and quantises: onnxruntime's progress output must not reach stdout
    ingested = run_cli(["ingest", str(catalog), "--runtime", "onnx-int8", "--json"], env_extra=env, check=True)
    assert json.loads(ingested.stdout)["indexed"] == 10
    assert len(list((tmp_path / "onnx").glob("*.int8.onnx"))) == 1
    query = str(fashion_images(1)[3])
    found = run_cli(["search", query, "-k", "1", "--runtime", "onnx-int8", "--json"], env_extra=env, python_flags=("-X", "importtime"), check=True)
    assert json.loads(found.stdout)[0]["results"][0]["path"].endswith(query.rsplit("/", 1)[-1])
    imported = {line.split("|")[-1].strip() for line in found.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported and not imported & {"torch", "torchvision", "timm", "open_clip"}


def test_auto_keeps_a_collection_at_the_precision_that_filled_it(tmp_path, onnx_encoder, int8_encoder, caplog):
    from imgsearch.config import load_settings
    from imgsearch.session import open_session, open_store
    from imgsearch.store import PRECISION_PROPERTY

    def settings(name: str, **extra):
        return load_settings(milvus_uri=str(tmp_path / "precision.db"), collection=name, device="cpu",
                             onnx_cache=onnx_encoder.model_path.parent, **extra)

    for reopened in (False, True):  # a new collection gets int8 (on a CPU with VNNI), and keeps it
        encoder, store = open_session(settings("new"))
        with store:
            assert encoder.precision == auto_cpu_precision() == store.properties()[PRECISION_PROPERTY], reopened
    for filler in (onnx_encoder, int8_encoder):  # fp32 as every collection before int8; int8 made elsewhere or asked for
        with open_store(settings(f"by_{filler.precision}"), filler) as store:
            assert store.properties()[PRECISION_PROPERTY] == filler.precision
        encoder, store = open_session(settings(f"by_{filler.precision}"))
        with store:
            assert encoder.precision == filler.precision
    with caplog.at_level("WARNING"):
        encoder, store = open_session(settings("by_fp32", runtime="onnx-int8"))  # asked for: allowed, and said
        store.close()
    assert encoder.precision == "int8" and "filled by the fp32 encoder, this one is int8" in caplog.text


def test_a_damaged_or_unusable_model_cache_is_rebuilt_or_one_line(tmp_path, onnx_encoder, int8_encoder):
    """A truncated export (fp32 or int8) or an emptied card is rebuilt with a warning, and the rerun is clean; a cache
    that cannot be created names the setting; a full disk says so, not that another runtime would help."""
    import subprocess

    image = tmp_path / "one.png"
    shutil.copy(fashion_images(1)[0], image)
    source = onnx_encoder.model_path.parent

    def run(cache, *extra, env=None):
        env = {"IMGSEARCH_ONNX_CACHE": str(cache), **(env or {})} if cache else env
        return run_cli(["ingest", str(image), "--uri", str(tmp_path / f"{uuid.uuid4().hex}.db"), *extra], env_extra=env)

    stem = onnx_encoder.model_path.stem
    for damaged, runtime in ((".onnx", "onnx"), (".json", "onnx"), (".int8.onnx", "onnx-int8")):
        cache = tmp_path / f"cache{damaged.replace('.', '_')}"
        shutil.copytree(source, cache)
        target = cache / (stem + damaged)
        target.write_bytes(target.read_bytes()[:1000] if target.suffix == ".onnx" else b"")  # truncated, or an emptied card
        first = run(cache, "--runtime", runtime)
        assert first.returncode == 0 and "damaged" in first.stderr and "Traceback" not in first.stderr, (damaged, first.stderr)
        again = run(cache, "--runtime", runtime)
        assert again.returncode == 0 and "damaged" not in again.stderr, damaged

    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    for cache, env in ((a_file, None), (None, {"HOME": "/proc/no-home", "XDG_CACHE_HOME": ""})):
        refused = run(cache, "--runtime", "onnx", env=env)
        assert refused.returncode == 2 and "IMGSEARCH_ONNX_CACHE" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True).returncode != 0:
        pytest.skip("mounting a 1 MB tmpfs (the full disk) needs root")
    try:
        refused = run(full, "--runtime", "onnx")
        assert refused.returncode == 2 and "no space left" in refused.stderr and "--runtime torch" not in refused.stderr, refused.stderr
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_an_int8_collection_keeps_its_precision_through_export_and_import(tmp_path):
    """The export carries every identity property; an int8 collection imported elsewhere is still int8, so `auto`
    searches it with the int8 encoder and a stored image finds itself at 1.0 (recorded as fp32 it scored 0.989)."""
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    images = fashion_images(1)[:4]
    for image in images:
        shutil.copy(image, catalog / image.name)
    source, target, out = str(tmp_path / "a.db"), str(tmp_path / "b.db"), str(tmp_path / "x.parquet")
    run_cli(["ingest", str(catalog), "--uri", source, "--runtime", "onnx-int8"], check=True)
    run_cli(["export", "--out", out, "--uri", source], check=True)
    run_cli(["import", out, "--uri", target], check=True)
    assert json.loads(run_cli(["info", "--uri", target, "--json"], check=True).stdout)["precision"] == "int8"
    [result] = json.loads(run_cli(["search", str(catalog / images[0].name), "-k", "1", "--uri", target, "--json"], check=True).stdout)
    assert result["results"][0]["score"] >= 0.9999
