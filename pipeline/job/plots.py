"""Plots of ``diprune run`` (the ``[plots]`` extra: matplotlib, imported here only, lazily).

* ``accuracy_vs_macs.png``: accuracy (top-1, or agreement without labels) against the MACs fraction, one marker per
  method, the original at 1.0, the Pareto front as a line, the best candidate circled, the accuracy gate dashed;
  every candidate is named beside its point, and candidates at the same point get concentric rings and one label
  listing them all (none hides another);
* ``accuracy_vs_latency.png``: the same against the measured median latency, one panel per benchmarked batch size;
* ``kept_width.png``: for the best candidate, each channel group's original and kept width (topological order from
  the top, full group ids).

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


def _y_of(entry: Mapping[str, Any]) -> float | None:
    return entry.get("top1") if entry.get("top1") is not None else entry.get("agreement")


def _x_of(entry: Mapping[str, Any], cost: str, batch_index: int = 0) -> float | None:
    if cost == "macs":
        return entry.get("macs_fraction", 1.0)
    latency = entry.get("latency") or []
    return latency[batch_index]["median_ms"] if len(latency) > batch_index else None


def _draw(ax: Any, doc: Mapping[str, Any], cost: str, batch_index: int) -> None:
    """One accuracy-vs-cost panel: every candidate visible and named (candidates at the same point get concentric
    rings and one label listing them all), the original, the Pareto front, the best circled, the accuracy gate."""
    original = doc["original"]
    orig_y = original.get("top1") if original.get("top1") is not None else 1.0
    ax.scatter([_x_of(original, cost, batch_index)], [orig_y], marker="*", s=160, color="black", label="original",
               zorder=3)
    markers = "osD^vP<>Xh"
    methods = list(dict.fromkeys(c["method"] for c in doc["candidates"]))
    at: dict[tuple[float, float], list[str]] = {}
    for c in doc["candidates"]:
        x, y = _x_of(c, cost, batch_index), _y_of(c)
        if x is None or y is None:
            continue
        names = at.setdefault((round(x, 9), round(y, 9)), [])
        names.append(c["name"])
        ax.scatter([x], [y], marker=markers[methods.index(c["method"]) % len(markers)], s=45 + 70 * (len(names) - 1),
                   facecolors="none", edgecolors=f"C{methods.index(c['method']) % 10}", lw=1.3, zorder=3,
                   label=c["method"] if c["method"] not in ax.get_legend_handles_labels()[1] else None)
    for (x, y), names, step in _label_steps(at):
        ax.annotate("\n".join(names), (x, y), xytext=(6, 4 + 10 * step), textcoords="offset points", fontsize=6,
                    zorder=5, arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"} if step else None)
    front = sorted((_x_of(c, cost, batch_index), _y_of(c)) for c in doc["candidates"]
                   if c["pareto"][cost] and _x_of(c, cost, batch_index) is not None and _y_of(c) is not None)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], color="grey", lw=1, ls="-", zorder=2,
                label="Pareto front")
    if doc["best"] is not None:
        best = next(c for c in doc["candidates"] if c["name"] == doc["best"])
        if _x_of(best, cost, batch_index) is not None:
            ax.scatter([_x_of(best, cost, batch_index)], [_y_of(best)], s=260, facecolors="none", edgecolors="red",
                       lw=1.5, zorder=4, label=f"best: {best['name']}")
    limit = _accuracy_floor(doc)
    if limit is not None:
        ax.axhline(limit, color="red", ls="--", lw=1, label="accuracy gate")
    ax.set_ylabel(_accuracy_label(doc))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _label_steps(at: Mapping[tuple[float, float], list[str]],
                 near: float = 0.04) -> list[tuple[tuple[float, float], list[str], int]]:
    """Labels of nearby points (within ``near`` of the axes' spans) stacked one line step apart, so that no label
    covers another: ``(point, names, step)``."""
    points = sorted(at)
    if not points:
        return []
    span_x = (max(p[0] for p in points) - min(p[0] for p in points)) or 1.0
    span_y = (max(p[1] for p in points) - min(p[1] for p in points)) or 1.0
    placed: list[tuple[float, float, int, int]] = []  # x, y, first step, lines used
    out = []
    for x, y in points:
        step = 0
        for px, py, first, lines in placed:
            if abs(x - px) / span_x < near and abs(y - py) / span_y < near:
                step = max(step, first + lines)
        lines = len(at[(x, y)])
        placed.append((x, y, step, lines))
        out.append(((x, y), at[(x, y)], step))
    return out


def scatter_figure(doc: Mapping[str, Any], cost: str) -> Any:
    """Accuracy against MACs (``cost="macs"``, one panel) or against the median latency (``"latency"``, one panel
    per benchmarked batch size), as a ``matplotlib.figure.Figure``."""
    from matplotlib.figure import Figure

    batches = [b["batch"] for b in doc["original"].get("latency") or []] if cost == "latency" else [None]
    fig = Figure(figsize=(6.4 * len(batches), 4.6))
    for i, batch in enumerate(batches):
        ax = fig.add_subplot(1, len(batches), i + 1)
        _draw(ax, doc, cost, i)
        ax.set_xlabel("MACs (fraction of the original)" if batch is None else f"median latency (ms), batch {batch}")
    return fig


def _accuracy_floor(doc: Mapping[str, Any]) -> float | None:
    gates, top1 = doc["gates"], doc["original"].get("top1")
    floors = [gates["min_top1"]] if "min_top1" in gates else []
    if "max_top1_drop" in gates and top1 is not None:
        floors.append(top1 - gates["max_top1_drop"] / 100.0)  # the gate is in points
    return max(floors) if floors else None


def kept_width_figure(doc: Mapping[str, Any]) -> Any:
    """Each channel group's original and kept width in the best candidate (horizontal bars, full group ids)."""
    from matplotlib.figure import Figure

    best = next(c for c in doc["candidates"] if c["name"] == doc["best"])
    groups = [(gid, g) for gid, g in best["groups"].items() if g["size"] > 1]
    longest = max((len(gid) for gid, _ in groups), default=10)
    fig = Figure(figsize=(6.4 + 0.06 * longest, max(3.0, 0.28 * len(groups) + 1.5)))
    ax = fig.add_subplot()
    ys = range(len(groups))
    ax.barh(ys, [g["size"] for _, g in groups], color="#d0d0d0", label="original width")
    ax.barh(ys, [g["kept"] for _, g in groups], color="#1f77b4", label=f"kept ({best['name']})")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([gid for gid, _ in groups], fontsize=7)
    ax.invert_yaxis()  # topological order from the top
    ax.set_xlabel("channels")
    ax.set_title(f"kept width per channel group, best candidate {best['name']}")
    ax.legend(fontsize=8)
    return fig


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
        ("accuracy_vs_macs", lambda p: _save(scatter_figure(doc, "macs"), p)),
        ("accuracy_vs_latency", lambda p: _save(scatter_figure(doc, "latency"), p)),
    ]
    if doc["best"] is not None:
        jobs = [*jobs, ("kept_width", lambda p: _save(kept_width_figure(doc), p))]
    else:
        notes.append("kept_width: no candidate passed every gate, so there is no best candidate to draw")
    for name, draw in jobs:
        path = folder / f"{name}.png"
        draw(path)
        written[name] = str(path.relative_to(relative_to))
    return {**written, "notes": notes} if notes else written
