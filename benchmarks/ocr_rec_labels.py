"""DI with the model's own labels on a production CTC recognizer: PP-OCRv4 (rapidocr-onnxruntime) at 0.5 of the MACs.

Usage::

    .venv/bin/python -m benchmarks.ocr_rec_labels [--calib 512] [--eval 400] [--target 0.5] [--batch 16]
        [--runs di-model,di-text,l2,random:0,random:1] [--work work/ocr_rec]

Data (:mod:`benchmarks.ocr_lines`): ``--calib`` rendered lines (seed 1) for calibration and recovery, saved as an
``.npz`` of inputs ``x`` and, for ``di-text``, the texts as class ids ``y`` ``(N, L)`` padded with -1; ``--eval``
held-out lines (seed 2) with their texts. Every run is the CLI as a user types it (``pipeline.cli.main``)::

    diprune prune ch_PP-OCRv4_rec_infer.onnx --input-shape x:Bx3x48x320 --data cal.npz --method M
        --target-macs 0.5 [--labels model | --label-format text] [--seed S] -o OUT.onnx

``B`` = ``--batch`` (default 16): the input shape is pinned as ``--input-shape`` requires (static dims), with a batch
of 16 so that calibration and recovery run 16 lines per onnxruntime call (with ``x:1x3x48x320`` the same command runs
one line per call, several times slower here; the same statistics up to rounding, while recovery holds out other
samples, every fifth batch, to choose its ridge).

with the default recovery (``lstsq``): ``di-model`` = DI with ``--labels model`` (the calibration ``.npz`` holds
no labels: the recognizer's own best path per time step), ``di-text`` = DI with the texts aligned to the time steps
through the original's output (``--label-format text``), ``l2`` the weight norm, ``random:S`` random channels with
seed ``S``; a run name ending in ``/R`` prunes with ``--recover R`` (e.g. ``di-model/none``: the selection alone,
without recovery). Metrics on the held-out lines (batches of ``B``, onnxruntime CPU, greedy CTC decoding, leading/trailing spaces
stripped): exact-line accuracy (with its binomial standard error) and character error rate (edit distance / reference
length, summed over lines). Writes ``benchmarks/results/NAME.json`` and ``.md`` with the machine (``--name``, default
``ocr_rec_labels``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.ocr_lines import MODEL, decode, dictionary, encode, render
from benchmarks.output import write_results

RESULTS = Path(__file__).resolve().parent / "results"


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _metrics(path: Path, x: np.ndarray, texts: list[str], classes: list[str], batch: int) -> dict[str, float]:
    import onnxruntime as ort

    from pipeline.data.outputs import ctc_best_path

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    padded = np.concatenate([x, np.zeros((-len(x) % batch, *x.shape[1:]), x.dtype)])
    out = np.concatenate([session.run(None, {name: padded[i:i + batch]})[0]
                          for i in range(0, len(padded), batch)])[:len(x)]
    pred = [p.strip() for p in decode(ctc_best_path(out), classes)]
    exact = float(np.mean([p == t for p, t in zip(pred, texts, strict=True)]))
    errors = sum(_edit_distance(p, t) for p, t in zip(pred, texts, strict=True))
    return {"exact": exact, "exact_se": float(np.sqrt(exact * (1 - exact) / len(texts))),
            "cer": errors / sum(len(t) for t in texts)}


def _prune(run: str, cal: Path, out: Path, target: float, batch: int) -> dict[str, object]:
    from pipeline.cli import main

    run, _, recovery = run.partition("/")
    method, _, seed = run.partition(":")
    argv = ["-q", "prune", str(MODEL), "--input-shape", f"x:{batch}x3x48x320", "--data", str(cal), "--target-macs",
            str(target), "-o", str(out)]
    if method == "di-model":
        argv += ["--method", "di", "--labels", "model"]
    elif method == "di-text":
        argv += ["--method", "di", "--label-format", "text"]
    else:
        argv += ["--method", method]
    if seed:
        argv += ["--seed", seed]
    if recovery:
        argv += ["--recover", recovery]
    stdout = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    if code:
        raise SystemExit(f"{run}: diprune exited with {code}")
    report = json.loads(Path(f"{out}.report.json").read_text())
    return {"argv": argv, "seconds": round(time.perf_counter() - start, 1), "result_line": stdout.getvalue().strip(),
            "macs_fraction": report["macs_fraction"], "params_fraction": report["params_fraction"],
            "timings_s": report["timings_s"]}


def main() -> None:
    """Run the benchmark (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--eval", type=int, default=400)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", default="di-model,di-text,l2,random:0,random:1")
    parser.add_argument("--work", default="work/ocr_rec")
    parser.add_argument("--name", default="ocr_rec_labels", help="results file name (benchmarks/results/NAME.*)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    classes = dictionary()
    x_cal, t_cal = render(args.calib, 1, classes)
    cal, cal_text = work / "cal.npz", work / "cal_text.npz"
    np.savez(cal, x=x_cal)
    np.savez(cal_text, x=x_cal, y=encode(t_cal, classes))
    x_eval, t_eval = render(args.eval, 2, classes)
    rows = {"original": {"metrics": _metrics(MODEL, x_eval, t_eval, classes, args.batch)}}
    print(f"original: {rows['original']['metrics']}", flush=True)
    for run in args.runs.split(","):
        out = work / f"{run.replace(':', '_').replace('/', '_')}.onnx"
        record = _prune(run, cal_text if run.startswith("di-text") else cal, out, args.target, args.batch)
        record["metrics"] = _metrics(out, x_eval, t_eval, classes, args.batch)
        rows[run] = record
        print(f"{run}: {record['metrics']} ({record['seconds']} s)", flush=True)
    from pipeline.deployment.bench import machine_info

    doc = {"model": str(MODEL), "batch": args.batch, "calibration_lines": args.calib, "eval_lines": args.eval, "target_macs": args.target,
           "machine": machine_info(), "conditions": "2-core VM shared with other jobs (timings are not comparable "
           "across runs)", "runs": rows}
    lines = [f"# PP-OCRv4 recognizer at {args.target:g} of the MACs: labels from the model", "",
             f"{args.calib} rendered calibration lines, {args.eval} held-out lines (`python -m "
             f"benchmarks.ocr_rec_labels --runs {args.runs}`); lstsq recovery unless the run name ends in /none (no "
             f"recovery); batch {args.batch}; exact-line accuracy +- its standard error, character error rate; 2-core "
             "VM shared with other jobs (times not comparable).", "",
             "| run | exact line % | CER % | MACs | time (s) |", "|---|---|---|---|---|"]
    for run, record in rows.items():
        m = record["metrics"]
        lines.append(f"| {run} | {100 * m['exact']:.1f} +- {100 * m['exact_se']:.1f} | {100 * m['cer']:.2f} | "
                     f"{record.get('macs_fraction', 1.0):.3f} | {record.get('seconds', '')} |")
    write_results(RESULTS / f"{args.name}.json", doc, lambda _: "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
