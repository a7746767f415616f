"""DI with the model's own labels against DI with the true labels, on the shipped MNIST CNN and the MNIST families.

Usage::

    .venv/bin/python -m benchmarks.mnist_model_labels [--models demo,vgg,resnet,mobilenet,inception,lenet]
        [--targets 0.5,0.35,0.25] [--calib 2000]

Per model: one :class:`pipeline.prune.orchestrate.PruneRun` on the first ``--calib`` training digits of the shipped
``mnist10k.npz`` with the digits' labels (``--labels data``) and one with the labels removed (the model's own argmax,
``--labels model``); DI at every MACs target with the default lstsq recovery; top-1 on the 2,000 held-out digits.
A difference counts as noise when it is within two standard errors of a difference of two accuracies measured on
the same digits, ``2 sqrt(d / n)`` with ``d`` the fraction of digits the two pruned models classify differently
(McNemar's normal approximation). Writes ``benchmarks/results/mnist_model_labels.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.output import write_results

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = Path(__file__).resolve().parent / "models"


def _path(name: str) -> Path:
    from pipeline.prune.demo import demo_model_path

    return Path(demo_model_path()) if name == "demo" else MODELS / f"mnist_{name}.onnx"


def _predictions(model: object, data: object) -> np.ndarray:
    from pipeline.model.runtime import open_session

    session = open_session(model.SerializeToString(), "ort-cpu")
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: feeds[next(iter(feeds))]})[0].argmax(axis=1)
                           for feeds, _ in data.batches(500)])


def main() -> None:
    """Run the benchmark (module docstring)."""
    from pipeline.data.datasets import from_iterable
    from pipeline.data.named import open_dataset
    from pipeline.data.targets import LabelOptions
    from pipeline.deployment.bench import machine_info
    from pipeline.prune.orchestrate import PruneRun

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,vgg,resnet,mobilenet,inception,lenet")
    parser.add_argument("--targets", default="0.5,0.35,0.25")
    parser.add_argument("--calib", type=int, default=2000)
    args = parser.parse_args()
    labelled = open_dataset("mnist", split="train", limit=args.calib)
    x = labelled.loader(np.arange(labelled.num_samples))[labelled.keys[0]]
    unlabelled = from_iterable([(x, None)], name=f"mnist train[:{args.calib}] without labels")
    test = open_dataset("mnist", split="test")
    truth = np.asarray(test.labels)
    rows = []
    for name in args.models.split(","):
        runs = {"data": PruneRun(_path(name), labelled, progress=False, labels=LabelOptions(source="data")),
                "model": PruneRun(_path(name), unlabelled, progress=False, labels=LabelOptions(source="model"))}
        original = float(np.mean(_predictions(runs["data"].prepared.model, test) == truth))
        for target in (float(t) for t in args.targets.split(",")):
            preds, record = {}, {"network": name, "target_macs": target, "original": original}
            for source, run in runs.items():
                start = time.perf_counter()
                candidate = run.candidate("di", target_macs=target)
                preds[source] = _predictions(candidate.model, test)
                record[source] = float(np.mean(preds[source] == truth))
                record[f"{source}_seconds"] = round(time.perf_counter() - start, 1)
            differ = float(np.mean(preds["data"] != preds["model"]))
            record["differ"] = differ
            record["two_se"] = 2 * float(np.sqrt(differ / len(truth)))
            record["within_noise"] = abs(record["data"] - record["model"]) <= record["two_se"]
            rows.append(record)
            print(record, flush=True)
    doc = {"calibration_digits": args.calib, "test_digits": len(truth), "machine": machine_info(),
           "conditions": "2-core VM shared with other jobs", "rows": rows}

    def markdown(d: dict) -> str:
        lines = ["# DI with the model's own labels vs the true labels (MNIST)", "",
                 f"`python -m benchmarks.mnist_model_labels`: {d['calibration_digits']} calibration digits, lstsq "
                 f"recovery, top-1 % on {d['test_digits']} held-out digits; noise = 2 standard errors of the paired "
                 "difference (McNemar).", "",
                 "| model | MACs target | original | DI, data labels | DI, model labels | difference | 2 SE | "
                 "within noise |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['network']} | {r['target_macs']:g} | {100 * r['original']:.2f} | {100 * r['data']:.2f} | "
                  f"{100 * r['model']:.2f} | {100 * (r['model'] - r['data']):+.2f} | {100 * r['two_se']:.2f} | "
                  f"{'yes' if r['within_noise'] else 'no'} |" for r in d["rows"]]
        within = sum(r["within_noise"] for r in d["rows"])
        return "\n".join(lines) + f"\n\nWithin noise in {within} of {len(d['rows'])} cells.\n"

    print(write_results(RESULTS / "mnist_model_labels.json", doc, markdown))


if __name__ == "__main__":
    main()
