"""Duplicates: embedding candidates, pixel verification, and the time of `find_duplicates`.

    python benchmarks/duplicates.py                       # calibration (the default encoder, Milvus Lite)
    python benchmarks/duplicates.py --timing 10000 100000 --uri http://127.0.0.1:19530

Calibration: 19 scikit-image photos, each edited 15 ways (JPEG quality 30-95, resize 0.3-0.75, crops of 10 and 20%,
rotation by 90 and 180 degrees, flips, colour shifts), next to the 300 Fashion-MNIST images of the sample catalog and
--products (2,000) more Fashion-MNIST products as look-alike distractors (different products of one class look
alike; none is a pixel copy of another). A pair is a true copy when both images come from the same photo. It prints
precision and recall over all pairs for: the embedding alone ("cosine >= T"); each pixel check alone on the
candidate pairs (the flip/rotation hash check, the crop check); both stages as `imgsearch duplicates` runs them
(find_duplicates through Milvus Lite on files written to a temporary folder), per grade and per kind of edit.

Timing: clustered random unit vectors (groups of 1-4 near copies), each row with a small real image file (a copy
re-encoded from its group's picture), inserted into a fresh collection, then (on a server, once its index covers
every row) one find_duplicates over all of them; prints rows, candidate and verified pairs, groups and seconds.
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

from imgsearch.config import CANDIDATES, SIMILAR
from imgsearch.duplicates import EDITED, IDENTICAL, LOOKALIKE, NEIGHBOURS, find_duplicates
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


def build_set(products: int = 0) -> tuple[list[Image.Image], list[int], list[str]]:
    """Images, the photo each comes from (< 0: a distractor, each its own), and the edit that made it ("original",
    "distractor" for the sample catalog's, "product" for `products` more Fashion-MNIST images, none a pixel copy of
    another image here)."""
    from skimage import data

    images, sources, kinds = [], [], []
    for index, name in enumerate(PHOTOS):
        original = Image.fromarray(getattr(data, name)()).convert("RGB")
        for kind, edit in {"original": lambda im: im, **EDITS}.items():
            images.append(edit(original))
            sources.append(index)
            kinds.append(kind)
    seen = set()
    for path in sorted(CATALOG.glob("*/*.png")):
        images.append(Image.open(path).convert("RGB"))
        seen.add(images[-1].tobytes())
        sources.append(-1 - len(seen))
        kinds.append("distractor")
    if products:
        from imgsearch.datasets import fashion_mnist

        train = fashion_mnist("train")
        for index in np.random.default_rng(0).permutation(len(train.sources)):
            image = train.sources[index]()
            if image.tobytes() not in seen:
                seen.add(image.tobytes())
                images.append(image)
                sources.append(-1 - len(seen))
                kinds.append("product")
            if kinds.count("product") == products:
                break
    return images, sources, kinds


def calibrate(args) -> None:
    encoder = load_encoder("efficientnet_lite0", device="cpu", runtime="onnx")
    print(f"encoder: {encoder.name} {encoder.precision} (onnxruntime) for every image, and the collection made here records it")
    images, sources, kinds = build_set(args.products)
    vectors = np.concatenate([encoder.encode_images(images[i : i + 64]) for i in range(0, len(images), 64)])
    sources_array = np.array(sources)
    similarity = vectors @ vectors.T
    upper = np.triu_indices(len(images), 1)
    scores = similarity[upper]
    same = sources_array[upper[0]] == sources_array[upper[1]]
    print(f"{len(images)} images ({len(PHOTOS)} photos x {len(EDITS) + 1}, {kinds.count('distractor')} sample-catalog and "
          f"{kinds.count('product')} more Fashion-MNIST products), {len(scores)} pairs, {int(same.sum())} true copy pairs; "
          f"{platform.machine()}, {os.cpu_count()} cores")
    print("\n1. Embedding alone: cosine >= threshold means a copy (over all pairs)")
    print("threshold  precision  recall")
    for threshold in (0.50, 0.70, 0.80, 0.85, 0.88, 0.90, 0.92, 0.95):
        predicted = scores >= threshold
        print(f"  {threshold:.2f}     {(predicted & same).sum() / max(predicted.sum(), 1):.4f}     {(predicted & same).sum() / max(same.sum(), 1):.4f}")
    negatives = scores[~same]
    print(f"unrelated pairs: max cosine {negatives.max():.4f}, 99.9th percentile {np.quantile(negatives, 0.999):.4f}")
    originals = {source: i for i, (source, kind) in enumerate(zip(sources, kinds)) if kind == "original"}
    edited = {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in EDITS}
    at_90 = {kind: np.mean([similarity[i, originals[sources[i]]] >= 0.90 for i in members]) for kind, members in edited.items()}
    pixel_checks(images, sources, similarity, int(same.sum()), originals, edited, at_90)
    through_milvus(encoder, images, vectors, sources, kinds, args.uri, edited)


def candidate_pairs(similarity: np.ndarray, threshold: float = CANDIDATES, neighbours: int = NEIGHBOURS) -> set[tuple[int, int]]:
    """What find_duplicates's first stage keeps: each image's k nearest at or above the threshold."""
    masked = similarity.copy()
    np.fill_diagonal(masked, -np.inf)
    nearest = np.argsort(-masked, axis=1)[:, :neighbours]
    return {(min(i, j), max(i, j)) for i in range(len(masked)) for j in nearest[i] if masked[i, j] >= threshold}


def pixel_checks(images, sources, similarity, total_true: int, originals, edited, at_90) -> None:
    """Each pixel check alone on the candidate pairs, and both: precision over the candidate pairs each accepts,
    recall of each kind of edit against its original."""
    from imgsearch.verification import HASH_MAX_BITS, signature, verify

    started = time.perf_counter()
    signatures = [signature(image) for image in images]
    decoded = time.perf_counter() - started
    candidates = candidate_pairs(similarity)
    true = {pair for pair in candidates if sources[pair[0]] == sources[pair[1]]}
    started = time.perf_counter()
    accepted = {pair: verify(signatures[pair[0]], signatures[pair[1]]) for pair in candidates}
    checked = time.perf_counter() - started
    methods = {
        "flip/rotation hash check": lambda match: match is not None and match.crop is None,
        "crop check": lambda match: match is not None and match.crop is not None,
        "both (the default)": lambda match: match is not None,
    }
    print(f"\n2. Pixel checks on the {len(candidates)} candidate pairs (cosine >= {CANDIDATES}, {NEIGHBOURS} nearest each; "
          f"{len(true)} of them true copies). Signatures {decoded / len(images) * 1e3:.2f} ms per image from decoded "
          f"images; checks {checked / len(candidates) * 1e3:.3f} ms per pair. The crop check runs only where the hash "
          f"check (<= {HASH_MAX_BITS} bits, gradient correlation) fails, so alone it is counted on those pairs.")
    print("check                      pairs accepted  precision  recall of all true pairs")
    for name, accepts in methods.items():
        taken = {pair for pair, match in accepted.items() if accepts(match)}
        print(f"  {name:26s} {len(taken):8d}      {len(taken & true) / max(len(taken), 1):.4f}     "
              f"{len(taken & true) / total_true:.4f}")
    print("\nrecall of each edit against its original: embedding >= 0.90 | candidate found | verified (both checks)")
    for kind, members in edited.items():
        pairs = [(min(i, originals[sources[i]]), max(i, originals[sources[i]])) for i in members]
        found = np.mean([pair in candidates for pair in pairs])
        verified = np.mean([accepted.get(pair) is not None for pair in pairs])
        print(f"  {kind:34s} {at_90[kind]:.3f} | {found:.3f} | {verified:.3f}")


def through_milvus(encoder, images, vectors: np.ndarray, sources: list[int], kinds: list[str], uri: str | None, edited) -> None:
    """The grades `imgsearch duplicates` gives with its defaults, through a real collection of real files."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, image in enumerate(images):
            paths.append(str(Path(tmp) / f"{i:04d}-{kinds[i]}.png"))
            image.save(paths[-1])
        store = MilvusStore(uri or str(Path(tmp) / "dups.db"), f"dups_{uuid.uuid4().hex[:8]}", model=encoder.name, dim=encoder.dim, precision=encoder.precision)
        ids = [f"{i:064x}" for i in range(len(vectors))]
        store.upsert([ImageRecord(id=ids[i], vector=vectors[i], path=paths[i]) for i in range(len(vectors))])
        store.flush()
        report = find_duplicates(store, include_similar=True)
        index = {image_id: i for i, image_id in enumerate(ids)}
        print(f"\n3. Both stages through Milvus (find_duplicates, its defaults: candidates >= {CANDIDATES}, similar >= {SIMILAR}): "
              f"{len(report.groups)} groups, {report.candidate_pairs} candidate pairs, {report.verified_pairs} verified, "
              f"in {report.seconds:.2f} s (verifying {report.verifying_seconds:.2f} s); {report.unreadable_count} unreadable")
        print("grade                 members  pair precision (representative and member from one photo)")
        for grade, groups in ((IDENTICAL, report.groups), (EDITED, report.groups), (LOOKALIKE, report.lookalikes)):
            graded = [(index[g.representative["id"]], index[m.id]) for g in groups for m in g.members if m.grade == grade]
            right = sum(sources[a] == sources[b] for a, b in graded)
            print(f"  {grade:20s} {len(graded):7d}  {right / len(graded):.4f}" if graded else f"  {grade:20s}       0  -")
        default = [(index[g.representative["id"]], index[m.id]) for g in report.groups for m in g.members]
        right = sum(sources[a] == sources[b] for a, b in default)
        found = {i for pair in default if sources[pair[0]] == sources[pair[1]] for i in pair}
        copies = [i for members in edited.values() for i in members]
        print(f"default output (what `delete --from-json` takes): {len(default)} pairs, precision {right / max(len(default), 1):.4f}; "
              f"edited copies grouped with their photo: {len(found & set(copies))}/{len(copies)} (recall {len(found & set(copies)) / len(copies):.4f})")
        print("per kind of edit, grouped with its photo:")
        for kind, members in edited.items():
            print(f"  {kind:34s} {len(found & set(members)) / len(members):.3f}")
        wrong = [(kinds[a], kinds[b], m.evidence) for g in report.groups for m in g.members
                 if sources[(a := index[g.representative["id"]])] != sources[(b := index[m.id])]]
        print(f"wrong pairs in the default output: {wrong[:10]}")
        if uri:
            store.client.drop_collection(store.collection)
        store.close()


def timing(args) -> None:
    rng = np.random.default_rng(0)
    for rows in args.timing:
        dim = 1280
        centres = rng.standard_normal((rows // 2, dim)).astype(np.float32)
        copies = rng.integers(1, 4, size=len(centres))
        group = np.repeat(np.arange(len(centres)), copies)[:rows]
        vectors = centres[group] + rng.standard_normal((len(group), dim)).astype(np.float32) * 0.01
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            paths = write_group_files(Path(tmp), group, rng)
            print(f"{len(paths)} files written in {time.perf_counter() - started:.0f} s", flush=True)
            uri = args.uri or str(Path(tmp) / "timing.db")
            store = MilvusStore(uri, f"dups_timing_{uuid.uuid4().hex[:8]}", model="random", dim=dim, precision="fp32")
            started = time.perf_counter()
            for start in range(0, len(vectors), 2000):
                store.upsert([ImageRecord(id=f"{i:064x}", vector=vectors[i], path=paths[i]) for i in range(start, min(start + 2000, len(vectors)))])
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
                  f"find_duplicates {report.seconds:.1f} s (verifying {report.verifying_seconds:.1f} s), {report.candidate_pairs} candidate "
                  f"pairs, {report.verified_pairs} verified, {len(report.groups)} groups{peak}", flush=True)
            if args.uri:
                store.client.drop_collection(store.collection)
            store.close()


def write_group_files(folder: Path, group: np.ndarray, rng: np.random.Generator) -> list[str]:
    """A 160 x 120 JPEG per row: each group's picture (smooth random shapes), its copies re-encoded at another
    quality, so the pixel check has real files of a catalog-like size to read."""
    paths, picture, previous = [], None, -1
    for row, number in enumerate(group):
        if number != previous:
            small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
            picture, previous, quality = Image.fromarray(small).resize((160, 120), Image.BICUBIC), number, 90
        paths.append(str(folder / f"{row:07d}.jpg"))
        picture.save(paths[-1], "JPEG", quality=quality)
        quality -= 20
    return paths


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
    parser.add_argument("--products", type=int, default=2000, help="Fashion-MNIST look-alike products added to the calibration set")
    args = parser.parse_args()
    timing(args) if args.timing else calibrate(args)


if __name__ == "__main__":
    main()
