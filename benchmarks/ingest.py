"""Ingestion speed in one run: the encoder floor, the real `imgsearch ingest`, and the naive per-image peer.

    python benchmarks/ingest.py [--images 500] [--also 5000] [--batch-size 32] [--runtime auto] [--peer-images 100]
                                [--products 5000] [--server-uri http://127.0.0.1:19530]

(a) floor: the encoder alone on pre-decoded, pre-resized tensors, at the same batch size.
(b) real: `imgsearch ingest` as a separate process into a fresh Milvus Lite file (wall clock, model load included).
(c) naive peer, the Milvus bootcamp quickstart's way: per image PIL open, transform, torch forward at batch 1,
    insert one row. Same Lite0 weights. Timed on the first --peer-images images.
(d) re-ingest: (b) again on the unchanged catalog (and on --also), settled from the hash cache without reading files.
(e) the machine bound: per image and single-threaded, read + hash, decode + preprocess, and encode (onnxruntime on
    one thread), in core-ms, on the catalog's first --stage-images; the bound is cores / their sum, and (b) is
    printed as a fraction of it. Also for --also and for --products small product images (Fashion-MNIST PNGs of
    28-300 px, the sample catalog's kind), where decode is cheap and the encoder should be the limit.
Prints (b)/(a), (b)/(c), the peak RSS of (b)'s process tree, and (b)'s stage split; with --server-uri, the peak of
(b)'s process tree for both sizes into a Milvus server (a Lite file's rows live in the ingesting process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # the naive peer's idle Milvus Lite client logs keepalive noise
ROOT = Path(__file__).resolve().parent.parent

from imgsearch.encoders import load_encoder  # noqa: E402
from imgsearch.images import load_image  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "immunohistochemistry", "hubble_deep_field")


def make_catalog(folder: Path, count: int, seed: int = 0) -> Path:
    """Camera-size JPEGs (800x600 .. 2000x1500) cut and scaled from scikit-image's real photos; cached."""
    from skimage import data

    done = folder / f".complete-{count}"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sources = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    rng = np.random.default_rng(seed)
    for index in range(count):
        source = sources[index % len(sources)]
        width = int(rng.integers(800, 2001))
        height = width * 3 // 4
        # a random crop of 60-100% of the photo, scaled up to camera size: every file is distinct content
        fraction = rng.uniform(0.6, 1.0)
        crop_w, crop_h = int(source.width * fraction), int(source.height * fraction)
        left = int(rng.integers(0, source.width - crop_w + 1))
        top = int(rng.integers(0, source.height - crop_h + 1))
        image = source.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BILINEAR)
        label = PHOTOS[index % len(PHOTOS)]
        (folder / label).mkdir(exist_ok=True)
        image.save(folder / label / f"{index:05d}.jpg", quality=90)
    done.touch()
    return folder


def make_product_catalog(folder: Path, count: int, seed: int = 0) -> Path:
    """Fashion-MNIST images (Debian's dataset-fashion-mnist) as PNGs of 28-300 px in class folders; cached."""
    from imgsearch.datasets import fashion_mnist

    done = folder / f".complete-{count}"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    dataset = fashion_mnist("train")
    rng = np.random.default_rng(seed)
    for index in range(count):
        side = int(rng.integers(28, 301))
        label = dataset.classes[dataset.targets[index]]
        (folder / label).mkdir(parents=True, exist_ok=True)
        image = dataset.sources[index]().resize((side, side), Image.Resampling.BICUBIC)
        image.save(folder / label / f"{index:05d}.png")
    done.touch()
    return folder


def stage_costs(catalog: Path, runtime: str, count: int, batch_size: int) -> dict[str, float]:
    """Core-ms per image of each stage, single-threaded, on the catalog's first `count` images."""
    import hashlib

    from imgsearch.encoders.onnx_runtime import THREADS_VARIABLE

    paths = sorted(path for path in catalog.rglob("*") if path.suffix in (".jpg", ".png"))[:count]
    os.environ[THREADS_VARIABLE] = "1"  # the encoder on one core
    try:
        encoder = load_encoder("efficientnet_lite0", runtime=runtime, device="cpu")
    finally:
        del os.environ[THREADS_VARIABLE]
    torch.set_num_threads(1)  # for --runtime torch
    started = time.process_time()
    contents = []
    for path in paths:
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        contents.append(data)
    read = time.process_time() - started
    started = time.process_time()
    tensors = [encoder.preprocess(load_image(data, min_side=encoder.input_size)) for data in contents]
    decode = time.process_time() - started
    batch = encoder.stack(tensors[:batch_size])
    encoder.encode(batch)  # warm-up
    started = time.process_time()
    for start in range(0, len(tensors), batch_size):
        encoder.encode(encoder.stack(tensors[start : start + batch_size]))
    encode = time.process_time() - started
    torch.set_num_threads(os.cpu_count() or 1)
    return {"read + hash": 1000 * read / len(paths), "decode + preprocess": 1000 * decode / len(paths),
            "encode": 1000 * encode / len(paths)}


def print_bound(name: str, costs: dict[str, float], whole_process: float) -> None:
    cores = os.cpu_count() or 1
    bound = 1000 * cores / sum(costs.values())
    split = ", ".join(f"{stage} {ms:.2f}" for stage, ms in costs.items())
    print(f"(e) {name}: core-ms per image: {split}; machine bound {cores} cores / {sum(costs.values()):.2f} ms = "
          f"{bound:.1f} images/s; whole process {whole_process:.1f} images/s = {whole_process / bound:.2f} of the bound")


def floor_images_per_second(encoder, catalog: Path, batch_size: int, count: int) -> float:
    paths = sorted(catalog.rglob("*.jpg"))[:count]
    tensors = encoder.stack([encoder.preprocess(load_image(path, min_side=encoder.input_size)) for path in paths])
    encoder.encode(tensors[:batch_size])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(tensors), batch_size):
        encoder.encode(tensors[start : start + batch_size])
    return len(tensors) / (time.perf_counter() - started)


def _tree_pss_bytes(root_pid: int) -> int:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:  # PSS: pages shared with forked workers count once, not once per process
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


OBSERVER_SHARE = 20  # wait this many times a sample's CPU cost before the next


def run_ingest(
    catalog: Path, db: Path | str, batch_size: int, runtime: str, extra: tuple[str, ...] = (), env: dict | None = None,
    code: Path = ROOT, hash_cache: Path | None = None, sample_seconds: float = 0.05,
) -> tuple[float, dict, int]:
    """Whole-process `imgsearch ingest` (`extra` arguments and `env` added; `code`: the checkout whose imgsearch runs);
    returns wall seconds, its JSON report and the peak memory (PSS) of its process tree."""
    command = [sys.executable, "-m", "imgsearch.cli", "ingest", str(catalog), "--uri", str(db), "--json",
               "--batch-size", str(batch_size), "--runtime", runtime, *extra]
    peak = 0
    started = time.perf_counter()
    hash_cache = hash_cache or Path(db).parent / "file-hashes.sqlite"
    env = {**os.environ, "IMGSEARCH_HASH_CACHE": str(hash_cache), **(env or {})}
    # `-m` imports from the working directory first: `code` decides which imgsearch runs
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=code, env=env)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            cost = time.process_time()
            peak = max(peak, _tree_pss_bytes(process.pid))
            # Reading smaps costs CPU (15.7 ms a sample of a 660 MiB ingest on 2 cores): at most 1/20 of a core, so
            # the measurement does not take a tenth of the machine from the ingest it measures.
            stop.wait(max(sample_seconds, OBSERVER_SHARE * (time.process_time() - cost)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"imgsearch ingest failed:\n{stderr}")
    return seconds, json.loads(stdout), peak


def cores_used(report: dict) -> str:
    """How the ingest shared the cores (ingest/reader.py's split_cores)."""
    if report.get("lanes", 1) > 1:
        return f"{report['lanes']} lanes, each decoding and encoding on one core"
    threads = report.get("encoder_threads") or "the runtime's default"
    return f"{report['workers']} decode workers, the encoder on {threads} threads"


def naive_peer_images_per_second(catalog: Path, db: Path, count: int) -> float:
    """The bootcamp quickstart loop: one image at a time, end to end, one insert per image."""
    from pymilvus import MilvusClient
    from torchvision.transforms import v2 as T

    from imgsearch.encoders.lite import load_lite_classifier

    model = load_lite_classifier()
    model.reset_classifier(0)
    model.eval()
    transform = T.Compose([
        T.ToImage(), T.Resize(224, antialias=True), T.CenterCrop(224),
        T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.5] * 3),
    ])
    client = MilvusClient(str(db))
    client.create_collection("naive", dimension=1280, metric_type="COSINE", auto_id=True)
    paths = sorted(catalog.rglob("*.jpg"))[:count]
    started = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGB")
        with torch.no_grad():
            vector = model(transform(image).unsqueeze(0))[0]
        vector = (vector / vector.norm()).tolist()
        client.insert("naive", [{"vector": vector, "path": str(path)}])
    seconds = time.perf_counter() - started
    client.close()
    return len(paths) / seconds


def server_peaks(small: Path, big: Path, args: argparse.Namespace) -> None:
    """Peak PSS of `imgsearch ingest`'s process tree for both catalogs into a Milvus server (not counted: it runs
    apart), each into a fresh collection dropped afterwards."""
    from pymilvus import MilvusClient

    client = MilvusClient(args.server_uri)
    (args.work / "server-file-hashes.sqlite").unlink(missing_ok=True)  # as for the Lite runs: every file is read
    peaks = []
    for catalog in (small, big):
        collection = f"bench_ingest_{os.getpid()}_{len(peaks)}"
        try:
            _, report, peak = run_ingest(catalog, args.server_uri, args.batch_size, args.runtime, ("--collection", collection),
                                         hash_cache=args.work / "server-file-hashes.sqlite")
        finally:
            client.drop_collection(collection)
        peaks.append(peak)
        print(f"    into the server at {args.server_uri}: peak PSS {peak / 2**20:.0f} MiB at {report['indexed']} images")
    print(f"    server peak ratio {peaks[1] / peaks[0]:.2f} (the ingest alone: the server's memory is not counted)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--also", type=int, default=0, help="a second, larger catalog size for the RSS comparison")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "onnx-int8"])
    parser.add_argument("--peer-images", type=int, default=100)
    parser.add_argument("--floor-images", type=int, default=256)
    parser.add_argument("--products", type=int, default=0, help="also ingest this many small product images (PNG)")
    parser.add_argument("--stage-images", type=int, default=200)
    parser.add_argument("--server-uri", default="", help="with --also: ingest both catalogs into this Milvus server too, for "
                        "the peak memory of the ingest alone (on a Lite file the rows live in the ingesting process)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imgsearch-bench")
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"cuda={'yes' if torch.cuda.is_available() else 'no'}; runtime={args.runtime}, batch {args.batch_size}")
    catalog = make_catalog(args.work / f"catalog-{args.images}", args.images)

    encoder = load_encoder("efficientnet_lite0", runtime=args.runtime)
    precision = encoder.precision  # runtime auto: int8 only on CPUs with int8 dot-product instructions
    print(f"encoder: {type(encoder).__name__}, {precision}")
    floor = floor_images_per_second(encoder, catalog, args.batch_size, min(args.floor_images, args.images))
    del encoder

    db = args.work / "real.db"
    shutil.rmtree(db, ignore_errors=True)
    (args.work / "file-hashes.sqlite").unlink(missing_ok=True)  # the first ingest reads every file
    seconds, report, peak = run_ingest(catalog, db, args.batch_size, args.runtime)
    real = report["indexed"] / seconds
    assert report["indexed"] == args.images and not report["failed"], report

    peer_db = args.work / "naive.db"
    shutil.rmtree(peer_db, ignore_errors=True)
    peer = naive_peer_images_per_second(catalog, peer_db, min(args.peer_images, args.images))

    stages = report["stages"]
    print(f"(a) floor, encoder alone on ready tensors : {floor:8.1f} images/s")
    print(f"(b) imgsearch ingest, whole process       : {real:8.1f} images/s  ({report['indexed']} images in {seconds:.1f} s, "
          f"{cores_used(report)})")
    print(f"    of which the pipeline itself (plan + decode + encode + insert, no imports or model load): "
          f"{report['images_per_second']:.1f} images/s")
    print(f"(c) naive per-image peer                   : {peer:8.1f} images/s  (first {min(args.peer_images, args.images)} images)")
    print(f"(b)/(a) = {real / floor:.2f}   (b)/(c) = {real / peer:.1f}   "
          f"pipeline-only: {report['images_per_second'] / floor:.2f} and {report['images_per_second'] / peer:.1f}")
    print(f"peak memory (PSS) of (b), process tree: {peak / 2**20:.0f} MiB at {args.images} images")
    print(f"(b) stage split: read+decode {stages['decode_seconds']:.1f} s (summed over workers or lanes), "
          f"main thread waiting for batches {stages['wait_seconds']:.1f} s, encode {stages['encode_seconds']:.1f} s, "
          f"insert {stages['insert_seconds']:.1f} s (background thread), rest of {seconds:.1f} s wall is start-up and planning")
    print_bound(f"{args.images} camera JPEGs", stage_costs(catalog, args.runtime, args.stage_images, args.batch_size), real)
    outside = seconds - report["seconds"]  # imports, settings, model load, and the exit after the report
    print(f"    start-up: {outside:.1f} s of wall outside the pipeline (imports, model load, exit) + "
          f"{report['stages']['first_batch_seconds']:.1f} s inside it before the first batch reached the encoder")
    reingest(catalog, db, args)
    if args.also:
        big = make_catalog(args.work / f"catalog-{args.also}", args.also)
        shutil.rmtree(db, ignore_errors=True)
        big_seconds, big_report, big_peak = run_ingest(big, db, args.batch_size, args.runtime)
        print(f"peak memory (PSS) of (b), process tree: {big_peak / 2**20:.0f} MiB at {args.also} images "
              f"({big_report['indexed'] / big_seconds:.1f} images/s whole process, "
              f"{big_report['images_per_second']:.1f} pipeline-only; {cores_used(big_report)}); ratio {big_peak / peak:.2f}")
        print_bound(f"{args.also} camera JPEGs", stage_costs(big, args.runtime, args.stage_images, args.batch_size),
                    big_report["indexed"] / big_seconds)
        reingest(big, db, args)
        if args.server_uri:
            server_peaks(catalog, big, args)
    if args.products:
        products = make_product_catalog(args.work / f"products-{args.products}", args.products)
        shutil.rmtree(db, ignore_errors=True)
        product_seconds, product_report, product_peak = run_ingest(products, db, args.batch_size, args.runtime)
        costs = stage_costs(products, args.runtime, args.stage_images, args.batch_size)
        rate = product_report["indexed"] / product_seconds
        print(f"{args.products} product PNGs: {rate:.1f} images/s whole process "
              f"({product_report['images_per_second']:.1f} pipeline-only; {cores_used(product_report)}), peak PSS {product_peak / 2**20:.0f} MiB; "
              f"the {precision} encoder's floor on one core is {1000 / costs['encode']:.1f} images/s, on {os.cpu_count()} cores "
              f"{1000 * (os.cpu_count() or 1) / costs['encode']:.1f}: whole process = "
              f"{rate / (1000 * (os.cpu_count() or 1) / costs['encode']):.2f} of that")
        print_bound(f"{args.products} product PNGs", costs, rate)


def reingest(catalog: Path, db: Path, args: argparse.Namespace) -> None:
    """(d) the same catalog again, unchanged: the hash cache (path, size, mtime) settles files without reading them."""
    seconds, report, _ = run_ingest(catalog, db, args.batch_size, args.runtime)
    files = report["skipped"] + report["indexed"]
    print(f"(d) re-ingest of {files} unchanged files: {files / seconds:.0f} files/s whole process ({seconds:.1f} s), "
          f"{files / max(report['seconds'], 1e-9):.0f} files/s pipeline-only; {report['indexed']} re-encoded, "
          f"{report['skipped']} skipped")


if __name__ == "__main__":
    main()
