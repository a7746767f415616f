"""``OUTPUT/report.md`` of ``diprune run``, written from the report's JSON form (``diprune.run/1``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}"


def _latency(entries: list[Mapping[str, Any]], original: bool = False) -> str:
    if not entries:
        return "-"
    parts = [f"b{b['batch']}: {b['median_ms']:.3f} ms" + ("" if original else f" ({b['speedup']:.2f}x)")
             for b in entries]
    return "<br>".join(parts)


def _verdict(doc: Mapping[str, Any]) -> list[str]:
    gates = doc["gates"]
    bar = ", ".join(f"{k} {v:g}" for k, v in gates.items()) or "none (every candidate passes)"
    if doc["best"] is not None:
        best = next(c for c in doc["candidates"] if c["name"] == doc["best"])
        dense = best.get("metrics")
        primary = dense["primary"] if dense else None
        accuracy = (f"{primary} {_pct(dense['score'])} ({_points((best.get('metric_changes') or {}).get(primary))} "
                    f"points vs the original)") if dense else (
            f"top-1 {_pct(best['top1'])} ({_points(None if best['top1_drop'] is None else -best['top1_drop'])} "
            f"points vs the original)")
        return [f"**PASS** (exit 0): best candidate **{best['name']}**: MACs x{best['macs_fraction']:.3f}, "
                f"params x{best['params_fraction']:.3f}, {accuracy}, "
                f"{_latency(best['latency'])}; written to `best.onnx`.", "", f"Gates: {bar}."]
    return ["**FAIL** (exit 3): no candidate passes every gate; `best.onnx` was not written.", "", f"Gates: {bar}."]


def _table(doc: Mapping[str, Any]) -> list[str]:
    original = doc["original"]
    lines = ["| candidate | target | MACs | params | top-1 | change (points) | agreement | latency (speedup) | gates "
             "| Pareto |", "|" + "---|" * 10,
             f"| original | - | 1.000 | 1.000 | {_pct(original['top1'])} | - | - | "
             f"{_latency(original['latency'], original=True)} | - | - |"]
    for c in doc["candidates"]:
        gates = " ".join(f"{'✓' if ok else '✗'} {name}" for name, ok in c["passed"].items()) or "-"
        pareto = ", ".join(k for k, on in c["pareto"].items() if on) or "-"
        target = f"{c['target']['kind']} {c['target']['fraction']:g}" + ("" if c["budget_reached"] else " (not reached)")
        name = f"**{c['name']}**" if c["name"] == doc["best"] else c["name"]
        drop = None if c["top1_drop"] is None else -c["top1_drop"]
        lines.append(f"| {name} | {target} | {c['macs_fraction']:.3f} | {c['params_fraction']:.3f} | "
                     f"{_pct(c['top1'])} | {_points(drop)} | {_pct(c['agreement'])} | {_latency(c['latency'])} | "
                     f"{gates} | {pareto} |")
    return lines


def _dense(doc: Mapping[str, Any]) -> list[str]:
    """The dense metrics of the original and every candidate (a dense model only), with changes in points."""
    original = doc["original"].get("metrics")
    if not original:
        return []
    from pipeline.evaluation.dense_eval import METRIC_NAMES

    names = METRIC_NAMES[original["output_kind"]]
    against = "the data's labels" if original["against"] == "labels" else "the original model's own decisions"
    lines = ["", "## Dense metrics", "", f"{original['output_kind']} output, measured against {against}; primary "
             f"metric {original['primary']}; changes in points vs the original.", "",
             "| model | " + " | ".join(f"{n} | change" for n in names) + " |", "|" + "---|" * (1 + 2 * len(names)),
             "| original | " + " | ".join(f"{_pct(original.get(n))} | -" for n in names) + " |"]
    for c in doc["candidates"]:
        mine, changes = c.get("metrics") or {}, c.get("metric_changes") or {}
        lines.append(f"| {c['name']} | " + " | ".join(f"{_pct(mine.get(n))} | {_points(changes.get(n))}"
                                                      for n in names) + " |")
    return lines


def _plots(doc: Mapping[str, Any]) -> list[str]:
    plots = doc.get("plots") or {}
    if "skipped" in plots:
        return ["", "## Plots", "", f"Plots were skipped: {plots['skipped']}"]
    lines = ["", "## Plots", ""]
    lines += [f"![{name}]({path})" for name, path in plots.items() if name != "notes"]
    lines += [f"- {note}" for note in plots.get("notes", [])]
    return lines


def _provenance(doc: Mapping[str, Any]) -> list[str]:
    cache, bench, data = doc["cache"], doc["bench"], doc["data"]
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in doc["timings_s"].items())
    settings = bench.get("settings", {})
    lines = ["", "## How it was measured", "",
             f"- model: `{Path(doc['original']['path']).name}` (sha256 {doc['original']['sha256'][:12]}), MACs "
             f"{doc['original']['macs']:,}, params {doc['original']['params']:,}",
             f"- calibration: {data.get('calibration', {}).get('name', '-')} "
             f"({data.get('calibration', {}).get('n', 0)} samples); evaluation: {data['evaluation']['name']} "
             f"({data['evaluation']['n']} samples)",
             f"- latency: {bench['backend']}, batches {settings.get('batches')}, {settings.get('rounds')} interleaved "
             f"rounds (original and candidates alike), threads {settings.get('threads') or 'default'}; cpu "
             f"{bench.get('machine', {}).get('cpu')}",
             f"- cache (`cache/`): calibration {cache['calibration']}; candidates computed "
             f"{cache['candidates_computed']}, "
             f"reused {cache['candidates_reused']}; evaluations reused {cache['evaluations_reused']}",
             f"- stage timings: {timings}"]
    lines += [f"- WARNING: {w}" for w in bench.get("warnings", [])]
    notes = [f"- {c['name']}: {n}" for c in doc["candidates"] for n in c["notes"]]
    return lines + (["", "## Notes", "", *notes] if notes else [])


def run_markdown(doc: Mapping[str, Any]) -> str:
    """The Markdown report of a run report's JSON form."""
    lines = ["# diprune run", "", *_verdict(doc), "", "## Candidates", "", *_table(doc), *_dense(doc), *_plots(doc),
             *_provenance(doc)]
    if doc.get("mlflow"):
        lines.append(f"- MLflow: {doc['mlflow'].get('uri')} run {doc['mlflow'].get('run_id')}")
    return "\n".join(lines) + "\n"
