"""The CUDA path, checked and timed in one run (needs a GPU; prints what it measured).

    python benchmarks/gpu.py [--images 8000] [--batch-size 256] [--workers 15] [--lite0-weights PATH]

1. Correctness: Lite0 vectors on the GPU (bf16 autocast, channels_last) against the CPU in float32, per image;
   then rows stored by a GPU `imgsearch ingest` against CPU vectors of the same files. Both need cosine >= 0.99.
2. Encoder only: Lite0 and ViT-B/32 on preprocessed batches already in host memory (copy in, vectors out).
3. End to end: whole-process `imgsearch ingest` of camera-size JPEGs into a fresh Milvus Lite file, on CUDA.
ViT-B/32 runs with RANDOM-INIT weights written here (timing only: no ViT weights exist offline); Lite0 with its
real weights.
"""

from __future__ import annotations

import argparse
import json
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

from benchmarks.ingest import make_catalog  # noqa: E402
from imgsearch.encoders import load_torch_encoder  # noqa: E402
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


def ingest(
    catalog: Path, db: Path, model: str, weights: Path | None, batch_size: int, workers: int, device: str,
    code: Path = ROOT, env: dict | None = None,
) -> tuple[float, dict]:
    command = [sys.executable, "-m", "imgsearch.cli", "ingest", str(catalog), "--uri", str(db), "--json", "--model", model,
               "--device", device, "--runtime", "torch", "--batch-size", str(batch_size), "--workers", str(workers)]
    if weights:
        command += ["--weights", str(weights)]
    started = time.perf_counter()
    environment = {**os.environ, **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, cwd=code, env=environment)  # `-m` imports from cwd first
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"ingest {model} failed:\n{result.stderr[-3000:]}")
    return seconds, json.loads(result.stdout)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--floor-images", type=int, default=4096)
    parser.add_argument("--lite0-weights", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imgsearch-gpu")
    parser.add_argument("--device", default="cuda", help="cpu only to rehearse this script on a small catalog")
    parser.add_argument("--baseline-code", type=Path, default=None, help="an older checkout's root: its Lite0 ingest is timed too")
    args = parser.parse_args()
    args.lite0_weights = args.lite0_weights.resolve() if args.lite0_weights else None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark checks and times the GPU path")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "none (rehearsal on the CPU)"
    print(f"GPU {name}, torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    catalog = make_catalog_in_parallel(args.work / "catalog", args.images, min(16, os.cpu_count() or 2))
    paths = sorted(catalog.rglob("*.jpg"))
    print(f"catalog: {len(paths)} JPEGs (800x600 to 2000x1500) made in {time.perf_counter() - started:.1f} s", flush=True)

    # 1. correctness, encoder level
    gpu = load_torch_encoder("efficientnet_lite0", weights=args.lite0_weights, device=args.device)
    cpu = load_torch_encoder("efficientnet_lite0", weights=args.lite0_weights, device="cpu")
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

    # 3. end to end
    rows = []
    eager = {"IMGSEARCH_CUDA_GRAPHS": "false"}
    runs = [("Lite0", "efficientnet_lite0", args.lite0_weights, lite0_floor, ROOT, {}),
            ("Lite0, eager (no CUDA graphs)", "efficientnet_lite0", args.lite0_weights, lite0_floor, ROOT, eager)]
    if args.baseline_code:
        runs.append(("Lite0, baseline code", "efficientnet_lite0", args.lite0_weights, lite0_floor, args.baseline_code.resolve(), {}))
    runs.append(("ViT-B/32 (random init)", "open_clip:ViT-B-32", vit_weights, vit_floor, ROOT, {}))
    runs.append(("ViT-B/32 (random init), eager", "open_clip:ViT-B-32", vit_weights, vit_floor, ROOT, eager))
    for label, model, weights, floor, code, env in runs:
        db = args.work / f"{model.replace(':', '_').replace('-', '_')}.db"
        subprocess.run(["rm", "-rf", str(db)], check=True)
        seconds, report = ingest(catalog, db, model, weights, args.batch_size, args.workers, args.device, code, env)
        stages = report["stages"]
        rows.append((label, report["indexed"], seconds, report["indexed"] / seconds, report["images_per_second"], floor))
        print(f"{label}: indexed {report['indexed']} (failed {len(report['failed'])}) in {seconds:.1f} s whole process = "
              f"{report['indexed'] / seconds:.0f} images/s; pipeline {report['images_per_second']:.0f} images/s; "
              f"stages decode {stages['decode_seconds']:.1f} s (in {report['workers']} workers), encoder waited "
              f"{stages['wait_seconds']:.1f} s, encode {stages['encode_seconds']:.1f} s, insert {stages['insert_seconds']:.1f} s", flush=True)
        if label == "Lite0":
            from imgsearch.store import MilvusStore

            with MilvusStore.open_existing(str(db), "imgsearch_efficientnet_lite0") as store:
                stored = [row for _, row in zip(range(64), store.iter_rows(("id", "path", "vector")))]
            mine = cpu.encode(torch.stack([cpu.preprocess(load_image(row["path"], min_side=224)) for row in stored]))
            agreement = cosines(np.array([row["vector"] for row in stored]), mine)
            print(f"rows stored by the GPU ingest vs CPU vectors of the same files ({len(stored)}): min cosine "
                  f"{agreement.min():.5f} -> {'PASS' if agreement.min() >= 0.99 else 'FAIL'}", flush=True)

    print("\n| model | images | whole process s | whole process img/s | pipeline img/s | encoder only img/s | pipeline / encoder |")
    print("|---|---|---|---|---|---|---|")
    for label, count, seconds, whole, pipeline, floor in rows:
        print(f"| {label} | {count} | {seconds:.1f} | {whole:.0f} | {pipeline:.0f} | {floor:.0f} | {pipeline / floor:.2f} |")


if __name__ == "__main__":
    main()
