"""Plots of ``diprune run`` (the ``[plots]`` extra: matplotlib, imported here only, lazily).

* ``accuracy_vs_macs.png``: accuracy (top-1, or agreement without labels) against the MACs fraction, one marker per
  method, the original at 1.0, the Pareto front as a line, the best candidate circled, the accuracy gate dashed;
* ``accuracy_vs_latency.png``: the same against the measured median latency at the first batch size;
* ``kept_width.png``: for the best candidate, each channel group's original and kept width (topological order).

Figures are drawn with ``matplotlib.figure.Figure`` (no pyplot, no global backend) and written atomically. Without
matplotlib, :func:`write_plots` writes nothing and returns the reason, which the report states.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graph_ops.io import atomic_write_bytes

PLOTS_HINT = "matplotlib is not installed (pip install 'diprune[plots]')"


def _save(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def _accuracy_label(doc: Mapping[str, Any]) -> str:
    return "top-1" if doc["original"].get("top1") is not None else "agreement with the original"


def _scatter(doc: Mapping[str, Any], cost: str, xlabel: str, path: Path) -> None:
    from matplotlib.figure import Figure

    def x_of(entry: Mapping[str, Any]) -> float | None:
        if cost == "macs":
            return entry.get("macs_fraction", 1.0)
        return entry["latency"][0]["median_ms"] if entry.get("latency") else None

    def y_of(entry: Mapping[str, Any]) -> float | None:
        return entry.get("top1") if entry.get("top1") is not None else entry.get("agreement")

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    original = doc["original"]
    orig_y = original.get("top1") if original.get("top1") is not None else 1.0
    ax.scatter([x_of(original)], [orig_y], marker="*", s=160, color="black", label="original", zorder=3)
    markers = "osD^vP<>Xh"
    for i, method in enumerate(dict.fromkeys(c["method"] for c in doc["candidates"])):
        points = [(x_of(c), y_of(c)) for c in doc["candidates"] if c["method"] == method]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=markers[i % len(markers)], s=45,
                   label=method, zorder=3)
    front = sorted((x_of(c), y_of(c)) for c in doc["candidates"] if c["pareto"][cost] and x_of(c) is not None)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], color="grey", lw=1, ls="-", zorder=2,
                label="Pareto front")
    if doc["best"] is not None:
        best = next(c for c in doc["candidates"] if c["name"] == doc["best"])
        ax.scatter([x_of(best)], [y_of(best)], s=260, facecolors="none", edgecolors="red", lw=1.5, zorder=4,
                   label=f"best: {best['name']}")
    limit = _accuracy_floor(doc)
    if limit is not None:
        ax.axhline(limit, color="red", ls="--", lw=1, label="accuracy gate")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_accuracy_label(doc))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def _accuracy_floor(doc: Mapping[str, Any]) -> float | None:
    gates, top1 = doc["gates"], doc["original"].get("top1")
    floors = [gates["min_top1"]] if "min_top1" in gates else []
    if "max_top1_drop" in gates and top1 is not None:
        floors.append(top1 - gates["max_top1_drop"] / 100.0)  # the gate is in points
    return max(floors) if floors else None


def _kept_width(doc: Mapping[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    best = next(c for c in doc["candidates"] if c["name"] == doc["best"])
    groups = [(gid, g) for gid, g in best["groups"].items() if g["size"] > 1]
    fig = Figure(figsize=(max(6.4, 0.35 * len(groups) + 2), 4.4))
    ax = fig.add_subplot()
    xs = range(len(groups))
    ax.bar(xs, [g["size"] for _, g in groups], color="#d0d0d0", label="original width")
    ax.bar(xs, [g["kept"] for _, g in groups], color="#1f77b4", label=f"kept ({best['name']})")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_short(gid) for gid, _ in groups], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title(f"kept width per channel group, best candidate {best['name']}")
    ax.legend(fontsize=8)
    _save(fig, path)


def _short(group_id: str, width: int = 28) -> str:
    return group_id if len(group_id) <= width else "..." + group_id[-(width - 3):]


def write_plots(doc: Mapping[str, Any], folder: Path, relative_to: Path) -> dict[str, Any]:
    """Draw the plots of a run report's JSON form into ``folder``.

    Returns:
        ``{plot name: path relative to relative_to}`` plus ``notes`` (plots not drawn and why), or
        ``{"skipped": reason}`` when matplotlib is missing.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {"skipped": PLOTS_HINT}
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    notes: list[str] = []
    jobs: Sequence[tuple[str, Any]] = [
        ("accuracy_vs_macs", lambda p: _scatter(doc, "macs", "MACs (fraction of the original)", p)),
        ("accuracy_vs_latency", lambda p: _scatter(
            doc, "latency", f"median latency (ms), batch {doc['original']['latency'][0]['batch']}", p)),
    ]
    if doc["best"] is not None:
        jobs = [*jobs, ("kept_width", lambda p: _kept_width(doc, p))]
    else:
        notes.append("kept_width: no candidate passed every gate, so there is no best candidate to draw")
    for name, draw in jobs:
        path = folder / f"{name}.png"
        draw(path)
        written[name] = str(path.relative_to(relative_to))
    return {**written, "notes": notes} if notes else written
