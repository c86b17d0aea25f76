"""Quantization error reports: per tensor, per layer, per tensor kind; several packs side by side.

The converter records one row per expert projection per layer (aggregated over all experts) and one
per resident tensor. ``report.json`` keeps the raw sums (so aggregates are exact) and the derived
figures; ``report.csv`` is the same rows, flat. :func:`format_comparison` and :func:`plot_comparison`
put packs of different bit widths next to each other (``moestream report P2 P4``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from .errors import ErrorStats

REPORT_JSON, REPORT_CSV = "report.json", "report.csv"
CSV_FIELDS = [
    "layer",
    "tensor",
    "kind",
    "bits",
    "group_size",
    "method",
    "params",
    "rmse",
    "rel_rmse",
    "max_abs",
    "snr_db",
]


def report_row(
    layer: int | None, tensor: str, kind: str, bits: int, group_size: int | None, method: str, stats: ErrorStats
) -> dict:
    """One report row: identification, derived figures and the raw sums."""
    return {
        "layer": layer,
        "tensor": tensor,
        "kind": kind,
        "bits": bits,
        "group_size": group_size,
        "method": method,
        "params": stats.count,
        "rmse": stats.rmse,
        "rel_rmse": _finite(stats.rel_rmse),
        "max_abs": stats.max_abs,
        "snr_db": _finite(stats.snr_db),
        "sums": stats.to_dict(),
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _stats(row: dict) -> ErrorStats:
    return ErrorStats.from_dict(row["sums"])


def aggregate(rows: list[dict], key) -> dict:
    """Merge rows' error sums by ``key(row)``; returns {key: ErrorStats}."""
    out: dict = {}
    for r in rows:
        k = key(r)
        out.setdefault(k, ErrorStats()).merge(_stats(r))
    return out


def build_report(rows: list[dict], meta: dict) -> dict:
    """rows + per-layer (by kind, and all experts together) + per-kind aggregates."""
    per_layer = []
    by_layer_kind = aggregate([r for r in rows if r["layer"] is not None], lambda r: (r["layer"], r["kind"]))
    experts = aggregate([r for r in rows if r["kind"].startswith("experts.")], lambda r: r["layer"])
    for (layer, kind), s in sorted(by_layer_kind.items()):
        per_layer.append({"layer": layer, "kind": kind, **_figures(s)})
    for layer, s in sorted(experts.items()):
        per_layer.append({"layer": layer, "kind": "experts", **_figures(s)})
    per_kind = {k: _figures(s) for k, s in sorted(aggregate(rows, lambda r: r["kind"]).items())}
    per_kind["experts"] = _figures(sum(experts.values(), ErrorStats()))
    return {"meta": meta, "rows": rows, "per_layer": per_layer, "per_kind": per_kind}


def _figures(s: ErrorStats) -> dict:
    return {
        "params": s.count,
        "rmse": s.rmse,
        "rel_rmse": _finite(s.rel_rmse),
        "max_abs": s.max_abs,
        "snr_db": _finite(s.snr_db),
    }


def write_report(pack: str | os.PathLike, rows: list[dict], meta: dict) -> dict:
    """Write report.json and report.csv into ``pack`` (atomically); returns the report."""
    pack = Path(pack)
    report = build_report(rows, meta)
    tmp = pack / (REPORT_JSON + ".partial")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, pack / REPORT_JSON)
    tmp = pack / (REPORT_CSV + ".partial")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, pack / REPORT_CSV)
    return report


def load_report(pack: str | os.PathLike) -> dict:
    path = Path(pack) / REPORT_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        from moestream.layouts.errors import PackError

        raise PackError(f"{path}: missing (not a pack, or one converted without a report)") from None


def label(report: dict, fallback: str) -> str:
    m = report.get("meta", {})
    return f"{m.get('bits')}-bit {m.get('method', '')}".strip() if m.get("bits") else fallback


def format_comparison(reports: list[tuple[str, dict]], metric: str = "rel_rmse") -> str:
    """A per-layer table (rows: layer x kind) with one ``metric`` column per pack, then per-kind totals."""
    names = [n for n, _ in reports]
    keys: list[tuple] = []
    tables = []
    for _, rep in reports:
        t = {(r["layer"], r["kind"]): r for r in rep["per_layer"]}
        tables.append(t)
        keys += [k for k in t if k not in keys]
    keys.sort(key=lambda k: (k[0], k[1] != "experts", k[1]))
    w = max(12, *(len(n) for n in names))
    head = f"{'layer':>5}  {'kind':<22}" + "".join(f"{n:>{w + 2}}" for n in names)
    lines = [
        f"per layer: {metric} (relative RMSE = RMSE / std of the weights)"
        if metric == "rel_rmse"
        else f"per layer: {metric}",
        head,
        "-" * len(head),
    ]
    for k in keys:
        cells = "".join(f"{_fmt(t.get(k, {}).get(metric)):>{w + 2}}" for t in tables)
        lines.append(f"{k[0]:>5}  {k[1]:<22}" + cells)
    lines += ["", "per tensor kind (all layers)", head.replace("layer", "     "), "-" * len(head)]
    kinds: list[str] = []
    for _, rep in reports:
        kinds += [k for k in rep["per_kind"] if k not in kinds]
    for kind in kinds:
        cells = "".join(f"{_fmt(rep['per_kind'].get(kind, {}).get(metric)):>{w + 2}}" for _, rep in reports)
        lines.append(f"{'':>5}  {kind:<22}" + cells)
    return "\n".join(lines)


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def plot_comparison(reports: list[tuple[str, dict]], path: str | os.PathLike) -> None:
    """Per-layer relative RMSE of the routed experts, one line per pack (PNG via matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, rep in reports:
        pts = sorted(
            (r["layer"], r["rel_rmse"])
            for r in rep["per_layer"]
            if r["kind"] == "experts" and r["rel_rmse"] is not None
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative RMSE of routed experts (RMSE / std)")
    ax.set_title("Quantization error per layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
