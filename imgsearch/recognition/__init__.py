"""Recognition: a label for each image, or "unknown". The modules form one-way layers, each importing only those
above it in this list (tests/test_import_graph.py holds it so):

- scoring.py: the arithmetic, numpy only (local prototypes, the count prior, the decision, leave-one-out scoring);
- abstention.py: when to answer "unknown" (the threshold eval stored, the self-calibrated one, and its recomputation);
- enrolment_check.py: what an enrolment did to recognition;
- review.py: unknown queries kept for review, and enrolling them;
- knn.py: recognition by the labeled neighbours in Milvus;
- head.py: classifier heads (torch);
- this module: the dispatcher CLI and API call.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from imgsearch.config import RecognitionMethod
from imgsearch.recognition.abstention import Abstention, resolve_abstention
from imgsearch.recognition.knn import Recognition, recognize_paths
from imgsearch.recognition.review import review_store
from imgsearch.recognition.scoring import DEFAULT_K
from imgsearch.store import MilvusStore

if TYPE_CHECKING:
    from imgsearch.encoders import Encoder


def recognize_images(
    encoder: Encoder,
    store: MilvusStore,
    paths: Iterable[str | Path],
    settings,
    *,
    method: RecognitionMethod | str = RecognitionMethod.knn,
    k: int = DEFAULT_K,
    head: Path | None = None,
    keep_unknown: bool = False,
) -> tuple[list[Recognition], list[dict[str, str]], Abstention]:
    """Recognise every image under `paths` by k-NN over the labeled references or with a trained head (default
    file: heads/<collection>-linear). Returns the recognitions, the unreadable files, and the abstention rule that
    applied (threshold, margin and where they came from). `keep_unknown` (k-NN only): the images answered "unknown"
    are kept for review (review.py)."""
    if RecognitionMethod(method) is RecognitionMethod.head:
        from imgsearch.recognition.head import default_head_path, recognize_paths_with_head  # torch: only heads need it

        return recognize_paths_with_head(
            encoder, store, head or default_head_path(store.collection, "linear"), paths, threshold=settings.threshold,
            weights=settings.weights, device=settings.device, max_pixels=settings.max_image_pixels,
        )
    abstention = resolve_abstention(store, settings.threshold)
    review = review_store(store) if keep_unknown else None
    try:
        recognitions, failed = recognize_paths(
            encoder, store, paths, k=k, abstention=abstention, max_pixels=settings.max_image_pixels, review=review,
            review_max=settings.review_max,
        )
    finally:
        if review is not None:
            review.close()
    return recognitions, failed, abstention
