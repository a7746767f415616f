"""Train the MNIST demo model and benchmark families deterministically, export them to ONNX, record their accuracy.

Run from the repository root::

    python -m benchmarks.train_mnist --family demo --epochs 6 --out pipeline/assets/
    python -m benchmarks.train_mnist --family all --epochs 4 --out benchmarks/models/

Data: ``pipeline/assets/mnist10k.npz``; training uses samples 0..7999 only, accuracy is measured on 8000..9999 (never
seen in training). Input spec: ``x_float = (x_uint8 / 255 - 0.1307) / 0.3081``, shape ``[N, 1, 28, 28]``, input name
``input``, output ``logits``. Determinism: ``torch.manual_seed(seed)``, deterministic algorithms, a fixed number of
threads (default 1), a seeded permutation per epoch and seeded random shifts of up to 2 pixels (augmentation).
Optimiser: AdamW (lr 3e-3, weight decay 5e-4), one-cycle schedule, batch 64, cross-entropy.
Export: legacy exporter (``dynamo=False``), opset 17, dynamic batch; then ``graph_ops.canonicalize.canonicalize`` when
that module exists. The accuracy written to JSON is measured with onnxruntime on the exported file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from benchmarks.mnist_models import FAMILIES, MNIST_MEAN, MNIST_STD, build, count_macs, count_params
from pipeline.data.datasets import from_npz, mnist_path

LOG = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
INPUT_SPEC = "float32 NCHW [N,1,28,28] = (x_uint8 / 255 - 0.1307) / 0.3081"


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the normalised MNIST split as (x [N,1,28,28] float32, y [N] int64) via :func:`pipeline.data.datasets.from_npz`."""
    data = from_npz(mnist_path(), mean=MNIST_MEAN, std=MNIST_STD, split=split)
    xs, ys = [], []
    for feeds, labels in data.batches(4096):
        xs.append(next(iter(feeds.values())))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys).astype(np.int64))


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift each image by a seeded random offset in [-max_shift, max_shift]^2, filling with the background value."""
    n = x.shape[0]
    pad = nn.functional.pad(x, (max_shift,) * 4, value=float(x.min()))
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = pad[i, :, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28]
    return out


def train(family: str, epochs: int, seed: int, batch: int = 64) -> tuple[nn.Module, list[float]]:
    """Train one model; return it (eval mode) and the per-epoch torch accuracy on the held-out split."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    model = build(family)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = epochs * ((len(x_train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            loss = nn.functional.cross_entropy(model(random_shift(x_train[idx], gen)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        history.append(evaluate_torch(model, x_test, y_test))
        LOG.info("%s epoch %d/%d: held-out accuracy %.4f", family, epoch + 1, epochs, history[-1])
    model.eval()
    return model, history


def evaluate_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Return the accuracy of ``model`` in eval mode."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


def export(model: nn.Module, path: Path) -> bool:
    """Export with the legacy exporter (opset 17, dynamic batch); canonicalize if available. Return whether it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".raw.onnx")
    torch.onnx.export(
        model, (torch.zeros(1, 1, 28, 28),), str(tmp), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )  # fmt: skip
    onnx_model = onnx.load(str(tmp))
    tmp.unlink()
    canonical = False
    try:
        from graph_ops.canonicalize import canonicalize
    except ImportError:
        LOG.warning("graph_ops.canonicalize not available: saving the raw export")
    else:
        result = canonicalize(onnx_model)
        onnx_model = result if isinstance(result, onnx.ModelProto) else getattr(result, "model", onnx_model)
        canonical = True
    onnx_model.doc_string = f"DIPrune MNIST model '{path.stem}', trained by benchmarks/train_mnist.py"
    onnx.helper.set_model_props(
        onnx_model, {"preprocessing": INPUT_SPEC, "train_split": "mnist10k.npz 0..7999"}
    )
    onnx.checker.check_model(onnx_model, full_check=True)
    onnx.save(onnx_model, str(path))
    return canonical


def evaluate_onnx(path: Path) -> float:
    """Return the ORT accuracy of an exported model on the held-out split (8000..9999)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    data = from_npz(mnist_path(), mean=MNIST_MEAN, std=MNIST_STD, split="test")
    data = data.bind([i.name for i in sess.get_inputs()])
    correct = 0
    for feeds, labels in data.batches(500):
        correct += int((sess.run(None, feeds)[0].argmax(1) == labels).sum())
    return correct / data.num_samples


def onnx_cost(path: Path) -> tuple[int | None, int | None]:
    """Return (MACs per image, params) from ``graph_ops.cost.count`` when that module exists, else Nones."""
    try:
        from graph_ops.cost import count
    except ImportError:
        return None, None
    try:
        result = count(onnx.load(str(path)))
    except Exception as err:  # the cost module is developed concurrently; record nothing rather than fail
        LOG.warning("graph_ops.cost.count failed on %s: %s", path, err)
        return None, None
    return int(result.macs), int(result.params)


def run_family(family: str, epochs: int, seed: int, out: Path, threads: int) -> dict[str, object]:
    """Train, export and evaluate one family; return its JSON record."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model, history = train(family, epochs, seed)
    train_s = time.perf_counter() - start
    name = "mnist_cnn" if family == "demo" else f"mnist_{family}"
    path = out / f"{name}.onnx"
    canonical = export(model, path)
    macs_onnx, params_onnx = onnx_cost(path)
    return {
        "family": family, "file": os.path.relpath(path, REPO), "params": count_params(model),
        "macs_torch": count_macs(model), "macs_onnx": macs_onnx,
        "params_onnx": params_onnx, "epochs": epochs, "seed": seed,
        "torch_accuracy_per_epoch": [round(a, 4) for a in history], "onnx_accuracy": evaluate_onnx(path),
        "eval_split": "8000..9999", "train_split": "0..7999", "train_seconds": round(train_s, 1),
        "threads": threads, "canonicalized": canonical, "bytes": path.stat().st_size,
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}, {os.cpu_count()} cpus",
        "torch": torch.__version__, "input_spec": INPUT_SPEC,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--family", choices=[*FAMILIES, "all"], default="all", help="'all' = the four families"
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "models")
    parser.add_argument("--results", type=Path, default=None, help="JSON file to update (default by family)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    families = [f for f in FAMILIES if f != "demo"] if args.family == "all" else [args.family]
    default = "mnist_cnn.json" if families == ["demo"] else "mnist_models.json"
    results_path = args.results or REPO / "benchmarks" / "results" / default
    records = json.loads(results_path.read_text()) if results_path.exists() else {}
    for family in families:
        records[family] = run_family(family, args.epochs, args.seed, args.out, args.threads)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
        LOG.info("%s: onnx accuracy %.4f -> %s", family, records[family]["onnx_accuracy"], results_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
