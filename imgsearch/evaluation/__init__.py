"""`imgsearch eval`: how well recognition works on a labeled set, with the same scoring as `recognize`.

References and queries are encoded once; neighbours are found exactly in memory (a Milvus search returns the same
neighbours up to index recall). protocols.py runs the measures, metrics.py scores, report.py writes the results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgsearch.config import Settings
from imgsearch.evaluation.metrics import auroc, confusion_matrix, predict, threshold_at_false_accept_rate
from imgsearch.evaluation.protocols import (
    EncodedSplit,
    EvalOptions,
    Progress,
    check_options,
    encode_set,
    evaluate,
    evaluate_encoded,
    finetune_accuracy,
    late_enrolment,
    load_splits,
    load_validation,
    n_shot_curve,
    open_set,
    parse_int_list,
)
from imgsearch.evaluation.report import summary_rows, write_report

__all__ = [
    "EncodedSplit", "EvalOptions", "auroc", "check_options", "confusion_matrix", "encode_set", "evaluate",
    "evaluate_and_calibrate", "evaluate_encoded", "finetune_accuracy", "late_enrolment", "load_splits", "load_validation",
    "n_shot_curve", "open_set", "parse_int_list", "predict",
    "summary_rows", "threshold_at_false_accept_rate", "write_report",
]


def evaluate_and_calibrate(
    settings: Settings, dataset: str, options: EvalOptions, out: Path, *, calibrate: bool = True,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], Path, Path]:
    """Measure recognition on `dataset`; with `calibrate`, store the open-set threshold with the settings'
    collection (created when missing), where `recognize` finds it. Returns the report and the files written."""
    from imgsearch.recognition.abstention import Calibration, save_calibration
    from imgsearch.session import open_encoder, open_session

    check_options(options)
    if calibrate:
        encoder, store = open_session(settings)
    else:
        encoder, store = open_encoder(settings), None
    report = evaluate(encoder, dataset, options, weights=settings.weights, progress=progress)
    threshold = report["open_set"].get("threshold")
    if store is not None:
        with store:
            if threshold is not None:
                save_calibration(store, Calibration(threshold, options.false_accept_rate, dataset, options.k))
                report["calibration"] = {"collection": settings.collection_name, "threshold": threshold}
    json_path, figure_path = write_report(report, out)
    return report, json_path, figure_path
