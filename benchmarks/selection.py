"""Task-aware selection quality: held-out top-1 after pruning (no recovery), per model, budget and method.

Protocol. Calibration data: the first ``N`` samples of the MNIST training split (samples 0..N-1 of
``pipeline/assets/mnist10k.npz``, ``open_dataset("mnist", split="train", limit=N)``); evaluation: the whole held-out
split (samples 8000..9999). Each model is prepared and calibrated once (``gap`` pooling, the default probes) and the
statistics are reused by every statistics-based method and budget; the stages are chained by
``pipeline.prune.orchestrate.PruneRun`` (what ``pipeline.prune.one_shot.prune`` uses), then ``apply_plan -> evaluate``. Budgets are kept-MACs fractions; the achieved fraction is counted on the pruned graph
(``graph_ops.cost.count``). ``random`` is the mean over seeds 0, 1, 2. Planner defaults: ``round_to=8``,
``min_channels=8``, first and last layers kept.

DI study (on by default, ``--no-study`` skips it): pooling ``avg2`` vs ``gap``; ridge ``eps``; calibration size;
and whether the allocation or the ranking limits DI: a plan's per-group widths (allocation) from one method combined
with the within-group ranking of another (``alloc X + rank Y`` keeps, in every group, the ``width_X`` channels that
``Y`` eliminates last); then, at ``BLAME_TARGET``, DI allocation with l2 ranking in every group but one, ranked by
DI, for each pruned group (which group's DI ranking costs accuracy).

Run from the repository root: ``python -m benchmarks.selection [--quick]`` (``--markdown-only`` re-renders the
markdown from the JSON); writes ``benchmarks/results/selection.json`` and ``benchmarks/results/selection.md``.
About 9-15 minutes on 2 shared cores (mobilenet's ``avg2`` calibration, 3840 features in one probe, is the
largest single cost).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graph_ops.io import atomic_write_bytes
from pipeline.calibration.stats import CalibrationStats
from pipeline.data.named import open_dataset
from pipeline.deployment.bench import machine_info
from pipeline.evaluation.evaluate import evaluate
from pipeline.model.prepare import PreparedModel, prepare
from pipeline.prune.orchestrate import PruneRun, keep_lists, needs_stats
from pipeline.selection.plan import PruningPlan
from pipeline.selection.scorers.base import ChannelScores

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"cnn": ROOT / "pipeline/assets/mnist_cnn.onnx", "vgg": ROOT / "benchmarks/models/mnist_vgg.onnx",
          "resnet": ROOT / "benchmarks/models/mnist_resnet.onnx",
          "mobilenet": ROOT / "benchmarks/models/mnist_mobilenet.onnx",
          "inception": ROOT / "benchmarks/models/mnist_inception.onnx",
          "lenet": ROOT / "benchmarks/models/mnist_lenet.onnx"}
METHODS = ("di", "lda", "pls-vip", "l2", "random", "mean-act", "apoz")
TARGETS = (0.75, 0.5, 0.35)
RANDOM_SEEDS = (0, 1, 2)
BLAME_TARGET = 0.75
CROSSED = ("di", "l2")  # methods whose allocation and ranking are crossed in the DI study
EPS_VALUES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
RESULTS = ROOT / "benchmarks" / "results"
THREADS = 1


class Runner:
    """One model: its prepared form, the evaluation set and one :class:`PruneRun` per calibration setting."""

    def __init__(self, path: Path, test: Any, n_calib: int, *, pooling: str = "gap",
                 planner: Mapping[str, Any] | None = None) -> None:
        """``pooling``: the calibration pooling when a call names none; ``planner``: options of the planner
        (``fill_back``, ``fine_share``; the library's defaults when None)."""
        self.prepared: PreparedModel = prepare(path)
        self.test = test
        self.n_calib = n_calib
        self.pooling = pooling
        self.planner = dict(planner or {})
        self._runs: dict[tuple[str, int], PruneRun] = {}
        self.run = self._run(pooling, n_calib)
        self.full = self.prepared.cost
        self.original_top1 = evaluate(self.prepared.model, test, backend="ort-cpu", intra_op_threads=THREADS).top1

    def _run(self, pooling: str, n: int | None) -> PruneRun:
        key = (pooling, n or self.n_calib)
        if key not in self._runs:
            data = open_dataset("mnist", split="train", limit=key[1])
            self._runs[key] = PruneRun(self.prepared, data, pooling=pooling, backend="ort-cpu",
                                       intra_op_threads=THREADS, progress=False)
        return self._runs[key]

    def stats(self, pooling: str | None = None, n: int | None = None) -> CalibrationStats:
        """Calibration statistics on the first ``n`` training samples (computed once per setting, with the
        activation summaries, so one calibration serves every method)."""
        return self._run(pooling or self.pooling, n).stats(summaries=True)

    def scores(self, method: str, *, seed: int = 0, pooling: str | None = None, n: int | None = None,
               params: Mapping[str, float] | None = None) -> ChannelScores:
        """Scores of one method (statistics only for the methods that need them)."""
        pooling = pooling or self.pooling
        run = self._run(pooling, n)
        if needs_stats(method):
            self.stats(pooling, n)  # one calibration (with summaries) serves every method of this setting
        return run.scores(method, seed=seed, params=params)

    def plan(self, scores: ChannelScores, target: float) -> PruningPlan:
        """The planner's allocation for a kept-MACs target."""
        return self.run.plan(scores, target_macs=target, **self.planner)

    def measure(self, keep: Mapping[str, Sequence[int]]) -> dict[str, float]:
        """Rewrite with these keep lists and measure held-out top-1 and the achieved cost fractions."""
        plan = PruningPlan(self.prepared.sha256, keep)
        pruned = self.run.apply(plan)
        after = self.run.cost(pruned)
        top1 = evaluate(pruned, self.test, backend="ort-cpu", intra_op_threads=THREADS).top1
        return {"top1": float(top1), "macs_fraction": after.macs / self.full.macs,
                "params_fraction": after.params / self.full.params}


def cross_keep(alloc: PruningPlan, ranking: ChannelScores, index: Any) -> dict[str, tuple[int, ...]]:
    """Per-group widths of ``alloc`` with the channels ``ranking`` eliminates last (its within-group order)."""
    sizes = {g.id: g.size for g in index.groups}
    keep = {}
    for gid, kept in sorted(alloc.keep.items()):
        width = len(kept)
        keep[gid] = tuple(sorted(int(c) for c in ranking.elimination_order(gid)[sizes[gid] - width:]))
    return keep


def mean_of(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Field-wise mean (and the per-seed top-1 values)."""
    out = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    out["top1_per_seed"] = [r["top1"] for r in rows]
    out["top1_std"] = float(np.std([r["top1"] for r in rows]))
    return out


def main_table(runner: Runner, targets: Sequence[float]) -> dict[str, dict[str, Any]]:
    """``{target: {method: result}}`` for every method."""
    out: dict[str, dict[str, Any]] = {str(t): {} for t in targets}
    for method in METHODS:
        seeds = RANDOM_SEEDS if method == "random" else (0,)
        scored = [runner.scores(method, seed=s) for s in seeds]
        for target in targets:
            rows = [runner.measure(keep_lists(runner.plan(sc, target))) for sc in scored]
            out[str(target)][method] = mean_of(rows) if method == "random" else rows[0]
        logger.info("%s done", method)
    return out


def di_study(runner: Runner, targets: Sequence[float], n_small: int) -> dict[str, Any]:
    """DI knobs (pooling, eps, calibration size) and the allocation-vs-ranking crossing."""
    settings: dict[str, dict[str, Any]] = {
        name: {"pooling": "avg2"} if name == "avg2" else {"n": n_small} if name.startswith("N=")
        else {"params": {"eps": float(name[4:])}} if name.startswith("eps=") else {}
        for name in knob_names(n_small, EPS_VALUES)}
    knobs: dict[str, dict[str, Any]] = {str(t): {} for t in targets}
    for name, kwargs in settings.items():
        scored = runner.scores("di", **kwargs)
        for target in targets:
            knobs[str(target)][name] = runner.measure(keep_lists(runner.plan(scored, target)))
    ranks = {m: runner.scores(m) for m in CROSSED}
    crossing: dict[str, dict[str, Any]] = {str(t): {} for t in targets}
    for target in targets:
        plans = {m: runner.plan(sc, target) for m, sc in ranks.items()}
        for a in ranks:
            for r in ranks:
                keep = cross_keep(plans[a], ranks[r], runner.prepared.index)
                crossing[str(target)][f"alloc {a} + rank {r}"] = runner.measure(keep)
    return {"knobs": knobs, "crossing": crossing, "ranking_blame": ranking_blame(runner, ranks, BLAME_TARGET)}


def ranking_blame(runner: Runner, ranks: Mapping[str, ChannelScores], target: float) -> dict[str, Any]:
    """DI allocation at ``target`` with l2 ranking everywhere except DI ranking in one group, per pruned group."""
    plan = runner.plan(ranks["di"], target)
    by_di = cross_keep(plan, ranks["di"], runner.prepared.index)
    by_l2 = cross_keep(plan, ranks["l2"], runner.prepared.index)
    sizes = {g.id: g.size for g in runner.prepared.index.groups}
    groups = {}
    for gid in sorted(by_di):
        result = runner.measure({**by_l2, gid: by_di[gid]})
        groups[gid] = {"size": sizes[gid], "kept": len(by_di[gid]), "top1": result["top1"],
                       "kept_by_both": len(set(by_di[gid]) & set(by_l2[gid]))}
    return {"target": target, "groups": groups}


def cell(result: Mapping[str, float]) -> str:
    """``top-1 (achieved MACs fraction)``."""
    return f"{100 * result['top1']:.2f} ({result['macs_fraction']:.3f})"


def knob_names(n_small: int, eps_values: Sequence[float]) -> list[str]:
    """Column names of the DI knob study, in run order."""
    return ["gap (default)", "avg2", f"N={n_small}", *(f"eps={e:g}" for e in eps_values if e != 1e-3)]


def markdown_table(title: str, data: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
                   originals: Mapping[str, float], columns: Sequence[str]) -> list[str]:
    """Rows model x target, one column per name in ``columns``."""
    lines = [f"### {title}", "", "| model (orig. top-1) | target | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for model in sorted(data, key=lambda m: list(MODELS).index(m) if m in MODELS else len(MODELS)):
        for target, row in sorted(data[model].items(), key=lambda item: -float(item[0])):
            best = max(row[c]["top1"] for c in columns)
            cells = [f"**{cell(row[c])}**" if row[c]["top1"] == best else cell(row[c]) for c in columns]
            lines.append(f"| {model} ({100 * originals[model]:.2f}) | {target} | " + " | ".join(cells) + " |")
    return [*lines, *summary_rows(data, columns), ""]


def summary_rows(data: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
                 columns: Sequence[str]) -> list[str]:
    """Mean top-1 over all rows, and rows won (ties shared, rows where every column is equal left out)."""
    rows = [row for per_target in data.values() for row in per_target.values()]
    means = [100 * float(np.mean([row[c]["top1"] for row in rows])) for c in columns]
    decided = [row for row in rows if len({row[c]["top1"] for c in columns}) > 1]
    wins = [sum(row[c]["top1"] == max(row[k]["top1"] for k in columns) for row in decided) for c in columns]
    return ["| **mean top-1 over rows** | | " + " | ".join(f"{m:.2f}" for m in means) + " |",
            f"| **rows best (of {len(decided)} not all equal)** | | " + " | ".join(str(w) for w in wins) + " |"]


def blame_table(models: Mapping[str, Any]) -> list[str]:
    """Which group's DI ranking costs accuracy (DI allocation, l2 ranking elsewhere)."""
    lines = ["### Where DI's within-group ranking costs accuracy", "",
             "DI allocation; every group ranked by l2 except the one named, ranked by DI. Reference: "
             "`alloc di + rank l2` above (all groups by l2).", "",
             "| model | target | group | kept / size | kept by both rankings | top-1 |", "|---|---|---|---|---|---|"]
    for name in sorted(models, key=lambda m: list(MODELS).index(m) if m in MODELS else len(MODELS)):
        entry = models[name]
        blame = entry.get("di_study", {}).get("ranking_blame")
        for gid, g in (blame or {}).get("groups", {}).items():
            lines.append(f"| {name} | {blame['target']} | `{gid}` | {g['kept']} / {g['size']} | {g['kept_by_both']} | "
                         f"{100 * g['top1']:.2f} |")
    return [*lines, ""]


def write_markdown(doc: Mapping[str, Any], path: Path) -> None:
    """The markdown report: main table, then the DI study tables."""
    originals = {m: v["original_top1"] for m, v in doc["models"].items()}
    lines = ["# Selection quality: held-out top-1 % (achieved kept-MACs fraction), no recovery", "",
             f"Command: `{doc['command'].strip()}`; calibration N={doc['n_calib']} (training split, first N), "
             f"evaluation {doc['n_eval']} held-out samples; random = mean over seeds {doc['random_seeds']}; "
             f"runtime {doc['runtime_s']:.0f} s on {doc['machine']['cpu']} "
             f"({doc['machine']['cores_available']} cores). Best cell of each row in bold.", ""]
    lines += markdown_table("All methods", {m: v["results"] for m, v in doc["models"].items()}, originals,
                            doc["methods"])
    study = {m: v["di_study"] for m, v in doc["models"].items() if "di_study" in v}
    if study:
        lines += markdown_table("DI knobs (default: gap, eps=1e-3, N as above)",
                                {m: s["knobs"] for m, s in study.items()}, originals,
                                knob_names(doc["n_small"], doc["eps_values"]))
        lines += markdown_table("Allocation (per-group widths) x within-group ranking",
                                {m: s["crossing"] for m, s in study.items()}, originals,
                                [f"alloc {a} + rank {r}" for a in CROSSED for r in CROSSED])
        lines += blame_table(doc["models"])
    atomic_write_bytes(path, "\n".join(lines).encode())


def run(models: Sequence[str], n_calib: int, n_small: int, targets: Sequence[float], study: bool) -> dict[str, Any]:
    """Every model: main table and (optionally) the DI study."""
    test = open_dataset("mnist", split="test")
    out: dict[str, Any] = {}
    for name in models:
        start = time.perf_counter()
        runner = Runner(MODELS[name], test, n_calib)
        entry: dict[str, Any] = {"file": str(MODELS[name].relative_to(ROOT)), "sha256": runner.prepared.sha256,
                                 "original_top1": runner.original_top1,
                                 "macs": runner.full.macs, "params": runner.full.params,
                                 "results": main_table(runner, targets)}
        if study:
            entry["di_study"] = di_study(runner, targets, n_small)
        entry["seconds"] = time.perf_counter() - start
        logger.info("%s: %.1f s", name, entry["seconds"])
        out[name] = entry
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--n-calib", type=int, default=4000, help="calibration samples (training split)")
    parser.add_argument("--n-small", type=int, default=1000, help="smaller calibration size for the DI study")
    parser.add_argument("--no-study", action="store_true", help="skip the DI knob / allocation study")
    parser.add_argument("--quick", action="store_true", help="demo model only, N=1000/250, targets 0.5")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for selection.json / selection.md")
    parser.add_argument("--markdown-only", action="store_true", help="re-render selection.md from selection.json")
    args = parser.parse_args(argv)
    if args.markdown_only:
        write_markdown(json.loads((args.out / "selection.json").read_text()), args.out / "selection.md")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("graph_ops").setLevel(logging.WARNING)
    models, n_calib, n_small, targets = args.models, args.n_calib, args.n_small, TARGETS
    if args.quick:
        models, n_calib, n_small, targets = ["cnn"], 1000, 250, (0.5,)
    start = time.perf_counter()
    results = run(models, n_calib, n_small, targets, not args.no_study)
    doc = {"command": " ".join(["python -m benchmarks.selection", *(sys.argv[1:] if argv is None else argv)]),
           "machine": machine_info(), "n_calib": n_calib, "n_small": n_small, "n_eval": 2000,
           "calibration": "first N samples of the training split (0..7999), gap pooling unless stated",
           "targets": list(targets), "methods": list(METHODS), "random_seeds": list(RANDOM_SEEDS),
           "eps_values": list(EPS_VALUES), "planner": {"round_to": 8, "min_channels": 8, "keep_first_and_last": True},
           "threads": THREADS, "models": results, "runtime_s": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "selection.json", json.dumps(doc, indent=1, sort_keys=True).encode())
    write_markdown(doc, args.out / "selection.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
