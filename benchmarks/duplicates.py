"""Near-duplicate detection: calibration on edited copies of real photos, and the time of `find_duplicates`.

    python benchmarks/duplicates.py                       # calibration (the default encoder, Milvus Lite)
    python benchmarks/duplicates.py --timing 10000 100000 --uri http://127.0.0.1:19530

Calibration: 19 scikit-image photos, each edited 15 ways (JPEG quality 30-95, resize 0.3-0.75, crops of 10 and 20%,
rotation by 90 and 180 degrees, flips, colour shifts), next to the 300 Fashion-MNIST images of the sample catalog as
distractors. A pair is a true near-duplicate when both images come from the same photo. It prints precision and
recall of "cosine >= T" over all pairs for a range of T, recall per kind of edit, and then the grades that
`imgsearch duplicates` (find_duplicates through Milvus) gives with the default thresholds.

Timing: clustered random unit vectors (groups of 1-4 near copies) inserted into a fresh collection, then (on a
server, once its index covers every row) one find_duplicates over all of them; prints rows, groups and seconds.
With --memory, the scan runs a second time under tracemalloc and its peak of Python memory is printed (the time of
that run is not the figure: tracemalloc slows allocation).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from imgsearch.duplicates import NEAR_IDENTICAL, SIMILAR, find_duplicates
from imgsearch.encoders import load_encoder
from imgsearch.store import ImageRecord, MilvusStore

PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "coins", "colorwheel", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "logo", "moon", "page", "rocket", "text", "horse", "clock", "retina",
)
CATALOG = Path(__file__).resolve().parents[1] / "examples" / "catalog"


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop(image: Image.Image, fraction: float, corner: bool) -> Image.Image:
    width, height = image.size
    dx, dy = int(width * fraction), int(height * fraction)
    return image.crop((dx, dy, width, height) if corner else (dx // 2, dy // 2, width - dx // 2, height - dy // 2))


def resize(image: Image.Image, scale: float) -> Image.Image:
    return image.resize((max(16, int(image.width * scale)), max(16, int(image.height * scale))), Image.BICUBIC)


EDITS = {
    "jpeg q30": lambda im: jpeg(im, 30),
    "jpeg q60": lambda im: jpeg(im, 60),
    "jpeg q95": lambda im: jpeg(im, 95),
    "resize 0.3": lambda im: resize(im, 0.3),
    "resize 0.5": lambda im: resize(im, 0.5),
    "resize 0.75": lambda im: resize(im, 0.75),
    "crop 10% centre": lambda im: crop(im, 0.10, corner=False),
    "crop 20% corner": lambda im: crop(im, 0.20, corner=True),
    "rotate 90": lambda im: im.transpose(Image.ROTATE_90),
    "rotate 180": lambda im: im.transpose(Image.ROTATE_180),
    "flip left-right": ImageOps.mirror,
    "flip top-bottom": ImageOps.flip,
    "brightness +15%": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
    "saturation -20%": lambda im: ImageEnhance.Color(im).enhance(0.8),
    "resize 0.5 + jpeg q50 + crop 10%": lambda im: jpeg(crop(resize(im, 0.5), 0.10, corner=False), 50),
}


def build_set() -> tuple[list[Image.Image], list[int], list[str]]:
    """Images, the photo each comes from (-1: a distractor), and the edit that made it ("original", "distractor")."""
    from skimage import data

    images, sources, kinds = [], [], []
    for index, name in enumerate(PHOTOS):
        original = Image.fromarray(getattr(data, name)()).convert("RGB")
        for kind, edit in {"original": lambda im: im, **EDITS}.items():
            images.append(edit(original))
            sources.append(index)
            kinds.append(kind)
    for path in sorted(CATALOG.glob("*/*.png")):
        images.append(Image.open(path).convert("RGB"))
        sources.append(-1)
        kinds.append("distractor")
    return images, sources, kinds


def calibrate(args) -> None:
    encoder = load_encoder("efficientnet_lite0", device="cpu", runtime="onnx")
    print(f"encoder: {encoder.name} {encoder.precision} (onnxruntime) for every image, and the collection made here records it")
    images, sources, kinds = build_set()
    vectors = np.concatenate([encoder.encode_images(images[i : i + 64]) for i in range(0, len(images), 64)])
    sources_array = np.array(sources)
    similarity = vectors @ vectors.T
    upper = np.triu_indices(len(images), 1)
    scores = similarity[upper]
    same = (sources_array[upper[0]] == sources_array[upper[1]]) & (sources_array[upper[0]] >= 0)
    print(f"{len(images)} images ({len(PHOTOS)} photos x {len(EDITS) + 1}, {sources.count(-1)} distractors), "
          f"{len(scores)} pairs, {int(same.sum())} true near-duplicate pairs; {platform.machine()}, {os.cpu_count()} cores")
    print("\nthreshold  precision  recall   (over all pairs: cosine >= threshold means near-duplicate)")
    for threshold in (0.70, 0.75, 0.80, 0.85, 0.88, 0.90, 0.92, 0.95):
        predicted = scores >= threshold
        precision = (predicted & same).sum() / max(predicted.sum(), 1)
        recall = (predicted & same).sum() / max(same.sum(), 1)
        print(f"  {threshold:.2f}     {precision:.4f}     {recall:.4f}")
    negatives = scores[~same]
    print(f"\nunrelated pairs: max cosine {negatives.max():.4f}, 99.9th percentile {np.quantile(negatives, 0.999):.4f}")
    print(f"\nrecall per edit at the near-identical threshold {NEAR_IDENTICAL} (cosine to its original):")
    originals = {source: i for i, (source, kind) in enumerate(zip(sources, kinds)) if kind == "original"}
    for kind in EDITS:
        members = [i for i, k in enumerate(kinds) if k == kind]
        cosines = np.array([similarity[i, originals[sources[i]]] for i in members])
        print(f"  {kind:34s} recall {np.mean(cosines >= NEAR_IDENTICAL):.3f}  (min {cosines.min():.3f}, median {np.median(cosines):.3f})")
    through_milvus(encoder, vectors, sources, kinds, args.uri)


def through_milvus(encoder, vectors: np.ndarray, sources: list[int], kinds: list[str], uri: str | None) -> None:
    """The grades `imgsearch duplicates` gives with the default thresholds, through a real collection."""
    with tempfile.TemporaryDirectory() as tmp:
        store = MilvusStore(uri or str(Path(tmp) / "dups.db"), f"dups_{uuid.uuid4().hex[:8]}", model=encoder.name, dim=encoder.dim, precision=encoder.precision)
        ids = [f"{i:064x}" for i in range(len(vectors))]
        store.upsert([ImageRecord(id=ids[i], vector=vectors[i], path=f"/set/{i:04d}-{kinds[i]}.png") for i in range(len(vectors))])
        store.flush()
        report = find_duplicates(store)
        index = {image_id: i for i, image_id in enumerate(ids)}
        graded = [(index[g.representative["id"]], index[m.id], m.grade) for g in report.groups for m in g.members]
        near = [(a, b) for a, b, grade in graded if grade == "near-identical"]
        correct = sum(sources[a] == sources[b] and sources[a] >= 0 for a, b in near)
        edits = [i for i, kind in enumerate(kinds) if kind in EDITS]
        found = {b for a, b in near if sources[a] == sources[b]} | {a for a, b in near if sources[a] == sources[b]}
        print(f"\nfind_duplicates (near-identical >= {NEAR_IDENTICAL}, similar >= {SIMILAR}): {len(report.groups)} groups "
              f"in {report.seconds:.2f} s; near-identical members: {len(near)}, precision {correct / max(len(near), 1):.4f}; "
              f"edited copies grouped near-identical with their photo: {len(found & set(edits))}/{len(edits)} "
              f"(recall {len(found & set(edits)) / len(edits):.4f}); similar members: {sum(g == 'similar' for *_, g in graded)}")
        if uri:
            store.client.drop_collection(store.collection)
        store.close()


def timing(args) -> None:
    rng = np.random.default_rng(0)
    for rows in args.timing:
        dim = 1280
        centres = rng.standard_normal((rows // 2, dim)).astype(np.float32)
        copies = rng.integers(1, 4, size=len(centres))
        vectors = np.repeat(centres, copies, axis=0)[:rows]
        vectors += rng.standard_normal(vectors.shape).astype(np.float32) * 0.01
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with tempfile.TemporaryDirectory() as tmp:
            uri = args.uri or str(Path(tmp) / "timing.db")
            store = MilvusStore(uri, f"dups_timing_{uuid.uuid4().hex[:8]}", model="random", dim=dim, precision="fp32")
            started = time.perf_counter()
            for start in range(0, len(vectors), 2000):
                store.upsert([ImageRecord(id=f"{i:064x}", vector=vectors[i], path=f"/t/{i}.jpg") for i in range(start, min(start + 2000, len(vectors)))])
            store.flush()
            inserted = time.perf_counter() - started
            indexed = wait_for_index(store, len(vectors)) if args.uri else 0.0
            report = find_duplicates(store)
            waited = f", index built {indexed:.0f} s later" if args.uri else ""
            peak = ""
            if args.memory:
                tracemalloc.start()
                find_duplicates(store)
                peak = f", Python memory peak {tracemalloc.get_traced_memory()[1] / 1e6:.0f} MB"
                tracemalloc.stop()
            print(f"{'server' if args.uri else 'Milvus Lite'}: {len(vectors)} rows (inserted in {inserted:.0f} s{waited}): "
                  f"find_duplicates {report.seconds:.1f} s, {len(report.groups)} groups{peak}")
            if args.uri:
                store.client.drop_collection(store.collection)
            store.close()


def wait_for_index(store: MilvusStore, rows: int, limit: float = 900) -> float:
    """Seconds until the server's index covers every row: searches of a steady collection, not of fresh segments."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        if store.client.describe_index(store.collection, "vector").get("indexed_rows", 0) >= rows:
            break
        time.sleep(2)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", help="a Milvus server URI; default: a temporary Milvus Lite file")
    parser.add_argument("--timing", type=int, nargs="*", help="time find_duplicates at these row counts instead")
    parser.add_argument("--memory", action="store_true", help="with --timing: also the scan's peak of Python memory")
    args = parser.parse_args()
    timing(args) if args.timing else calibrate(args)


if __name__ == "__main__":
    main()
