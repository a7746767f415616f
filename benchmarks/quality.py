"""Issue-4 quality benchmark: held-out top-1 vs achieved kept-MACs, DIPrune (with and without recovery) vs peers.

Protocol. Models: ``benchmarks/models/mnist_{vgg,resnet,mobilenet,inception}.onnx``. Calibration: the first ``N``
samples of the MNIST training split (``--n-calib``, default 2000; recovery uses the first ``--n-recover`` of them,
default 1000); evaluation: the 2000 held-out samples (8000..9999). DIPrune reuses :class:`benchmarks.selection.Runner`
(one calibration per model, statistics shared by every statistics-based method and budget), then for every kept-MACs
target ``0.5, 0.35, 0.25, 0.125`` and method ``di, lda, pls-vip, l2, random`` (random: seed 0 only) the planner's
plan is applied (``graph_ops.prune.apply_plan``), optionally recovered (``pipeline.recover.recover``, R2 ``regress``,
sequential error correction, the library default) and evaluated with onnxruntime (1 thread). The achieved MACs
fraction is always counted on the written graph with ``graph_ops.cost.count``. Peers (``benchmarks/peers.py``) are
run on the same ONNX files / data and matched on achieved MACs by bisection on their sparsity knob.

Task-dependent scenario (``--stage task``): 3-vs-8 and odd-vs-even. Calibration labels of that task only (binary
relabelling of the first ``N`` training samples of the task: only 3s and 8s for 3-vs-8, every digit for
odd-vs-even; recovery uses the same samples); the
10-class head is kept and evaluation is on the task's held-out samples with *grouped logits*: the predicted task
class is the group (``{3}`` vs ``{8}``; odd vs even digits) holding the largest logit (for 3-vs-8 this is argmax
restricted to the two task classes).

Every stage merges its results into ``benchmarks/results/quality.json`` under a file lock as soon as one model is
done, so partial results survive. Run from the repository root::

    python -m benchmarks.quality --stage diprune [--models vgg resnet]
    python -m benchmarks.quality --stage onnxsim | tp | task
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
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.selection import MODELS as ALL_MODELS
from benchmarks.selection import Runner
from graph_ops.cost import count
from graph_ops.errors import PruneError
from graph_ops.io import atomic_write_bytes
from graph_ops.prune import apply_plan
from pipeline.bench import machine_info
from pipeline.data import from_iterable, open_dataset
from pipeline.evaluate import evaluate
from pipeline.orchestrate import keep_lists
from pipeline.recover import recover

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FAMILIES = ("vgg", "resnet", "mobilenet", "inception")
MODELS = {f: ALL_MODELS[f] for f in FAMILIES}
TARGETS = (0.5, 0.35, 0.25, 0.125)
METHODS = ("di", "lda", "pls-vip", "l2", "random")
RECOVERIES = ("none", "regress")
THREADS = 1
TASKS = {"3-vs-8": ((3,), (8,)), "odd-vs-even": ((1, 3, 5, 7, 9), (0, 2, 4, 6, 8))}


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


def diprune_point(runner: Runner, keep: Mapping[str, Sequence[int]], recovery: str, calib: Any) -> dict[str, Any]:
    """One plan, rewritten and (optionally) recovered, measured."""
    start = time.perf_counter()
    pruned = apply_plan(runner.prepared.model, runner.prepared.index, {g: tuple(k) for g, k in keep.items()})
    if recovery != "none":
        pruned, _ = recover(runner.prepared.model, pruned, runner.prepared.index, keep, calib, method=recovery,
                            sequential=True, backend="ort-cpu", intra_op_threads=THREADS)
    return measured(pruned, runner.full.macs, runner.full.params, runner.test,
                    seconds=round(time.perf_counter() - start, 2))


def diprune_model(name: str, n_calib: int, n_recover: int, targets: Sequence[float], methods: Sequence[str],
                  out: Path) -> None:
    """The DIPrune sweep of one model; each (target, method) cell is merged into ``out`` as it is done."""
    test = open_dataset("mnist", split="test")
    runner = Runner(MODELS[name], test, n_calib)
    calib = open_dataset("mnist", split="train", limit=n_recover)
    merge(out, ["models", name, "original"], {"top1": runner.original_top1, "macs": runner.full.macs,
                                              "params": runner.full.params, "file": str(MODELS[name].relative_to(ROOT))})
    for method in methods:
        scores = runner.scores(method, seed=0)
        for target in targets:
            try:
                keep = keep_lists(runner.plan(scores, target))
            except PruneError as err:
                merge(out, ["models", name, "diprune", str(target), method], {"error": str(err)})
                continue
            for recovery in RECOVERIES:
                try:
                    cell = diprune_point(runner, keep, recovery, calib)
                except PruneError as err:
                    cell = {"error": f"{type(err).__name__}: {err}"}
                merge(out, ["models", name, "diprune", str(target), method, recovery], cell)
                logger.info("%s %s %s %s: %s", name, method, target, recovery, cell)


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


def task_dataset(split: str, task: str, limit: int | None = None) -> tuple[Any, np.ndarray]:
    """The first ``limit`` task samples of a split, binary labels (0: first group, 1: second), and their digits."""
    base = open_dataset("mnist", split=split)
    first, second = TASKS[task]
    digits = np.asarray(base.labels)
    rows = np.flatnonzero(np.isin(digits, first + second))[:limit]
    x = base.loader(rows)[base.keys[0]]
    binary = np.isin(digits[rows], second).astype(np.int64)
    return from_iterable([(x, binary)], name=f"mnist {split} {task}"), digits[rows]


def task_top1(model: onnx.ModelProto, data: Any, task: str) -> float:
    """Grouped-logits accuracy: the predicted group is the one holding the largest logit."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    first, second = TASKS[task]
    correct = total = 0
    for feeds, labels in data.batches(500):
        logits = session.run(None, {name: next(iter(feeds.values()))})[0]
        pred = (logits[:, list(second)].max(axis=1) > logits[:, list(first)].max(axis=1)).astype(np.int64)
        correct += int((pred == labels).sum())
        total += len(labels)
    return correct / total


def task_model(name: str, task: str, targets: Sequence[float], n_calib: int, out: Path) -> None:
    """DI with task labels (and regress recovery) at each target; task accuracy on the task's held-out samples."""
    from pipeline.calibrate import calibrate, default_probes
    from pipeline.orchestrate import prepare, score
    from pipeline.plan import select_channels

    prepared = prepare(MODELS[name])
    calib, _ = task_dataset("train", task, limit=n_calib)
    test, _ = task_dataset("test", task)
    full = count(prepared.model)
    stats = calibrate(prepared.path, calib, probes=default_probes(prepared.model, prepared.index), pooling="gap",
                      backend="ort-cpu", intra_op_threads=THREADS, progress=False, canonical=prepared.model)
    merge(out, ["tasks", task, name, "original"], {"top1": task_top1(prepared.model, test, task)})
    scores = score(prepared, stats, "di")
    for target in targets:
        try:
            keep = keep_lists(select_channels(scores, prepared.index, target_macs=target))
            pruned = apply_plan(prepared.model, prepared.index, keep)
            pruned, _ = recover(prepared.model, pruned, prepared.index, keep, calib, method="regress",
                                sequential=True, backend="ort-cpu", intra_op_threads=THREADS)
            cell = {"top1": task_top1(pruned, test, task), "macs_fraction": count(pruned).macs / full.macs}
        except PruneError as err:
            cell = {"error": f"{type(err).__name__}: {err}"}
        merge(out, ["tasks", task, name, str(target)], cell)
        logger.info("%s %s %s: %s", task, name, target, cell)


def series(entry: Mapping[str, Any]) -> dict[str, dict[str, Mapping[str, Any]]]:
    """``{row label: {target: cell}}`` for one model: DIPrune method (+R2) rows, then the peers."""
    rows: dict[str, dict[str, Mapping[str, Any]]] = {}
    for method in METHODS:
        for recovery in RECOVERIES:
            label = method if recovery == "none" else f"{method}+R2"
            cells = {t: per[method] for t, per in entry.get("diprune", {}).items() if method in per}
            rows[label] = {t: c if "error" in c else c[recovery] for t, c in cells.items()
                           if "error" in c or recovery in c}
    for peer in PEER_ROWS:
        if peer in entry:
            rows[peer] = dict(entry[peer])
    return {k: v for k, v in rows.items() if v}


PEER_ROWS = ("onnxsim-l2", "onnxsim-l2+bn", "onnxsim-wanda", "torch-pruning", "torch-pruning-global")


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


def goal_lines(doc: Mapping[str, Any]) -> list[str]:
    """The issue's goal: DI+R2 within 1 point at 0.25, and ahead of every other row at every target."""
    lines = ["## Goal check (DI + R2 regress, sequential)", "",
             "| family | DI+R2 at 0.25 vs unpruned (points) | targets where DI+R2 is best / run | best other row per target |",
             "|---|---|---|---|"]
    for name, entry in doc.get("models", {}).items():
        rows = series(entry)
        di = rows.get("di+R2", {})
        orig = entry["original"]["top1"]
        gap = f"{100 * (di['0.25']['top1'] - orig):+.2f}" if "top1" in di.get("0.25", {}) else "n/a"
        wins, others = 0, []
        for t in (str(x) for x in TARGETS):
            if "top1" not in di.get(t, {}):
                continue
            rival = max(((lab, c[t]["top1"]) for lab, c in rows.items() if lab != "di+R2" and "top1" in c.get(t, {})),
                        key=lambda item: item[1], default=("-", -1.0))
            wins += di[t]["top1"] >= rival[1]
            others.append(f"{t}: {rival[0]} {100 * rival[1]:.2f}")
        lines.append(f"| {name} | {gap} | {wins} / {len(others)} | {'; '.join(others)} |")
    return [*lines, ""]


def task_lines(doc: Mapping[str, Any]) -> list[str]:
    """Task scenario: task accuracy per target and the smallest fraction within 1 point of the unpruned model."""
    lines = ["## Task-dependent scenario (DI with task labels + R2; grouped-logit task accuracy)", "",
             "| task | family | unpruned | " + " | ".join(f"target {t}" for t in TARGETS) +
             " | smallest MACs fraction within 1 point |", "|---|---|---|" + "---|" * (len(TARGETS) + 1)]
    for task, per in sorted(doc.get("tasks", {}).items()):
        for name, cells in per.items():
            orig = cells["original"]["top1"]
            ok = [c["macs_fraction"] for t, c in cells.items() if t != "original" and "top1" in c
                  and c["top1"] >= orig - 0.01]
            smallest = f"{min(ok):.3f}" if ok else "none"
            lines.append(f"| {task} | {name} | {100 * orig:.2f} | " + " | ".join(fmt(cells.get(str(t))) for t in TARGETS)
                         + f" | {smallest} |")
    return [*lines, ""]


def report_lines(doc: Mapping[str, Any]) -> list[str]:
    """The whole markdown report."""
    proto = doc.get("protocol", {})
    lines = ["# Quality benchmark: held-out top-1 % (achieved kept-MACs fraction), training-free", "",
             f"Commands: {', '.join(f'`{c}`' for c in sorted(doc.get('commands', {})))}. Machine: "
             f"{proto.get('machine', {}).get('cpu', '?')} ({proto.get('machine', {}).get('cores_available', '?')} "
             f"cores), 1 onnxruntime thread. Calibration: first {proto.get('n_calib')} training samples "
             f"(recovery: first {proto.get('n_recover')}); evaluation: the 2000 held-out samples. `+R2`: "
             "`pipeline.recover.recover(method='regress', sequential=True)`. `random`: seed 0. Peers matched on "
             "achieved MACs by bisection on their sparsity knob; see the docstrings of `benchmarks/quality.py` and "
             "`benchmarks/peers.py`. Best cell per column in bold.", ""]
    lines += goal_lines(doc)
    lines += ["## Per family", ""]
    for name, entry in doc.get("models", {}).items():
        lines += family_table(name, entry)
    return [*lines, *task_lines(doc)]


def plot_family(doc: Mapping[str, Any], name: str, path: Path) -> None:
    """Accuracy vs achieved MACs fraction for every row of one family (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entry = doc["models"][name]
    orig = 100 * entry["original"]["top1"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, ylim in zip(axes, ((0, 100), (orig - 8, orig + 0.5)), strict=True):
        for label, cells in series(entry).items():
            pts = sorted((c["macs_fraction"], 100 * c["top1"]) for c in cells.values() if "top1" in c)
            if pts:
                style = "-o" if label.endswith("+R2") else "--s" if label in PEER_ROWS else ":x"
                ax.plot(*zip(*pts, strict=True), style, label=label, linewidth=2.5 if label == "di+R2" else 1,
                        markersize=4)
        ax.axhline(orig, color="k", linewidth=0.8)
        ax.axhline(orig - 1, color="k", linewidth=0.8, linestyle="--")
        ax.set(xlabel="kept MACs fraction (achieved)", ylabel="held-out top-1 %", ylim=ylim)
    axes[0].set_title(f"MNIST {name}: training-free")
    axes[1].set_title("zoom: unpruned (solid) and -1 point (dashed)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("diprune", "onnxsim", "tp", "task", "report"), required=True)
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--n-calib", type=int, default=2000, help="calibration samples (training split, first N)")
    parser.add_argument("--n-recover", type=int, default=1000, help="recovery samples (first N of the training split)")
    parser.add_argument("--peers", nargs="+", default=["torch-pruning"], help="torch stage: torch-pruning[-global]")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
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
                                   "random_seed": 0, "recovery": "regress, sequential", "machine": machine_info()})
    for name in args.models:
        start = time.perf_counter()
        if args.stage == "diprune":
            diprune_model(name, args.n_calib, args.n_recover, args.targets, args.methods, args.out)
        elif args.stage == "task":
            for task in args.tasks:
                task_model(name, task, args.targets, args.n_calib, args.out)
        else:
            for peer in (("onnxsim-l2", "onnxsim-wanda") if args.stage == "onnxsim" else tuple(args.peers)):
                peer_model(name, peer, args.targets, args.n_calib, args.out)
        merge(args.out, ["seconds", args.stage, name], round(time.perf_counter() - start, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
