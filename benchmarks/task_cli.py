"""Task-dependent pruning from the command line: the smallest model within 1 point of the unpruned model's task accuracy.

For the demo CNN and the four MNIST families (``benchmarks/models``), two tasks and two criteria, one command each::

    diprune prune MODEL --data mnist --limit 4000 --eval-data mnist --method {di,l2} --max-drop 1 \\
        {--task-classes 3,8 | --task-map odd_even.json} -o OUT.onnx

(``odd_even.json`` = ``{"odd": [1, 3, 5, 7, 9], "even": [0, 2, 4, 6, 8]}``). Calibration: the task's samples among the
first 4,000 training digits (about 800 for 3-vs-8, all 4,000 for odd/even), recovery ``lstsq`` (the default);
evaluation: the task's samples among the 2,000 held-out digits. ``--max-drop 1`` searches the MACs budget (the smallest
reachable model first, then a geometric bisection, 6 steps) for the smallest model whose held-out task accuracy stays
within 1 point of the unpruned model's; the report lists every budget tried. The smallest reachable model is the
planner's floor (8 channels per group, first layer and classifier input kept). Each command runs in its own process.

Run from the repository root: ``python -m benchmarks.task_cli`` (about 30 minutes on 2 cores); writes
``benchmarks/results/task_cli.json`` and ``task_cli.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"cnn (demo)": "pipeline/assets/mnist_cnn.onnx", "vgg": "benchmarks/models/mnist_vgg.onnx",
          "resnet": "benchmarks/models/mnist_resnet.onnx", "mobilenet": "benchmarks/models/mnist_mobilenet.onnx",
          "inception": "benchmarks/models/mnist_inception.onnx"}
TASKS = {"3-vs-8": ["--task-classes", "3,8"], "odd-vs-even": ["--task-map", "{work}/odd_even.json"]}
METHODS = ("di", "l2")
LIMIT = 4000


def run_one(model: str, task: str, method: str, work: Path) -> dict[str, Any]:
    """One CLI command; returns what its report says."""
    out = work / f"{Path(model).stem}.{task}.{method}.onnx"
    task_args = [a.format(work=work) for a in TASKS[task]]
    command = [sys.executable, "-m", "pipeline.cli", "-q", "prune", str(ROOT / model), "--data", "mnist", "--limit",
               str(LIMIT), "--eval-data", "mnist", "--method", method, "--max-drop", "1", *task_args, "-o", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else str(done.returncode),
                "exit": done.returncode, "seconds": seconds, "command": " ".join(command[2:])}
    report = json.loads(Path(f"{out}.report.json").read_text())
    return {"macs_fraction": report["macs_fraction"], "params_fraction": report["params_fraction"],
            "top1_original": report["evaluation"]["original"]["top1"],
            "top1_pruned": report["evaluation"]["pruned"]["top1"], "search": report["search"],
            "samples": report["evaluation"]["pruned"]["n"], "dropped": report["task"]["dropped_samples"],
            "seconds": seconds, "command": " ".join(command[2:])}


def markdown(doc: dict[str, Any]) -> str:
    """The results table."""
    machine = doc["machine"]
    lines = [f"# Task-dependent pruning from the CLI ({machine['cpu']}, {machine['cores_available']} cores, "
             f"onnxruntime {machine['versions'].get('onnxruntime')})", "",
             "Smallest achieved MACs fraction within 1 point of the unpruned model's held-out task accuracy "
             "(`diprune prune --max-drop 1`, lstsq recovery; see `benchmarks/task_cli.py`). Cells: MACs fraction "
             "(task top-1 %, unpruned top-1 %).", "",
             "| model | task | di | l2 |", "|---|---|---|---|"]
    for model in doc["results"]:
        for task in TASKS:
            cells = []
            for method in METHODS:
                r = doc["results"][model][task][method]
                cells.append(f"error: {r['error']}" if "error" in r else
                             f"{r['macs_fraction']:.3f} ({100 * r['top1_pruned']:.2f}, {100 * r['top1_original']:.2f})")
            lines.append(f"| {model} | {task} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def main() -> None:
    """Run every command and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "task_cli")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = parser.parse_args()
    from pipeline.deployment.bench import machine_info

    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "odd_even.json").write_text(json.dumps({"odd": [1, 3, 5, 7, 9], "even": [0, 2, 4, 6, 8]}))
    results: dict[str, Any] = {}
    for model in args.models:
        for task in TASKS:
            for method in METHODS:
                results.setdefault(model, {}).setdefault(task, {})[method] = cell = run_one(
                    MODELS[model], task, method, args.work)
                print(model, task, method, {k: v for k, v in cell.items() if k != "search"}, flush=True)
    doc = {"limit": LIMIT, "max_drop_points": 1, "results": results, "machine": machine_info()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "task_cli.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / "task_cli.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
