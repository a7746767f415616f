"""Issue-31 benchmark: ``diprune finetune`` beside a plain training loop on the same pruned models and data.

Protocol. Models: the shipped MNIST CNN (``cnn``) and the MNIST families of ``benchmarks/models`` (trained on samples
0..7999 of ``pipeline/assets/mnist10k.npz``), the third-party pretrained MNIST CNN of the ``ccexam`` wheel
(``ccexam``, exported by :func:`benchmarks.allocation.ccexam_model`), and the real text-direction classifier of
PaddleOCR (``ch_ppocr_mobile_v2.0_cls_infer.onnx``, ``cls``: ``--ocr`` names the folder of ``benchmarks/ocr_data.py``'s
rendered ``cls.npz`` and the unpacked models). Data: the first 2,000 training digits (calibration, recovery and
training), the 2,000 held-out digits for evaluation (one digit = 0.05 points); ``cls``: the rendered lines'
training and test parts. Pruned models: ``PruneRun.candidate("di", target_macs=t)`` with the library's defaults
(lstsq recovery), the ends pruned too when the protected floor lies above 1.1 x the target (as in
``benchmarks/finetune.py``); every loop starts from the same pruned model. Loops, for 1 and 3 epochs:

* ``diprune``: :func:`pipeline.training.finetune.finetune` with :class:`pipeline.training.finetune.FinetuneOptions` (the library's
  defaults; ``diprune[NAME]``: the defaults with one change from :data:`VARIANTS`, the tuning rows the defaults
  were chosen from). It holds 10 % of the training data out for choosing the epoch and trains on the rest;
* ``adam-ce``: a plain loop as users write it: the converted model in train mode (BatchNorm on batch statistics),
  every parameter, Adam at 1e-3, constant rate, batch 64, cross-entropy on the labels, all the training data;
* ``adam-kd``: the same loop with a plain distillation loss (``T^2 KL(t/T || s/T) + CE`` at ``T = 4``, the
  original's logits as the teacher).

The plain loops run at a constant rate, so their 1-epoch result is the first epoch of the 3-epoch run (the same
steps). Every cell is merged into ``benchmarks/results/finetune_loops.json`` as soon as it is done (cells already
there are skipped, each with the held-out digits it gets wrong); ``--report`` writes the markdown, where the
defaults meet the better plain loop per cell: the difference of the means over the seeds and an exact McNemar test
on the held-out digits, pooled over the seeds. Run from the repository root::

    python -m benchmarks.finetune_loops --models cnn lenet --targets 0.25 0.1 --loops diprune adam-ce adam-kd
    python -m benchmarks.finetune_loops --models ccexam --targets 0.1 --epochs 1
    python -m benchmarks.finetune_loops --models cls --targets 0.5 --ocr work/ocr
    python -m benchmarks.finetune_loops --report
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.output import command_line, log_to_stderr, rewrite_markdown
from benchmarks.quality import RESULTS, THREADS, merge
from benchmarks.selection import MODELS as MNIST_MODELS
from pipeline.data.named import open_dataset
from pipeline.deployment.bench import machine_info
from pipeline.model.torch_bridge import torch_settings
from pipeline.prune.orchestrate import PruneRun
from pipeline.training.finetune import FinetuneOptions, finetune
from pipeline.training.loop import as_tensors, batches, converted, teacher_logits

logger = logging.getLogger(__name__)

FAMILIES = ("cnn", "lenet", "vgg", "resnet", "mobilenet", "inception", "ccexam", "cls")
TARGETS = (0.5, 0.35, 0.25, 0.1)
EPOCHS = (1, 3)
N_TRAIN = 2000
PLAIN_LR, PLAIN_BATCH, TEMPERATURE = 1e-3, 64, 4.0
VARIANTS: dict[str, dict[str, Any]] = {  # settings a row changes from the defaults: diprune[b64,lr3e-3] applies both
    "lr1e-3": {"lr": 1e-3}, "lr3e-3": {"lr": 3e-3}, "lr1e-2": {"lr": 1e-2}, "cosine": {"schedule": "cosine"},
    "constant": {"schedule": "constant"}, "ce0.5": {"ce_weight": 0.5}, "ce1": {"ce_weight": 1.0},
    "kd-only": {"ce_weight": 0.0}, "b32": {"batch_size": 32}, "b64": {"batch_size": 64},
    "b128": {"batch_size": 128}, "val0": {"validation": 0.0}, "lr3e-4": {"lr": 3e-4},
    "z0": {"noise_z": 0.0},  # the rule before: any rise of the validation objective returns the input
}
PLAIN = ("adam-ce", "adam-kd")
OURS = "diprune"  # the library's defaults (``protocol.defaults`` of the JSON); diprune[...] rows change one setting
LOOPS = ("diprune", *PLAIN)  # and diprune[VARIANT,...]


def loop_name(text: str) -> str:
    """``diprune``, a plain loop, or ``diprune[v1,v2]`` with known variants (argparse type)."""
    if text in LOOPS or (text.startswith("diprune[") and text.endswith("]")
                         and all(v in VARIANTS for v in text[len("diprune["):-1].split(","))):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use {', '.join(LOOPS)} or diprune[{','.join(VARIANTS)}]")
OUT = RESULTS / "finetune_loops.json"


def cls_files(ocr: Path) -> tuple[Path, Path]:
    """The text-direction classifier (its batch dim made symbolic: the file declares it as -1) and its data."""
    from benchmarks.recovery_production import batch_free_file

    return batch_free_file("cls", ocr), ocr / "cls.npz"


def batch_free(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a symbolic batch dim again (``--input-shape`` fixed it to 1 for the MACs budget)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for info in [*out.graph.input, *out.graph.output]:
        info.type.tensor_type.shape.dim[0].Clear()
        info.type.tensor_type.shape.dim[0].dim_param = "N"
    del out.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(out)


def datasets(name: str, ocr: Path | None) -> tuple[Any, Any, Path, dict[str, Any]]:
    """Training data, test data, the model file and PruneRun options of one family."""
    if name != "cls":
        if name == "ccexam":
            from benchmarks.allocation import WORK, ccexam_model

            WORK.mkdir(parents=True, exist_ok=True)
            path = ccexam_model(WORK)
        else:
            path = MNIST_MODELS[name]
        return open_dataset("mnist", split="train", limit=N_TRAIN), open_dataset("mnist", split="test"), path, {}
    if ocr is None:
        raise SystemExit("the cls model needs --ocr (the folder of benchmarks/ocr_data.py's cls.npz and models)")
    model, data = cls_files(ocr)
    norm = {"mean": [0.5], "std": [0.5]}
    return (open_dataset(data, split="train", **norm), open_dataset(data, split="test", **norm), model,
            {"input_shapes": {"x": (1, 3, 48, 192)}})


def torch_scored(graph: Any, torch: Any, test: Any, logits: str) -> dict[str, Any]:
    """Top-1 of a converted model (eval mode) on the test data and the test samples it gets wrong."""
    graph.module.eval()
    bound = test.bind(list(graph.inputs))
    right = []
    with torch.no_grad():
        for _, feeds, labels in batches(bound, 256):
            out = graph.forward(as_tensors(torch, feeds), [logits])[logits]
            right.append(out.argmax(dim=1).numpy() == labels)
    return _scored(np.concatenate(right))


def _scored(right: np.ndarray) -> dict[str, Any]:
    """A cell's top-1 and ``wrong`` (the held-out indices it misclassifies: the McNemar tests of the report)."""
    return {"top1": float(right.mean()), "wrong": np.flatnonzero(~right).tolist()}


def scored(model: onnx.ModelProto, test: Any) -> dict[str, Any]:
    """:func:`_scored` of an ONNX model (onnxruntime, 1 thread)."""
    from benchmarks.allocation import correct

    return _scored(correct(model, test))


def plain_loop(pruned: onnx.ModelProto, original: onnx.ModelProto, data: Any, test: Any, *, distil: bool,
               epochs: int, seed: int) -> dict[int, dict[str, float]]:
    """The plain loop of the module docstring; held-out top-1 after every epoch."""
    with torch_settings(seed, THREADS) as torch:
        functional = torch.nn.functional
        graph, bound, _, _ = converted(pruned, data, "plain loop")
        teacher = teacher_logits(original, bound, threads=THREADS) if distil else None
        logits = pruned.graph.output[0].name
        params = list(graph.module.parameters())
        for param in params:
            param.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=PLAIN_LR)
        rng = np.random.default_rng(seed)
        results: dict[int, dict[str, float]] = {}
        start = time.perf_counter()
        for epoch in range(1, epochs + 1):
            graph.module.train()
            for idx, feeds, labels in batches(bound, PLAIN_BATCH, rng):
                out = graph.forward(as_tensors(torch, feeds), [logits])[logits]
                loss = functional.cross_entropy(out, torch.from_numpy(labels))
                if teacher is not None:
                    loss = loss + TEMPERATURE ** 2 * functional.kl_div(
                        functional.log_softmax(out / TEMPERATURE, dim=1),
                        functional.log_softmax(torch.from_numpy(teacher[idx]) / TEMPERATURE, dim=1),
                        reduction="batchmean", log_target=True)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            results[epoch] = {**torch_scored(graph, torch, test, logits),
                              "seconds": round(time.perf_counter() - start, 1)}
    return results


def _done(out: Path, keys: Sequence[str]) -> bool:
    if not out.exists():
        return False
    node: Any = json.loads(out.read_text())
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return "top1" in node


def pruned_model(run: PruneRun, target: float, cache: Path) -> tuple[onnx.ModelProto, bool, float]:
    """DI + lstsq at ``target`` (the ends pruned when the protected floor lies above 1.1 x the target), cached."""
    path = cache / f"{run.prepared.sha256[:12]}_{target}.onnx"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        return onnx.load(str(path)), info["ends"], info["seconds"]
    start = time.perf_counter()
    candidate = run.candidate("di", target_macs=target)
    ends = run.cost(candidate.model).macs / run.prepared.cost.macs > 1.1 * target
    if ends:
        candidate = run.candidate("di", target_macs=target, keep_first_and_last=False)
    seconds = round(time.perf_counter() - start, 1)
    cache.mkdir(parents=True, exist_ok=True)
    onnx.save(candidate.model, str(path))
    meta.write_text(json.dumps({"ends": ends, "seconds": seconds}))
    return candidate.model, ends, seconds


def family(out: Path, name: str, targets: Sequence[float], loops: Sequence[str], seeds: Sequence[int],
           ocr: Path | None, cache: Path, epochs: Sequence[int] = EPOCHS) -> None:
    """Every requested cell of one family (cells already in the JSON are skipped)."""
    train, test, path, extra = datasets(name, ocr)
    run = PruneRun(path, train, backend="ort-cpu", intra_op_threads=THREADS, progress=False, **extra)
    original = batch_free(run.prepared.model) if extra else run.prepared.model
    if not _done(out, ["models", name, "original"]):
        merge(out, ["models", name, "original"], {**scored(original, test),
                                                  "load_at_start": list(os.getloadavg())})
    for target in targets:
        model, ends, seconds = pruned_model(run, target, cache)
        model = batch_free(model) if extra else model
        key = ["models", name, str(target)]
        if not _done(out, [*key, "pruned"]):
            merge(out, [*key, "pruned"], {**scored(model, test), "ends_pruned": ends, "seconds": seconds,
                                          "macs_fraction": run.cost(model).macs / run.prepared.cost.macs
                                          if not extra else None})
        for seed in seeds:
            for loop in loops:
                _cell(out, [*key, f"seed{seed}"], loop, model, original, train, test, seed, epochs)


def _cell(out: Path, key: list[str], loop: str, model: onnx.ModelProto, original: onnx.ModelProto, train: Any,
          test: Any, seed: int, counts: Sequence[int]) -> None:
    if loop in PLAIN:
        if all(_done(out, [*key, f"{loop}@{e}"]) for e in counts):
            return
        results = plain_loop(model, original, train, test, distil=loop == "adam-kd", epochs=max(counts), seed=seed)
        for epochs in counts:
            merge(out, [*key, f"{loop}@{epochs}"], results[epochs])
        logger.info("%s %s: %s", key, loop, results)
        return
    changes: dict[str, Any] = {}
    for variant in loop[len("diprune["):-1].split(",") if loop.startswith("diprune[") else ():
        changes.update(VARIANTS[variant])
    for epochs in counts:
        row = f"{loop}@{epochs}"
        if _done(out, [*key, row]):
            continue
        options = replace(FinetuneOptions(epochs=epochs, seed=seed, threads=THREADS), **changes)
        tuned, record = finetune(model, original, train, options)
        cell = {**scored(tuned, test), "seconds": round(record.seconds, 1), "best_epoch": record.best_epoch,
                "validation": [c.top1 for c in record.checks]}
        merge(out, [*key, row], cell)
        logger.info("%s %s: %s", key, row, cell)


def _mean(cells: Sequence[Mapping[str, Any]]) -> float | None:
    values = [c["top1"] for c in cells if "top1" in c]
    return None if not values else float(np.mean(values))


def against_plain(seeds: Sequence[Mapping[str, Any]], epochs: int) -> tuple[float, int, int, int, float] | None:
    """``OURS`` against the better plain loop (by mean) after ``epochs``: the difference of the means (points), the
    seeds both ran, the held-out digits only ours / only the plain loop gets right (pooled over those seeds) and
    the exact McNemar p of that split."""
    from benchmarks.latency_budget import mcnemar

    ours = f"{OURS}@{epochs}"
    plain = [(m, p) for p in PLAIN if (m := _mean([v.get(f"{p}@{epochs}", {}) for v in seeds])) is not None]
    mine = _mean([v.get(ours, {}) for v in seeds])
    if mine is None or not plain:
        return None
    best = f"{max(plain)[1]}@{epochs}"
    pairs = [(v[ours], v[best]) for v in seeds if ours in v and best in v and "wrong" in v[ours]]
    only_ours = sum(len(set(b["wrong"]) - set(a["wrong"])) for a, b in pairs)
    only_plain = sum(len(set(a["wrong"]) - set(b["wrong"])) for a, b in pairs)
    test = mcnemar(np.array([True] * only_ours + [False] * only_plain),
                   np.array([False] * only_ours + [True] * only_plain))
    return round(100 * (mine - max(plain)[0]), 2), len(pairs), only_ours, only_plain, test["p"]


def report_lines(doc: Mapping[str, Any]) -> list[str]:
    """Markdown: per family and target, the pruned model and every loop (mean over seeds), and the verdicts."""
    machine = doc.get("protocol", {}).get("machine", {})
    lines = ["# Fine-tune against plain training loops (held-out top-1 %)", "",
             "Generated by `python -m benchmarks.finetune_loops --report` from `finetune_loops.json`; commands: "
             + ", ".join(f"`{c}`" for c in sorted(doc.get("commands", {}))) + ".", "",
             f"Machine: {machine.get('cpu', '?')}, {machine.get('cores_available', '?')} cores shared with other "
             "sessions' benchmarks and tests (load average at the start of each family: " + ", ".join(
                 f"{n} {e['original']['load_at_start'][0]:.1f}" for n, e in doc.get("models", {}).items()
                 if "load_at_start" in e.get("original", {})) + "), torch "
             f"{machine.get('versions', {}).get('torch', '?')}, onnxruntime "
             f"{machine.get('versions', {}).get('onnxruntime', '?')}, 1 thread. Protocol: the docstring of "
             "`benchmarks/finetune_loops.py`. Cells: mean top-1 over the seeds run (their count in brackets when "
             "more than one); `diprune` trains on 90 % of the training data and returns its best trained epoch on "
             "the other 10 % unless that epoch is worse than its input there beyond the noise (the rule of "
             "`pipeline/training/finetune.py`), the plain loops train on all of it and keep their last epoch.", "",
             *(f"Note: {n}" for n in doc.get("notes", ())), ""]
    wins: list[tuple[str, float, int, float, int, int, int, float]] = []
    for name, entry in doc.get("models", {}).items():
        lines += [f"## {name} (original {100 * entry['original']['top1']:.2f})", ""]
        targets = sorted((t for t in entry if t != "original"), key=float, reverse=True)
        rows = sorted({row for t in targets for seed, cells in entry[t].items() if seed.startswith("seed")
                       for row in cells}, key=lambda r: (r.split("@")[0] not in PLAIN, r))
        lines += ["| row | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
        lines.append("| pruned (DI + lstsq) | " + " | ".join(
            f"{100 * entry[t]['pruned']['top1']:.2f}" + (" (ends)" if entry[t]["pruned"].get("ends_pruned") else "")
            for t in targets) + " |")
        for row in rows:
            cells = []
            for t in targets:
                found = [v[row] for s, v in entry[t].items() if s.startswith("seed") and row in v]
                mean = _mean(found)
                cells.append("not run" if mean is None else f"{100 * mean:.2f}" + (f" [{len(found)}]"
                                                                                   if len(found) > 1 else ""))
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        for t in targets:
            seeds = [v for s, v in entry[t].items() if s.startswith("seed")]
            for epochs in EPOCHS:
                verdict = against_plain(seeds, epochs)
                if verdict is not None:
                    wins.append((name, float(t), epochs, *verdict))
        lines.append("")
    if wins:
        lines += [f"## {OURS} (the defaults) against the better plain loop (points; >= 0: at least as good)", "",
                  "Difference of the means over the seeds run (in brackets); the better plain loop is the one with "
                  "the higher mean. Noise test: exact two-sided McNemar test on the held-out digits, the discordant "
                  "digits of every seed pooled (the seeds share the digits, so this test calls differences "
                  "significant more readily than an independent one would); within noise: p >= 0.05.", "",
                  "| family | target | epochs | diprune - best plain | seeds | only diprune / only plain | p | "
                  "verdict |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {n} | {t} | {e} | {d:+.2f} | {k} | {a} / {b} | {p:.3f} | "
                  f"{'ahead or level' if d >= 0 else ('behind within noise' if p >= 0.05 else 'behind')} |"
                  for n, t, e, d, k, a, b, p in wins]
        level = [w for w in wins if w[3] >= 0]
        noise = [w for w in wins if w[3] < 0 and w[7] >= 0.05]
        behind = [w for w in wins if w[3] < 0 and w[7] < 0.05]
        lines += ["", f"{len(level)} of {len(wins)} cells ahead or level, {len(noise)} behind within the noise, "
                  f"{len(behind)} behind beyond it" + ("." if not behind else ": " + ", ".join(
                      f"{n} {t} {e} ep ({d:+.2f}, p {p:.3f})" for n, t, e, d, _, _, _, p in behind) + "."), ""]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=FAMILIES, default=["cnn", "lenet"])
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--loops", nargs="+", type=loop_name, default=list(LOOPS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", nargs="+", type=int, choices=EPOCHS, default=list(EPOCHS))
    parser.add_argument("--ocr", type=Path, default=None, help="folder of benchmarks/ocr_data.py's output")
    parser.add_argument("--cache", type=Path, default=Path("work/finetune_loops"), help="pruned models")
    parser.add_argument("--report", action="store_true", help="only write the markdown from the JSON")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    log_to_stderr(logging.ERROR)
    if args.report:
        rewrite_markdown(args.out, report_lines)
        return 0
    command = command_line("benchmarks.finetune_loops", argv)
    merge(args.out, ["commands", command], time.strftime("%Y-%m-%d"))
    merge(args.out, ["protocol"], {"n_train": N_TRAIN, "epochs": list(EPOCHS), "threads": THREADS,
                                   "plain": {"lr": PLAIN_LR, "batch": PLAIN_BATCH, "temperature": TEMPERATURE},
                                   "defaults": asdict(FinetuneOptions()), "machine": machine_info()})
    for name in args.models:
        family(args.out, name, args.targets, args.loops, args.seeds, args.ocr, args.cache, args.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
