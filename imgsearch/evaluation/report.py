"""The evaluation report: report.json, the figure, and the summary rows the CLI prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, figure_path = out / "report.json", out / "report.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_report(report, figure_path)
    return json_path, figure_path


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curve_axes, matrix_axes) = plt.subplots(1, 2, figsize=(13, 5.5))
    curve = report.get("n_shot", {})
    if curve:
        shots = [int(n) for n in curve]
        means = [curve[n]["mean"] for n in curve]
        stds = [curve[n]["std"] for n in curve]
        curve_axes.errorbar(shots, means, yerr=stds, marker="o", capsize=4)
        curve_axes.set_xscale("log")
        curve_axes.set_xticks(shots, [str(n) for n in shots])
    curve_axes.set_xlabel("shots per class")
    curve_axes.set_ylabel("accuracy")
    curve_axes.set_ylim(0, 1)
    curve_axes.grid(alpha=0.3)
    curve_axes.set_title(f"n-shot accuracy ({report['encoder']}, k={report['settings']['k']})")
    matrix = np.array(report["confusion"], dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    matrix_axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    classes = report["classes"]
    matrix_axes.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    matrix_axes.set_yticks(range(len(classes)), classes, fontsize=8)
    matrix_axes.set_xlabel("predicted")
    matrix_axes.set_ylabel("true")
    matrix_axes.set_title(f"confusion (accuracy {report['accuracy']:.3f})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(measure, value) rows for a terminal table."""
    rows = [("references / queries", f"{report['references']} / {report['queries']}")]
    rows += [(f"k-NN accuracy k={k}", f"{v:.4f}") for k, v in report["knn_accuracy"].items()]
    rows += [(f"{n}-shot accuracy", f"{v['mean']:.4f} ± {v['std']:.4f} ({v['episodes']} episodes)") for n, v in report["n_shot"].items()]
    for mode, values in report["head"].items():
        rows.append((f"{mode} head accuracy", f"{values['accuracy']:.4f}"))
    open_set = report["open_set"]
    if "auroc" in open_set:
        rows.append((f"open-set AUROC ({', '.join(open_set['unknown_classes'])} unknown)", f"{open_set['auroc']:.4f}"))
        rows.append(
            (f"threshold at false-accept {open_set['target_false_accept_rate']}",
             f"{open_set['threshold']:.4f} (accepts {open_set['known_accept_rate']:.3f} of known queries)")
        )
    late = report["late_enrolment"]
    if "new_class_accuracy" in late:
        drop = f"earlier classes drop {late['earlier_classes_drop']:+.4f}"
        rows.append((f"class enrolled later, {late['shots']} shots", f"{late['new_class_accuracy']:.4f} ({drop})"))
    return rows
