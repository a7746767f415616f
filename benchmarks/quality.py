"""Issue-4 quality benchmark: held-out top-1 vs achieved kept-MACs, DIPrune (with and without recovery) vs peers.

Protocol. Models: ``benchmarks/models/mnist_{vgg,resnet,mobilenet,inception}.onnx``. Calibration and recovery data:
the first ``N`` samples of the MNIST training split (``--n-calib``, default 2000; recovery uses the first
``--n-recover``, default 2000); evaluation: the 2000 held-out samples (8000..9999). DIPrune reuses
:class:`benchmarks.selection.Runner` (one calibration per model, statistics shared by every statistics-based method and
budget), then for every kept-MACs target ``0.5, 0.35, 0.25, 0.125`` and method ``di, lda, pls-vip, l2, random``
(random: seed 0; ``--stage seeds`` adds seeds 1 and 2 with the default recovery) the planner's plan is applied
(``PruneRun.apply``), recovered with the library's default (``pipeline.recovery.DEFAULT_RECOVERY``, sequential;
``PruneRun.recover``) or not at all, and evaluated with onnxruntime (1 thread). For ``di`` the other recoveries (``bias`` R1,
``regress`` R2) run too (the recovery ablation that picks the default).
The achieved MACs fraction is always counted on the written graph with ``graph_ops.cost.count``. Peers
(``benchmarks/peers.py``) run on the same ONNX files and data and are matched on achieved MACs by bisection on their
sparsity knob.

Task-dependent scenario (``--stage task``), with the product's task feature (``pipeline.data.task``, what
``--task-classes`` / ``--task-map`` do): 3-vs-8 restricts the head to the logits of digits 3 and 8 (the predicted class
is the larger); odd-vs-even groups the ten logits into two (log-sum-exp per group: the group with more probability mass
wins; before the product feature this benchmark predicted the parity of the single largest logit). Calibration and
recovery use the first ``N`` training samples of the task (only 3s and 8s for 3-vs-8, every digit for odd-vs-even),
with task labels; evaluation uses the task's held-out samples. Rows: ``di (task labels)``, ``di (10-class labels)`` (the same model scored with the ten digit
labels of the first ``N`` training samples: the task-agnostic choice) and ``l2``, each with the default recovery on
the task's calibration samples; targets down to 1/32 of the MACs. Reported: the smallest achieved MACs fraction that
stays within 1 point of the unpruned task accuracy.

Every stage merges its results into ``benchmarks/results/quality.json`` under a file lock as soon as one cell is
done, so partial results survive. Run from the repository root (``make bench-quality`` runs all stages)::

    python -m benchmarks.quality --stage diprune [--models vgg resnet]
    python -m benchmarks.quality --stage seeds | onnxsim | tp | task
    python -m benchmarks.quality --stage report   # quality.md and quality_<family>.png from quality.json
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.selection import MODELS as ALL_MODELS
from benchmarks.selection import Runner
from graph_ops.cost import count
from graph_ops.errors import PruneError
from graph_ops.io import atomic_write_bytes
from pipeline.calibration.calibrate import DEFAULT_POOLING
from pipeline.data.named import open_dataset
from pipeline.data.task import Task
from pipeline.deployment.bench import machine_info
from pipeline.evaluation.evaluate import evaluate
from pipeline.prune.orchestrate import PruneRun, needs_stats
from pipeline.recovery import DEFAULT_RECOVERY
from pipeline.selection.plan import PruningPlan

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FAMILIES = ("vgg", "resnet", "mobilenet", "inception", "lenet")
MODELS = {f: ALL_MODELS[f] for f in FAMILIES}
TARGETS = (0.5, 0.35, 0.25, 0.125)
METHODS = ("di", "lda", "lda-trace", "pls-vip", "l2", "random")
RECOVERIES = ("none", DEFAULT_RECOVERY)  # every method
ABLATION = ("bias", "regress")  # di only: the recoveries the default is compared with
THREADS = 1
TASKS = {"3-vs-8": ((3,), (8,)), "odd-vs-even": ((1, 3, 5, 7, 9), (0, 2, 4, 6, 8))}
RANDOM_SEEDS = (0, 1, 2)
TASK_TARGETS = (0.5, 0.35, 0.25, 0.125, 0.0625, 0.03125)
TASK_ROWS = ("di (task labels)", "di (10-class labels)", "l2")
DEFAULTS: dict[str, dict[str, Any]] = {
    "new": {"pooling": DEFAULT_POOLING, "planner": {}, "key": "diprune"},
    "old": {"pooling": "gap", "planner": {"fill_back": False, "fine_share": None}, "key": "diprune_old"},
    "gap": {"pooling": "gap", "planner": {}, "key": "diprune_gap"},
}
"""The library's defaults (``new``: auto pooling, fill-back and fine steps), those before issue 13 (``old``: global
average pooling, a greedy planner on ``round_to`` steps only) and the new planner with the old pooling (``gap``: the
effect of the pooling alone); ``old`` and ``gap`` run the default recovery and none, without the ablation."""
WORK = ROOT / "work" / "quality"


@contextlib.contextmanager
def locked_doc(path: Path) -> Iterator[dict[str, Any]]:
    """Read-modify-write ``path`` (JSON) under an exclusive lock; written back atomically on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(tempfile.gettempdir()) / f"diprune-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(path.read_text()) if path.exists() else {}
        yield doc
        atomic_write_bytes(path, json.dumps(doc, indent=1, sort_keys=True).encode())


def merge(path: Path, keys: Sequence[str], value: Any) -> None:
    """Set ``doc[k0][k1]...[kn] = value`` in the JSON file at ``path`` (creating the levels)."""
    with locked_doc(path) as doc:
        node = doc
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value


def eval_top1(model: onnx.ModelProto, test: Any) -> float:
    """Held-out top-1 with onnxruntime on CPU (1 thread)."""
    return float(evaluate(model, test, backend="ort-cpu", intra_op_threads=THREADS).top1)


def measured(model: onnx.ModelProto, full_macs: int, full_params: int, test: Any, **extra: Any) -> dict[str, Any]:
    """Top-1 and achieved cost fractions of a pruned model (counted with ``graph_ops.cost.count``)."""
    after = count(model)
    return {"top1": eval_top1(model, test), "macs_fraction": after.macs / full_macs,
            "params_fraction": after.params / full_params, **extra}


def diprune_point(runner: Runner, plan: PruningPlan, recovery: str, recover_run: PruneRun) -> dict[str, Any]:
    """One plan, rewritten and (optionally) recovered on ``recover_run``'s data, measured."""
    start = time.perf_counter()
    pruned, _ = recover_run.recover(runner.run.apply(plan), plan, recovery)
    step_back = (plan.meta.get("step_back") or {}).get("macs")
    return measured(pruned, runner.full.macs, runner.full.params, runner.test,
                    seconds=round(time.perf_counter() - start, 2),
                    **({"step_back_macs": step_back} if step_back is not None else {}))


def recovery_run(runner: Runner, n_recover: int) -> PruneRun:
    """The run whose data recovers the pruned models (the first ``n_recover`` training samples)."""
    return PruneRun(runner.prepared, open_dataset("mnist", split="train", limit=n_recover), backend="ort-cpu",
                    intra_op_threads=THREADS, progress=False)


def diprune_model(name: str, n_calib: int, n_recover: int, targets: Sequence[float], methods: Sequence[str],
                  out: Path, defaults: str = "new", ablation: bool = True) -> None:
    """The DIPrune sweep of one model under the ``defaults`` (:data:`DEFAULTS`); each (target, method) cell is merged
    into ``out`` as it is done."""
    test = open_dataset("mnist", split="test")
    setting = DEFAULTS[defaults]
    runner = Runner(MODELS[name], test, n_calib, pooling=setting["pooling"], planner=setting["planner"])
    rec = recovery_run(runner, n_recover)
    key = setting["key"]
    merge(out, ["models", name, "original"], {"top1": runner.original_top1, "macs": runner.full.macs,
                                              "params": runner.full.params, "file": str(MODELS[name].relative_to(ROOT))})
    if any(needs_stats(m) for m in methods):
        probes = runner.stats().probes
        merge(out, ["models", name, "pooling", defaults], {p: "gap" if s.cells == 1 else f"avg{round(s.cells ** 0.5)}"
                                                            for p, s in sorted(probes.items())})
    recoveries = RECOVERIES if defaults != "old" else (DEFAULT_RECOVERY,)
    for method in methods:
        scores = runner.scores(method, seed=0)
        for target in targets:
            try:
                plan = runner.plan(scores, target)
            except PruneError as err:
                merge(out, ["models", name, key, str(target), method], {"error": str(err)})
                continue
            for recovery in (*recoveries, *(ABLATION if method == "di" and defaults == "new" and ablation else ())):
                try:
                    cell = diprune_point(runner, plan, recovery, rec)
                except PruneError as err:
                    cell = {"error": f"{type(err).__name__}: {err}"}
                merge(out, ["models", name, key, str(target), method, recovery], cell)
                logger.info("%s %s %s %s %s: %s", name, defaults, method, target, recovery, cell)


def random_seeds_model(name: str, n_calib: int, n_recover: int, targets: Sequence[float], out: Path) -> None:
    """``random`` + the default recovery with seeds 1.. (seed 0 is in the main sweep), for the seed spread."""
    test = open_dataset("mnist", split="test")
    runner = Runner(MODELS[name], test, n_calib)
    rec = recovery_run(runner, n_recover)
    for seed in RANDOM_SEEDS[1:]:
        scores = runner.scores("random", seed=seed)
        for target in targets:
            cell = diprune_point(runner, runner.plan(scores, target), DEFAULT_RECOVERY, rec)
            merge(out, ["models", name, "random_seeds", str(target), str(seed)], cell)
            logger.info("%s random seed %d %s: %s", name, seed, target, cell)


def bisect_budget(prune_at: Callable[[float], onnx.ModelProto], full_macs: int, target: float,
                  steps: int = 8) -> tuple[float, onnx.ModelProto | None, float]:
    """The sparsity whose achieved MACs fraction is closest to ``target``, by bisection on ``[0, 0.98]`` (achieved
    MACs assumed non-increasing in sparsity; every visited point is a candidate).

    Returns ``(sparsity, model, achieved_fraction)`` of the closest point found (None model if nothing ran).
    """
    lo, hi = 0.0, 0.98
    best: tuple[float, onnx.ModelProto | None, float] = (0.0, None, 1.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        model = prune_at(mid)
        frac = count(model).macs / full_macs
        if best[1] is None or abs(frac - target) < abs(best[2] - target):
            best = (mid, model, frac)
        if frac > target:
            lo = mid
        else:
            hi = mid
    model = prune_at(hi)
    frac = count(model).macs / full_macs
    if abs(frac - target) < abs(best[2] - target):
        best = (hi, model, frac)
    return best


def memoized(prune_at: Callable[[float], onnx.ModelProto]) -> Callable[[float], onnx.ModelProto]:
    """Cache a peer's pruned models by sparsity (the bisections of different targets share their first steps)."""
    cache: dict[float, onnx.ModelProto] = {}

    def call(sparsity: float) -> onnx.ModelProto:
        key = round(sparsity, 6)
        if key not in cache:
            cache[key] = prune_at(sparsity)
        return cache[key]

    return call


def peer_model(name: str, peer: str, targets: Sequence[float], n_calib: int, out: Path) -> None:
    """One peer on one model: for every target, the matched-MACs point (or why it could not be reached)."""
    from benchmarks import peers

    test = open_dataset("mnist", split="test")
    original = onnx.load(str(MODELS[name]))
    full = count(original)
    prune_at = memoized(peers.PEERS[peer](name, original, open_dataset("mnist", split="train", limit=n_calib)))
    for target in targets:
        start = time.perf_counter()
        try:
            sparsity, model, frac = bisect_budget(prune_at, full.macs, target)
        except Exception as err:  # a peer failing on a model is a result to record
            merge(out, ["models", name, peer, str(target)], {"error": f"{type(err).__name__}: {err}"[:500]})
            logger.info("%s %s %s: declined (%s)", name, peer, target, err)
            continue
        cell = measured(model, full.macs, full.params, test, sparsity=round(sparsity, 4),
                        seconds=round(time.perf_counter() - start, 2))
        if frac > target + 0.02:
            cell["note"] = f"cannot reach the budget: smallest achieved MACs fraction {frac:.3f}"
        merge(out, ["models", name, peer, str(target)], cell)
        logger.info("%s %s %s: %s", name, peer, target, cell)
        if peer == "onnxsim-l2":
            merge(out, ["models", name, "onnxsim-l2+bn", str(target)], peer_recovered(model, original, full, test))


def peer_recovered(model: onnx.ModelProto, original: onnx.ModelProto, full: Any, test: Any) -> dict[str, Any]:
    """onnxsim's own training-free recovery (BatchNorm re-fit) on a matched onnxsim-l2 point, or why it failed."""
    from benchmarks import peers

    try:
        recovered = peers.onnxsim_bn_recover(model, original, open_dataset("mnist", split="train", limit=512))
        return measured(recovered, full.macs, full.params, test)
    except Exception as err:  # a peer failing is a result to record
        return {"error": f"{type(err).__name__}: {err}"[:500]}


def task_of(task: str) -> Task:
    """The product's task for a benchmark task: 3-vs-8 keeps the logits of digits 3 and 8 (``--task-classes 3,8``);
    odd-vs-even groups the ten digits (``--task-map``: log-sum-exp of the member logits per group)."""
    first, second = TASKS[task]
    if len(first) == 1 and len(second) == 1:
        return Task(classes=(*first, *second))
    return Task(groups=(("odd" if 1 in first else "first", first), ("even" if 0 in second else "second", second)))


def task_samples(split: str, task: str, limit: int | None = None) -> Any:
    """The first ``limit`` samples of an MNIST split whose digit belongs to the task (digit labels: the run's task
    maps them)."""
    data = open_dataset("mnist", split=split)
    labels = np.asarray(data.labels)
    first, second = TASKS[task]
    rows = np.flatnonzero(np.isin(labels, first + second))[:limit]
    base = data.loader
    return replace(data, name=f"{data.name} {task}[:{rows.size}]", num_samples=int(rows.size), labels=labels[rows],
                   loader=lambda idx: base(rows[idx]))


def task_top1(model: onnx.ModelProto, data: Any) -> float:
    """Task accuracy: the argmax of the task head against the task labels (``pipeline.evaluation.evaluate``)."""
    return float(evaluate(model, data, backend="ort-cpu", intra_op_threads=THREADS).top1)


def task_model(name: str, task: str, targets: Sequence[float], n_calib: int, out: Path) -> None:
    """The task rows at each target, with the product's task feature (``pipeline.data.task``): the head is the task's,
    calibration and recovery use the first ``n_calib`` training samples of the task's classes, evaluation the task's
    held-out samples; task accuracy and achieved MACs fraction per cell."""
    spec = task_of(task)
    options = {"backend": "ort-cpu", "intra_op_threads": THREADS, "progress": False}
    run = PruneRun(MODELS[name], task_samples("train", task, n_calib), task=spec, **options)
    calib = run.data
    test = run.task_data(open_dataset("mnist", split="test"), "evaluation")
    # the ten-digit scores come from the model without a task head, calibrated on the first n_calib training digits
    ten = PruneRun(MODELS[name], open_dataset("mnist", split="train", limit=n_calib), **options)
    scores = {"di (task labels)": run.scores("di"), "di (10-class labels)": ten.scores("di"), "l2": run.scores("l2")}
    merge(out, ["tasks", task, name, "original"], {"top1": task_top1(run.prepared.model, test),
                                                   "task": spec.to_dict(),
                                                   "samples": {"calibration": calib.num_samples,
                                                               "evaluation": test.num_samples}})
    full = run.prepared.cost
    for row in TASK_ROWS:
        for target in targets:
            try:
                plan = run.plan(scores[row], target_macs=target)
                pruned, _ = run.recover(run.apply(plan), plan, DEFAULT_RECOVERY)
                cell = {"top1": task_top1(pruned, test), "macs_fraction": run.cost(pruned).macs / full.macs}
            except PruneError as err:
                cell = {"error": f"{type(err).__name__}: {err}"}
            merge(out, ["tasks", task, name, row, str(target)], cell)
            logger.info("%s %s %s %s: %s", task, name, row, target, cell)


def series(entry: Mapping[str, Any], key: str = "diprune") -> dict[str, dict[str, Mapping[str, Any]]]:
    """``{row label: {target: cell}}`` for one model: DIPrune rows (``method`` without recovery,
    ``method+recovery`` with one), then the peers."""
    rows: dict[str, dict[str, Mapping[str, Any]]] = {}
    for method in METHODS:
        for recovery in (*RECOVERIES, *ABLATION):
            label = method if recovery == "none" else f"{method}+{recovery}"
            cells = {t: per[method] for t, per in entry.get(key, {}).items() if method in per}
            rows[label] = {t: c if "error" in c else c[recovery] for t, c in cells.items()
                           if "error" in c or recovery in c}
    for peer in PEER_ROWS:
        if peer in entry:
            rows[peer] = dict(entry[peer])
    return {k: v for k, v in rows.items() if v}


PEER_ROWS = ("onnxsim-l2", "onnxsim-l2+bn", "onnxsim-wanda", "torch-pruning", "torch-pruning-global")
DI_ROW = f"di+{DEFAULT_RECOVERY}"
GOAL_RIVALS = ("l2", "random", "onnxsim", "torch-pruning")  # row prefixes the goal names


def fmt(cell: Mapping[str, Any] | None) -> str:
    """``top-1 % (achieved MACs fraction)``, or the recorded failure."""
    if not cell:
        return "not run"
    if "error" in cell:
        return "declined: " + str(cell["error"]).split("\n")[0][:60].replace("|", "/")
    note = " (budget not reached)" if "note" in cell else ""
    return f"{100 * cell['top1']:.2f} ({cell['macs_fraction']:.3f}){note}"


def family_table(name: str, entry: Mapping[str, Any]) -> list[str]:
    """Rows method / peer, columns kept-MACs targets; best cell per column in bold."""
    rows = series(entry)
    targets = [str(t) for t in TARGETS]
    lines = [f"### {name} (unpruned top-1 {100 * entry['original']['top1']:.2f}%)", "",
             "| method | " + " | ".join(f"target {t}" for t in targets) + " |", "|---|" + "---|" * len(targets)]
    best = {t: max((c.get(t, {}).get("top1", -1) for c in rows.values() if "error" not in c.get(t, {})), default=-1)
            for t in targets}
    for label, cells in rows.items():
        out = [f"**{fmt(cells.get(t))}**" if cells.get(t, {}).get("top1") == best[t] else fmt(cells.get(t))
               for t in targets]
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return [*lines, ""]


def _best_rival(rows: Mapping[str, Mapping[str, Any]], target: str, prefixes: Sequence[str]) -> tuple[str, float]:
    """The best row (label, top-1) at ``target`` among rows whose label starts with one of ``prefixes``."""
    cands = [(lab, c[target]["top1"]) for lab, c in rows.items()
             if lab != DI_ROW and lab.startswith(tuple(prefixes)) and "top1" in c.get(target, {})]
    return max(cands, key=lambda item: item[1], default=("-", -1.0))


def goal_lines(doc: Mapping[str, Any]) -> list[str]:
    """The issue's goal: DI + default recovery within 1 point at 0.25, and ahead of l2, random, onnxsim and
    Torch-Pruning (with or without recovery) at every target; the best row of any other kind is listed too."""
    lines = [f"## Goal check (`{DI_ROW}`: DI with the default recovery, sequential)", "",
             f"| family | {DI_ROW} at 0.25 vs unpruned (points) | targets where {DI_ROW} is ahead of l2, random, "
             "onnxsim, Torch-Pruning / run | best of those per target | best other DIPrune row per target |",
             "|---|---|---|---|---|"]
    for name, entry in doc.get("models", {}).items():
        rows = series(entry)
        di = rows.get(DI_ROW, {})
        orig = entry["original"]["top1"]
        gap = f"{100 * (di['0.25']['top1'] - orig):+.2f}" if "top1" in di.get("0.25", {}) else "n/a"
        wins, rivals, others = 0, [], []
        for t in (str(x) for x in TARGETS):
            if "top1" not in di.get(t, {}):
                continue
            other = _best_rival(rows, t, [m for m in METHODS if m not in GOAL_RIVALS])
            others.append(f"{t}: {other[0]} {100 * other[1]:.2f}" if other[1] >= 0 else f"{t}: none run")
            rival = _best_rival(rows, t, GOAL_RIVALS)
            if rival[1] < 0:  # no rival measured at this target: neither a win nor a loss
                continue
            wins += di[t]["top1"] > rival[1]
            rivals.append(f"{t}: {rival[0]} {100 * rival[1]:.2f}")
        lines.append(f"| {name} | {gap} | {wins} / {len(rivals)} | {'; '.join(rivals)} | {'; '.join(others)} |")
    return [*lines, ""]


def ablation_lines(doc: Mapping[str, Any], key: str = "diprune_old") -> list[str]:
    """DI with every recovery, per family and target: top-1 and the seconds the rewrite + recovery took (the ablation
    that chose the default recovery ran with the defaults before issue 13: ``diprune_old``)."""
    recs = ("none", *ABLATION, DEFAULT_RECOVERY)
    lines = ["## Recovery ablation (DI plans, defaults before issue 13; top-1 %, seconds for removal + recovery)", "",
             "| family | target | " + " | ".join(recs) + " |", "|---|---|" + "---|" * len(recs)]
    for name, entry in doc.get("models", {}).items():
        for t in (str(x) for x in TARGETS):
            cell = entry.get(key, {}).get(t, {}).get("di", {})
            if "error" in cell or not cell:
                continue
            lines.append(f"| {name} | {t} | " + " | ".join(
                _timed_cell(cell.get(r)) for r in recs) + " |")
    return [*lines, ""]


def _timed_cell(cell: Mapping[str, Any] | None) -> str:
    if not cell or "top1" not in cell:
        return "not run"
    return f"{100 * cell['top1']:.2f}" + (f" ({cell['seconds']:.0f} s)" if "seconds" in cell else "")


def seed_lines(doc: Mapping[str, Any], key: str = "diprune", seeds: str = "random_seeds", label: str = "") -> list[str]:
    """DI + default recovery against random + default recovery over several seeds (mean, min..max)."""
    lines = [f"## Random selection over seeds {RANDOM_SEEDS[0]}..{RANDOM_SEEDS[-1]} (both + {DEFAULT_RECOVERY}){label}",
             "",
             "| family | target | " + f"{DI_ROW} | random+{DEFAULT_RECOVERY}: mean (min..max) | seeds |",
             "|---|---|---|---|---|"]
    for name, entry in doc.get("models", {}).items():
        rows = series(entry, key)
        for t in (str(x) for x in TARGETS):
            first = rows.get(f"random+{DEFAULT_RECOVERY}", {}).get(t, {})
            more = [c for c in entry.get(seeds, {}).get(t, {}).values() if "top1" in c]
            tops = [100 * c["top1"] for c in ([first] if "top1" in first else []) + more]
            di = rows.get(DI_ROW, {}).get(t, {})
            if len(tops) < 2 or "top1" not in di:
                continue
            lines.append(f"| {name} | {t} | {100 * di['top1']:.2f} | {np.mean(tops):.2f} ({min(tops):.2f}.."
                         f"{max(tops):.2f}) | {len(tops)} |")
    return [*lines, ""] if len(lines) > 4 else []


def _smallest_within(cells: Mapping[str, Any], orig: float) -> str:
    ok = [c["macs_fraction"] for c in cells.values() if "top1" in c and c["top1"] >= orig - 0.01]
    return f"{min(ok):.3f}" if ok else "none"


def task_lines(doc: Mapping[str, Any]) -> list[str]:
    """Task scenario: task accuracy per target and row, and the smallest fraction within 1 point of unpruned."""
    lines = [f"## Task-dependent scenario (task accuracy %, achieved MACs fraction; every row + {DEFAULT_RECOVERY})",
             "", "| task | family | row | unpruned | " + " | ".join(f"target {t:g}" for t in TASK_TARGETS) +
             " | smallest MACs fraction within 1 point |", "|---|---|---|---|" + "---|" * (len(TASK_TARGETS) + 1)]
    for task, per in sorted(doc.get("tasks", {}).items()):
        for name, entry in per.items():
            orig = entry["original"]["top1"]
            for row in TASK_ROWS:
                cells = entry.get(row, {})
                lines.append(f"| {task} | {name} | {row} | {100 * orig:.2f} | "
                             + " | ".join(_task_cell(cells.get(str(t)), t) for t in TASK_TARGETS)
                             + f" | {_smallest_within(cells, orig)} |")
    return [*lines, "`(floor)`: the planner's floor (8 channels per group, first layer and classifier input kept) "
            "lies above the target; the cell is the floor.", ""]


def _task_cell(cell: Mapping[str, Any] | None, target: float) -> str:
    text = fmt(cell)
    return f"{text} (floor)" if cell and "macs_fraction" in cell and cell["macs_fraction"] > 1.1 * target else text


def _noise(top1: float, n: int = 2000) -> float:
    """Two standard errors of a top-1 measured on ``n`` samples (a fraction)."""
    return 2 * float(np.sqrt(max(top1 * (1 - top1), 1e-12) / n))


def defaults_lines(doc: Mapping[str, Any]) -> list[str]:
    """New defaults (auto pooling, fill-back, fine steps) against the old ones (gap, greedy on round_to steps), every
    method + the default recovery, per family and target; a cell is flagged when the new defaults are worse by more
    than two standard errors of the old top-1 (the noise of 2,000 held-out digits)."""
    lines = [f"## New defaults vs old (every method + {DEFAULT_RECOVERY}; top-1 % (achieved MACs))", "",
             "New: `auto` pooling, planner with fine steps and fill-back. Old (before issue 13): `gap` pooling, greedy "
             "on `round_to` steps only. Verdict per cell: `better` / `worse` when the difference exceeds two standard "
             "errors of the old top-1 on 2,000 digits (about 0.5 points), else `same (noise)`.", "",
             "| family | target | method | new | old | change (points) | verdict |", "|---|---|---|---|---|---|---|"]
    counts: dict[str, int] = {}
    for name, entry in doc.get("models", {}).items():
        old_all = entry.get("diprune_old", {})
        for t in (str(x) for x in TARGETS):
            for method in METHODS:
                new = entry.get("diprune", {}).get(t, {}).get(method, {}).get(DEFAULT_RECOVERY)
                old = old_all.get(t, {}).get(method, {}).get(DEFAULT_RECOVERY)
                if not new or not old or "top1" not in new or "top1" not in old:
                    continue
                change = new["top1"] - old["top1"]
                verdict = ("better" if change > _noise(old["top1"]) else "worse" if change < -_noise(old["top1"])
                           else "same (noise)")
                counts[verdict] = counts.get(verdict, 0) + 1
                lines.append(f"| {name} | {t} | {method} | {fmt(new)} | {fmt(old)} | {100 * change:+.2f} | "
                             f"{verdict} |")
    if len(lines) == 6:
        return []
    summary = ", ".join(f"{v}: {n}" for v, n in sorted(counts.items()))
    return [*lines, "", f"Cells: {summary}.", ""]


def landing_lines(doc: Mapping[str, Any]) -> list[str]:
    """How close DI's plans land on each target: achieved MACs with the new and the old planner, and the smallest
    step the new planner could have added back (the achieved value must be within it of the target)."""
    lines = ["## Landing on the target (DI plans; achieved kept-MACs fraction)", "",
             "| family | target | new planner | smallest step back | target - achieved <= step | old planner |",
             "|---|---|---|---|---|---|"]
    for name, entry in doc.get("models", {}).items():
        for t in (str(x) for x in TARGETS):
            new = entry.get("diprune", {}).get(t, {}).get("di", {}).get(DEFAULT_RECOVERY, {})
            old = entry.get("diprune_old", {}).get(t, {}).get("di", {}).get(DEFAULT_RECOVERY, {})
            if "macs_fraction" not in new:
                continue
            step = new.get("step_back_macs")
            ok = "n/a" if step is None else ("yes" if float(t) - new["macs_fraction"] <= step + 1e-9 else "NO")
            lines.append(f"| {name} | {t} | {new['macs_fraction']:.3f} | "
                         f"{'n/a' if step is None else f'{step:.3f}'} | {ok} | "
                         f"{old['macs_fraction']:.3f} |" if "macs_fraction" in old else
                         f"| {name} | {t} | {new['macs_fraction']:.3f} | {'n/a' if step is None else f'{step:.3f}'} | "
                         f"{ok} | not run |")
    return [*lines, ""] if len(lines) > 4 else []


def pooling_lines(doc: Mapping[str, Any]) -> list[str]:
    """DI with the new planner, auto pooling against global average pooling (the effect of the pooling alone), and
    the pooling auto chose per probe."""
    lines = ["## Pooling alone (DI, new planner; top-1 % (achieved MACs))", "",
             "| family | target | auto, no recovery | gap, no recovery | auto + " + DEFAULT_RECOVERY + " | gap + "
             + DEFAULT_RECOVERY + " |", "|---|---|---|---|---|---|"]
    chosen = []
    for name, entry in doc.get("models", {}).items():
        gap = entry.get("diprune_gap", {})
        if not gap:
            continue
        picks = entry.get("pooling", {}).get("new", {})
        kinds = sorted(set(picks.values()))
        chosen.append(f"{name}: " + ", ".join(f"{k} x{list(picks.values()).count(k)}" for k in kinds))
        for t in (str(x) for x in TARGETS):
            auto_cell = entry.get("diprune", {}).get(t, {}).get("di", {})
            gap_cell = gap.get(t, {}).get("di", {})
            lines.append(f"| {name} | {t} | {fmt(auto_cell.get('none'))} | {fmt(gap_cell.get('none'))} | "
                         f"{fmt(auto_cell.get(DEFAULT_RECOVERY))} | {fmt(gap_cell.get(DEFAULT_RECOVERY))} |")
    if not chosen:
        return []
    return [*lines, "", "Pooling `auto` chose per probe: " + "; ".join(chosen) + ".", ""]


def report_lines(doc: Mapping[str, Any]) -> list[str]:
    """The whole markdown report."""
    proto = doc.get("protocol", {})
    machine = proto.get("machine", {})
    lines = ["# Quality benchmark: held-out top-1 % (achieved kept-MACs fraction), training-free", "",
             f"Commands: {', '.join(f'`{c}`' for c in sorted(doc.get('commands', {})))}. Machine: "
             f"{machine.get('cpu', '?')} ({machine.get('cores_available', '?')} cores), onnxruntime "
             f"{machine.get('versions', {}).get('onnxruntime', '?')}, 1 onnxruntime thread. Calibration: first "
             f"{proto.get('n_calib')} training samples (recovery: first {proto.get('n_recover')}); evaluation: the 2000 held-out samples. "
             f"`+{DEFAULT_RECOVERY}` / `+regress` / `+bias`: `pipeline.recovery.recover(method=..., sequential=True)` "
             "(R3 / R2 / R1). `random`: seed 0. Peers matched on achieved MACs by bisection on their sparsity knob; "
             "see the docstrings of `benchmarks/quality.py` and `benchmarks/peers.py`. Best cell per column in bold.",
             ""]
    lines += goal_lines(doc)
    lines += ["## Per family", ""]
    for name, entry in doc.get("models", {}).items():
        lines += family_table(name, entry)
    return [*lines, *defaults_lines(doc), *landing_lines(doc), *pooling_lines(doc), *ablation_lines(doc),
            *seed_lines(doc), *seed_lines(doc, "diprune_old", "random_seeds_old", ", defaults before issue 13"),
            *task_lines(doc), *NOTES]


NOTES = ("## Notes", "",
         "- Peers get no recovery except `onnxsim-l2+bn` (onnxsim's own training-free BatchNorm re-fit); DIPrune "
         "rows without `+recovery` are the like-for-like selection comparison.",
         "- `random` rows are seed 0 (the seed spread is in its own section); `(budget not reached)`: the peer's "
         "largest sparsity (0.98) stays above the target; `not run`: the stage did not get that far.",
         "- Resolution: 2000 held-out digits, so one digit is 0.05 points and the standard error of a top-1 near 98.5 % "
         "is about 0.27 points; differences of a few tenths between two rows are within noise.",
         "- Torch-Pruning runs on BN-free torch twins carrying the ONNX (BN-folded) weights; see `benchmarks/peers.py`.",
         "")


METHOD_COLORS = {"di": "tab:red", "lda": "tab:purple", "lda-trace": "magenta", "pls-vip": "tab:brown", "l2": "tab:blue", "random": "tab:gray"}
PEER_COLORS = {"onnxsim-l2": "tab:green", "onnxsim-l2+bn": "tab:olive", "onnxsim-wanda": "tab:cyan",
               "torch-pruning": "tab:orange", "torch-pruning-global": "tab:pink"}
RECOVERY_STYLES = {"none": ":x", DEFAULT_RECOVERY: "-o", "regress": "-.^", "bias": "--v"}


def _style(label: str) -> tuple[str, str, float]:
    """Line style, colour and width of a row: colour by method (or peer), style by recovery."""
    if label in PEER_COLORS:
        return "--s", PEER_COLORS[label], 1.0
    method, _, recovery = label.partition("+")
    return RECOVERY_STYLES[recovery or "none"], METHOD_COLORS[method], 2.5 if label == DI_ROW else 1.0


def plot_family(doc: Mapping[str, Any], name: str, path: Path) -> None:
    """Accuracy vs achieved MACs fraction for every row of one family (matplotlib, Agg): every row on the full
    scale, the recovered rows zoomed near the unpruned accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entry = doc["models"][name]
    orig = 100 * entry["original"]["top1"]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.8))
    for ax, ylim in zip(axes, ((0, 100), (orig - 6, orig + 0.5)), strict=True):
        for label, cells in series(entry).items():
            pts = sorted((c["macs_fraction"], 100 * c["top1"]) for c in cells.values() if "top1" in c)
            if pts and (ax is axes[0] or max(y for _, y in pts) > ylim[0]):
                style, color, width = _style(label)
                ax.plot(*zip(*pts, strict=True), style, color=color, label=label, linewidth=width, markersize=4)
        ax.axhline(orig, color="k", linewidth=0.8)
        ax.axhline(orig - 1, color="k", linewidth=0.8, linestyle="--")
        ax.set(xlabel="kept MACs fraction (achieved)", ylabel="held-out top-1 %", ylim=ylim)
    axes[0].set_title(f"MNIST {name}: training-free, every row")
    axes[1].set_title("zoom: unpruned (solid line) and -1 point (dashed)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("diprune", "seeds", "onnxsim", "tp", "task", "report"), required=True)
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--n-calib", type=int, default=2000, help="calibration samples (training split, first N)")
    parser.add_argument("--n-recover", type=int, default=2000, help="recovery samples (first N of the training split)")
    parser.add_argument("--peers", nargs="+", default=["torch-pruning"], help="torch stage: torch-pruning[-global]")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--no-ablation", action="store_true", help="diprune stage: skip DI's bias/regress rows")
    parser.add_argument("--defaults", choices=sorted(DEFAULTS), default="new",
                        help="diprune stage: the library's defaults (new) or those before issue 13 (old)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("graph_ops").setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    command = " ".join(["python -m benchmarks.quality", *(sys.argv[1:] if argv is None else argv)])
    if args.stage == "report":
        doc = json.loads(args.out.read_text())
        atomic_write_bytes(args.out.with_suffix(".md"), "\n".join(report_lines(doc)).encode())
        for name in doc.get("models", {}):
            plot_family(doc, name, args.out.parent / f"quality_{name}.png")
        return 0
    merge(args.out, ["commands", command], args.stage)
    merge(args.out, ["protocol"], {"n_calib": args.n_calib, "n_recover": args.n_recover, "n_eval": 2000,
                                   "targets": list(TARGETS), "methods": list(METHODS), "threads": THREADS,
                                   "random_seed": 0, "recovery": f"{DEFAULT_RECOVERY}, sequential",
                                   "machine": machine_info()})
    for name in args.models:
        start = time.perf_counter()
        if args.stage == "diprune":
            diprune_model(name, args.n_calib, args.n_recover, args.targets, args.methods, args.out, args.defaults,
                          ablation=not args.no_ablation)
        elif args.stage == "seeds":
            random_seeds_model(name, args.n_calib, args.n_recover, args.targets, args.out)
        elif args.stage == "task":
            for task in args.tasks:
                task_model(name, task, TASK_TARGETS, args.n_calib, args.out)
        else:
            for peer in (("onnxsim-l2", "onnxsim-wanda") if args.stage == "onnxsim" else tuple(args.peers)):
                peer_model(name, peer, args.targets, args.n_calib, args.out)
        merge(args.out, ["seconds", args.stage, name], round(time.perf_counter() - start, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
