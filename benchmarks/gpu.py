"""The CUDA path, checked and timed in one run (needs a GPU; prints what it measured).

    python benchmarks/gpu.py [--images 8000] [--also 32000] [--batch-size 256] [--workers 15] [--lite0-weights PATH]
                             [--server-uri URL] [--models lite0,vit] [--stores lite,server] [--decodes cpu,gpu]

1. Correctness: Lite0 vectors on the GPU (bf16 autocast, channels_last) against the CPU in float32, per image;
   JPEGs decoded by nvJPEG (encoders/jpeg_decoder.py) against the CPU decode path, per image; then rows stored by
   a GPU `imgsearch ingest` against CPU vectors of the same files. All need cosine >= 0.99.
2. Encoder only: Lite0 and ViT-B/32 on preprocessed batches already in host memory (copy in, vectors out).
3. End to end: whole-process `imgsearch ingest` of camera-size JPEGs on CUDA, for Lite0 and ViT-B/32: JPEGs decoded
   by the CPU workers vs on the GPU, into a fresh Milvus Lite file and into a Milvus server (--server-uri, or one
   started from .mv/bin/milvus-server when that exists, else `milvus-lite server` in a process of its own), at
   --images and at --also images; with the peak memory
   (PSS) of the ingest's process tree, which should stay flat from the smaller catalog to the larger.
ViT-B/32 runs with RANDOM-INIT weights written here (timing only: no ViT weights exist offline); Lite0 with its
real weights.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.ingest import make_catalog, run_ingest  # noqa: E402
from benchmarks.writer import SERVER_BINARY, milvus_server  # noqa: E402
from imgsearch.encoders import device_jpeg_decoder, load_torch_encoder  # noqa: E402
from imgsearch.encoders.jpeg_decoder import DeviceJpegDecoder  # noqa: E402
from imgsearch.images import load_image  # noqa: E402


def make_catalog_in_parallel(folder: Path, count: int, processes: int) -> Path:
    """make_catalog in `processes` parts (part_i/<photo>/), so thousands of camera-size JPEGs take seconds."""
    per_part = -(-count // processes)
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(make_catalog, [folder / f"part_{i:02d}" for i in range(processes)], [per_part] * processes, range(processes)))
    return folder


def encoder_only(encoder, tensors: torch.Tensor, batch_size: int) -> float:
    encoder.encode(tensors[:batch_size])  # warm-up: kernels, cuDNN autotune (encode returns host arrays: synced)
    started = time.perf_counter()
    for start in range(0, len(tensors), batch_size):
        encoder.encode(tensors[start : start + batch_size])  # returns host numpy: ends with a sync
    return len(tensors) / (time.perf_counter() - started)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--also", type=int, default=32000, help="a larger catalog for the same runs (0: none)")
    parser.add_argument("--server-uri", help="a running Milvus server; default: start .mv/bin/milvus-server if present")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--floor-images", type=int, default=4096)
    parser.add_argument("--lite0-weights", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imgsearch-gpu")
    parser.add_argument("--device", default="cuda", help="cpu only to rehearse this script on a small catalog")
    parser.add_argument("--baseline-code", type=Path, default=None, help="an older checkout's root: its Lite0 ingest is timed too")
    parser.add_argument("--models", default="lite0,vit", help="end-to-end runs for these (to fit a device budget)")
    parser.add_argument("--stores", default="lite,server", help="end-to-end runs into these")
    parser.add_argument("--decodes", default="cpu,gpu", help="end-to-end runs with JPEGs decoded here")
    parser.add_argument("--runs", help="instead of the three above, these end-to-end runs in this order, each "
                        "MODEL:IMAGES:STORE:DECODE[:WRITER] (lite0|vit, a count, lite|server, cpu|gpu, auto|thread|process), "
                        "e.g. lite0:8000:lite:gpu,vit:8000:server:cpu:thread")
    args = parser.parse_args()
    args.lite0_weights = args.lite0_weights.resolve() if args.lite0_weights else None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark checks and times the GPU path")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "none (rehearsal on the CPU)"
    print(f"GPU {name}, torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)

    chosen = [spec.split(":") for spec in args.runs.split(",")] if args.runs else None
    chosen = [spec + ["auto"] if len(spec) == 4 else spec for spec in chosen] if chosen else None
    if chosen and any(len(spec) != 5 or spec[0] not in ("lite0", "vit") or not spec[1].isdigit() or spec[2] not in ("lite", "server")
                      or spec[3] not in ("cpu", "gpu") or spec[4] not in ("auto", "thread", "process") for spec in chosen):
        raise SystemExit(f"--runs: each run is MODEL:IMAGES:STORE:DECODE[:WRITER], e.g. lite0:8000:lite:gpu; got {args.runs!r}")
    counts = sorted({args.images} | {int(spec[1]) for spec in chosen}) if chosen else [args.images] + ([args.also] if args.also else [])
    catalogs = {}
    for count in counts:
        started = time.perf_counter()
        catalogs[count] = make_catalog_in_parallel(args.work / f"catalog-{count}", count, min(16, os.cpu_count() or 2))
        print(f"catalog: {count} JPEGs (800x600 to 2000x1500) made in {time.perf_counter() - started:.1f} s", flush=True)
    catalog = catalogs[args.images]
    paths = sorted(catalog.rglob("*.jpg"))

    # 1. correctness, encoder level
    gpu = load_torch_encoder("efficientnet_lite0", weights=args.lite0_weights, device=args.device)
    cpu = load_torch_encoder("efficientnet_lite0", weights=args.lite0_weights, device="cpu")
    # nvJPEG on CUDA; the same code on the CPU (libjpeg) when rehearsing
    gpu_decoder = device_jpeg_decoder(gpu) if args.device == "cuda" else DeviceJpegDecoder(gpu.spec, "cpu", gpu.input_size)
    sample = torch.stack([gpu.preprocess(load_image(path, min_side=224)) for path in paths[:64]])
    on_gpu = gpu.encode(sample)  # 64 images: the CUDA-graph path on CUDA
    agreement = cosines(on_gpu, cpu.encode(sample))
    print(f"Lite0 GPU (bf16 autocast, CUDA graph) vs CPU float32, 64 images: min cosine {agreement.min():.5f}, "
          f"mean {agreement.mean():.5f} -> {'PASS' if agreement.min() >= 0.99 else 'FAIL'}", flush=True)
    gpu.cuda_graphs = False
    graph_vs_eager = cosines(on_gpu, gpu.encode(sample))
    gpu.cuda_graphs = True
    print(f"CUDA graph vs eager on the GPU: min cosine {graph_vs_eager.min():.6f} -> "
          f"{'PASS' if graph_vs_eager.min() >= 0.9999 else 'FAIL'}", flush=True)

    # 2. encoder only
    floor_paths = (paths * (args.floor_images // len(paths) + 1))[: args.floor_images]
    tensors = torch.stack([gpu.preprocess(load_image(path, min_side=224)) for path in floor_paths[:512]])
    tensors = tensors.repeat(max(1, args.floor_images // 512), 1, 1, 1)
    tensors = tensors.pin_memory() if args.device == "cuda" else tensors
    lite0_floor = encoder_only(gpu, tensors, args.batch_size)
    gpu.cuda_graphs = False
    lite0_eager_floor = encoder_only(gpu, tensors, args.batch_size)
    import open_clip

    vit_weights = args.work / "vit_b32_random_init.pt"
    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), vit_weights)
    vit = load_torch_encoder("open_clip:ViT-B-32", weights=vit_weights, device=args.device)
    vit_tensors = torch.stack([vit.preprocess(load_image(path, min_side=224)) for path in floor_paths[:512]])
    vit_tensors = vit_tensors.repeat(max(1, args.floor_images // 512), 1, 1, 1)
    vit_tensors = vit_tensors.pin_memory() if args.device == "cuda" else vit_tensors
    vit_floor = encoder_only(vit, vit_tensors, args.batch_size)
    print(f"encoder only, batch {args.batch_size}: Lite0 {lite0_floor:.0f} images/s (eager {lite0_eager_floor:.0f}), "
          f"ViT-B/32 (random init) {vit_floor:.0f} images/s", flush=True)
    del gpu, vit, tensors, vit_tensors
    if args.device == "cuda":
        torch.cuda.empty_cache()

    # 1b. nvJPEG against the CPU decode path, same files
    if gpu_decoder is None:
        print("FAIL: torchvision has no nvJPEG decoder on this device; ingest decodes every JPEG on the CPU", flush=True)
    else:
        from PIL import Image

        from imgsearch.ingest.torch_reader import byte_tensor

        datas = [path.read_bytes() for path in paths[:64]]
        sizes = [Image.open(path).size for path in paths[:64]]
        decoded, refused = gpu_decoder.decode([byte_tensor(data) for data in datas], [1] * len(datas), [w * h for w, h in sizes])
        lite_gpu = load_torch_encoder("efficientnet_lite0", weights=args.lite0_weights, device=args.device)
        nvjpeg = cosines(lite_gpu.encode(decoded), cpu.encode(sample))
        print(f"nvJPEG decode + GPU resize vs the CPU decode path, Lite0 vectors of {len(datas) - len(refused)} files: "
              f"min cosine {nvjpeg.min():.5f}, mean {nvjpeg.mean():.5f} -> {'PASS' if nvjpeg.min() >= 0.99 and not refused else 'FAIL'}",
              flush=True)
        del lite_gpu

    # 3. end to end
    wants_server = any(spec[2] == "server" for spec in chosen) if chosen else "server" in args.stores.split(",")
    if args.server_uri or not wants_server:
        server = contextlib.nullcontext(args.server_uri)
    else:  # the PyPI server where installed; else Milvus Lite's own server, in a process of its own
        server = milvus_server("milvus" if SERVER_BINARY.exists() else "lite")
    rows = []
    with server as server_uri:
        print(f"server rows: {args.server_uri or ('PyPI milvus-server' if SERVER_BINARY.exists() else 'milvus-lite server')}"
              f" at {server_uri}", flush=True)
        all_models = {"lite0": ("Lite0", "efficientnet_lite0", args.lite0_weights, lite0_floor),
                      "vit": ("ViT-B/32 (random init)", "open_clip:ViT-B-32", vit_weights, vit_floor)}
        models = [model for key, model in all_models.items() if key in args.models.split(",")]
        runs = []
        for label, model, weights, floor in models:
            runs += [(label, model, weights, floor, args.images, "lite", "cpu", "auto"),
                     (label, model, weights, floor, args.images, "lite", "gpu", "auto")]
            if server_uri:
                runs += [(label, model, weights, floor, count, "server", decode, "auto") for count in catalogs for decode in ("cpu", "gpu")]
            elif args.also:
                runs.append((label, model, weights, floor, args.also, "lite", "gpu", "auto"))
        runs = [run for run in runs if run[5] in args.stores.split(",") and run[6] in args.decodes.split(",")]
        if chosen:
            runs = [(*all_models[key], int(count), store, decode, writer) for key, count, store, decode, writer in chosen]
        if args.baseline_code:
            runs.append(("Lite0, baseline code", "efficientnet_lite0", args.lite0_weights, lite0_floor, args.images, "lite", "cpu", "auto"))
        for label, model, weights, floor, count, backend, decode, writer in runs:
            name = f"{model.replace(':', '_').replace('-', '_')}_{count}_{decode}"
            db = args.work / f"{name}.db"
            subprocess.run(["rm", "-rf", str(db), str(args.work / f"{name}.hashes")], check=True)
            uri = str(db) if backend == "lite" else server_uri
            extra = ("--model", model, "--device", args.device, "--runtime", "torch", "--workers", str(args.workers),
                     "--collection", f"bench_{name}_{backend}") + (("--weights", str(weights)) if weights else ())
            code = args.baseline_code.resolve() if label.endswith("baseline code") else ROOT
            seconds, report, peak = run_ingest(
                catalogs[count], uri, args.batch_size, "torch", extra,
                {"IMGSEARCH_GPU_DECODE": str(decode == "gpu").lower(), "IMGSEARCH_WRITER": writer},
                code=code, hash_cache=args.work / f"{name}.hashes",
            )
            stages = report["stages"]
            rows.append((label, count, backend, decode, seconds, report["indexed"] / seconds, report["images_per_second"], floor, peak))
            print(f"{label}, {count} images, {backend}, {decode} decode: indexed {report['indexed']} (failed "
                  f"{len(report['failed'])}, {report.get('gpu_decoded', 0)} decoded on the GPU) in {seconds:.1f} s whole "
                  f"process = {report['indexed'] / seconds:.0f} images/s; pipeline {report['images_per_second']:.0f} images/s; "
                  f"stages decode {stages['decode_seconds']:.1f} s (in {report['workers']} workers), encoder waited "
                  f"{stages['wait_seconds']:.1f} s, encode {stages['encode_seconds']:.1f} s, insert {stages['insert_seconds']:.1f} s "
                  f"({report.get('writer', 'thread')}); peak PSS {peak / 2**20:.0f} MiB", flush=True)
            if model == "efficientnet_lite0" and backend == "lite" and count == args.images and decode == "gpu":
                from imgsearch.store import MilvusStore

                with MilvusStore.open_existing(uri, f"bench_{name}_{backend}") as store:
                    stored = [row for _, row in zip(range(64), store.iter_rows(("id", "path", "vector")))]
                mine = cpu.encode(torch.stack([cpu.preprocess(load_image(row["path"], min_side=224)) for row in stored]))
                agreement = cosines(np.array([row["vector"] for row in stored]), mine)
                print(f"rows stored by the GPU ingest (GPU decode) vs CPU vectors of the same files ({len(stored)}): min cosine "
                      f"{agreement.min():.5f} -> {'PASS' if agreement.min() >= 0.99 else 'FAIL'}", flush=True)
            if backend == "server":
                from pymilvus import MilvusClient

                for attempt in (1, 2):  # Milvus Lite's server drops an idle client's channel (GOAWAY too_many_pings)
                    try:
                        MilvusClient(uri=server_uri).drop_collection(f"bench_{name}_{backend}")
                        break
                    except Exception as error:
                        print(f"dropping bench_{name}_{backend} (attempt {attempt}): {error}", flush=True)

    print("\n| model | images | store | JPEG decode | whole process s | whole process img/s | pipeline img/s | encoder only img/s | peak PSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, count, backend, decode, seconds, whole, pipeline, floor, peak in rows:
        print(f"| {label} | {count} | {backend} | {decode} | {seconds:.1f} | {whole:.0f} | {pipeline:.0f} | {floor:.0f} | {peak / 2**20:.0f} |")


if __name__ == "__main__":
    main()
