"""Hostile-input audit (issue 25): a few hundred inputs a careless or hostile user gives, across every subcommand and
run configs, each run for real and classified.

Cases (``cases()``): corrupt and foreign model files (empty, truncated, random bytes, JSON, an npz, a folder, a FIFO,
``/dev/null``, NaN and infinite weights, no Conv/Gemm, missing external data and a path traversal in it) on every
command that reads a model; bad data (corrupt, truncated, pickled, wrong dtype / shape / labels, NaN, a flipped byte
behind a valid zip (CRC), empty, FIFO, image folders with a corrupt file, a FIFO or a decompression bomb); every
numeric option with nonsense values; outputs onto an input (the same path, a symlink, a hard link, the shipped
digits), a device node, a FIFO, a folder, an overlong name, a missing or unwritable folder; non-UTF-8 and malformed
plans, scores, statistics, task maps and configs; run configs with non-finite numbers, the old fraction spelling of
``max_top1_drop``, inputs where the run writes; cache entries changed or partial; SIGTERM and SIGINT during recovery;
two concurrent runs on one output folder and a run after a SIGKILLed one; and a few hostile but valid inputs that must
work (unicode and spaces in paths, symlinked inputs, an output over an old output).

Every case runs in its own folder, in a child process forked from this one (the CLI's ``main`` with the case's
arguments; signal and concurrency cases start real ``python -m pipeline.cli`` processes from that child), with a
timeout. Outcomes:

* ``clean error``: an expected failure with the promised form: exit 2 for usage errors (argparse), else a non-zero
  exit with exactly one ``diprune: error:`` line (signals: 143 / 130 with their one line), no traceback, no input
  changed, no new file left behind (the run's lock file and empty folders excepted);
* ``clean``: an expected success (exit 0, the case's own checks hold, no temporary file left);
* ``traceback``, ``input modified``, ``partial output``, ``silent acceptance`` (exit 0 where an error was due),
  ``wrong exit code`` (a usage error not exiting 2, a signal not 143 / 130), ``unclear error`` (not exactly one
  error line), ``failed`` (an expected success that failed or whose check did not hold), ``hang`` (timeout).

Run from the repository root (70 s with 2 jobs on the shared 2-core VM at load average 3, about 3 minutes at load
10)::

    python -m benchmarks.hostile_audit              # all cases; writes benchmarks/results/hostile_audit.{json,md}
    python -m benchmarks.hostile_audit -k plan      # the cases whose id contains 'plan' (results not written)

The exit code is 1 when any case is not clean (0 otherwise), so a CI job can run it before a change lands.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import sys
import tempfile
import time
import traceback
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from graph_ops.io import atomic_write_bytes
from pipeline.data.datasets import mnist_path
from pipeline.deployment.bench import machine_info
from pipeline.prune.demo import demo_model_path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLEAN = ("clean error", "clean")
Setup = Callable[[Path], None]


@dataclass
class Case:
    """One hostile input: files to make in the case folder, the arguments (relative paths), what is due."""

    id: str
    category: str
    argv: list[str]
    setup: tuple[Setup, ...] = ()
    expect: str = "error"  # "error", "usage", "ok" or "signal"
    outputs: tuple[str, ...] = ()  # globs an "ok" case may create
    check: Callable[[Path], bool] | None = None  # an "ok" case's own check (e.g. a cache entry was recomputed)
    runner: Callable[[Case, Path], int] | None = None  # None: main(argv) in the forked child
    timeout: float = 90.0


# ------------------------------------------------------------------------------------------------------ fixtures


@functools.cache
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    """The shipped digits, read once (in the parent: every forked case shares them)."""
    with np.load(mnist_path()) as data:
        return data["x"][8000:], data["y"][8000:]


def _digits(n: int = 200, start: int = 8000) -> tuple[np.ndarray, np.ndarray]:
    x, y = _all_digits()
    return x[start - 8000:start - 8000 + n], y[start - 8000:start - 8000 + n]


def model(name: str = "m.onnx") -> Setup:
    return lambda d: shutil.copy(demo_model_path(), d / name)


def npz(name: str = "d.npz", compressed: bool = False, **arrays: Any) -> Setup:
    def make(d: Path) -> None:
        content = arrays or dict(zip(("x", "y"), _digits(), strict=True))
        (np.savez_compressed if compressed else np.savez)(d / name, **content)
    return make


def raw(name: str, data: bytes) -> Setup:
    return lambda d: (d / name).write_bytes(data)


def text(name: str, content: str) -> Setup:
    return lambda d: (d / name).write_text(content)


def fifo(name: str) -> Setup:
    return lambda d: os.mkfifo(d / name)


def link(name: str, target: str) -> Setup:
    return lambda d: os.symlink(target, d / name)


def hardlink(name: str, target: str) -> Setup:
    return lambda d: os.link(d / target, d / name)


def folder(name: str) -> Setup:
    return lambda d: (d / name).mkdir(parents=True, exist_ok=True)


def devnull_copy(name: str) -> Setup:
    """A copy of /dev/null (a character device node; a symlink to it where mknod is not allowed)."""
    def make(d: Path) -> None:
        try:
            os.mknod(d / name, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            os.symlink("/dev/null", d / name)
    return make


def edited_model(name: str, change: Callable[[onnx.ModelProto], onnx.ModelProto | None]) -> Setup:
    def make(d: Path) -> None:
        proto = onnx.load(str(demo_model_path()))
        proto = change(proto) or proto
        onnx.save(proto, str(d / name))
    return make


def _conv_weight(proto: onnx.ModelProto, value: float) -> None:
    for i, init in enumerate(proto.graph.initializer):
        w = numpy_helper.to_array(init)
        if w.ndim == 4:
            w = w.copy()
            w.flat[0] = value
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, init.name))
            return


def relu_only(name: str) -> Setup:
    def make(d: Path) -> None:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(d / name))
    return make


def external_data(name: str, location: str | None) -> Setup:
    """The model with its weights in an external file; ``location`` None: that file deleted, else rewritten."""
    def make(d: Path) -> None:
        proto = onnx.load(str(demo_model_path()))
        onnx.save_model(proto, str(d / name), save_as_external_data=True, location=f"{name}.data", size_threshold=0)
        if location is None:
            (d / f"{name}.data").unlink()
            return
        proto = onnx.load(str(d / name), load_external_data=False)
        for init in proto.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(proto, str(d / name))
    return make


def flipped(name: str = "d.npz", member: str = "x.npy", compressed: bool = False) -> Setup:
    """A valid zip whose member data has one byte changed (its CRC no longer matches)."""
    def make(d: Path) -> None:
        npz(name, compressed=compressed)(d)
        with zipfile.ZipFile(d / name) as archive:
            info = archive.getinfo(member)
        data = bytearray((d / name).read_bytes())
        head = info.header_offset
        start = head + 30 + int.from_bytes(data[head + 26:head + 28], "little") + \
            int.from_bytes(data[head + 28:head + 30], "little")
        data[start + info.compress_size // 2] ^= 0x5A
        (d / name).write_bytes(bytes(data))
    return make


def images(name: str = "imgs", bad: str | None = None) -> Setup:
    """Two class folders of 28 x 28 digits; ``bad``: one more file, corrupt / empty / FIFO / decompression bomb."""
    def make(d: Path) -> None:
        from PIL import Image

        x, y = _digits(20)
        for i, (image, label) in enumerate(zip(x, y, strict=True)):
            (d / name / f"c{label % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(d / name / f"c{label % 2}" / f"{i:02d}.png")
        target = d / name / "c0" / "zz.png"
        if bad == "corrupt":
            target.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
        elif bad == "empty":
            target.write_bytes(b"")
        elif bad == "fifo":
            os.mkfifo(target)
        elif bad == "bomb":  # 13,500 x 13,500 pixels: over twice Pillow's limit, a few hundred kB on disk
            Image.new("1", (13500, 13500)).save(target)
    return make


def plan_file(name: str = "p.json", **meta: Any) -> Setup:
    """A valid plan of the demo model (2 groups pruned), with ``meta`` entries replaced."""
    def make(d: Path) -> None:
        from pipeline.prune.orchestrate import PruneRun

        run = PruneRun(str(d / "m.onnx") if (d / "m.onnx").is_file() else str(demo_model_path()), None,
                       progress=False)
        plan = run.plan(run.scores("l2"), target_macs=0.5)
        doc = json.loads(plan.to_json())
        doc.setdefault("meta", {}).update(meta)
        (d / name).write_text(json.dumps(doc))
    return make


def edited_json(name: str, change: Callable[[Any], Any]) -> Setup:
    def make(d: Path) -> None:
        doc = json.loads((d / name).read_text())
        (d / name).write_text(json.dumps(change(doc)))
    return make


def scores_file(name: str = "s.json") -> Setup:
    def make(d: Path) -> None:
        from pipeline.prune.orchestrate import PruneRun

        run = PruneRun(str(demo_model_path()), None, progress=False)
        (d / name).write_text(run.scores("l2").to_json(model_path=str(d / "m.onnx")))
    return make


def stats_file(name: str = "st.npz") -> Setup:
    def make(d: Path) -> None:
        from pipeline.calibration.calibrate import calibrate
        from pipeline.data.datasets import from_npz
        from pipeline.model.prepare import prepare

        x, y = _digits(64)
        np.savez(d / "_c.npz", x=x, y=y)
        calibrate(prepare(d / "m.onnx"), from_npz(d / "_c.npz", limit=64), progress=False).save(d / name)
        (d / "_c.npz").unlink()
    return make


RUN = {"model": "m.onnx", "data": {"calibration": {"path": "d.npz", "limit": 32},
                                   "evaluation": {"path": "d.npz", "limit": 48}, "mean": 0.1307, "std": 0.3081},
       "prune": {"methods": ["l2"], "target_macs": [0.5], "recover": "none"},
       "bench": {"batch": [1], "warmup": 0, "duration": 0.01, "iterations": 2, "rounds": 1}, "output": "out"}


def config(name: str = "job.yaml", drop: Iterable[str] = (), **changes: Any) -> Setup:
    """The small run job ``RUN`` with top-level sections updated (a dict merges into a dict section)."""
    def make(d: Path) -> None:
        doc = json.loads(json.dumps(RUN))
        for key, value in changes.items():
            doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
        for key in drop:
            doc.pop(key, None)
        (d / name).write_text(yaml.safe_dump(doc))
    return make


def _run_report(d: Path) -> dict[str, Any]:
    return json.loads((d / "out" / "report.json").read_text())


# ------------------------------------------------------------------------------------------------------ runners


def in_process(case: Case, d: Path) -> int:
    from pipeline.cli import main

    try:
        return int(main(case.argv) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


SPILLING = ("import sys, time\nfrom pipeline.recovery import frontier\n"
            "init, put = frontier.FrontierStore.__init__, frontier.FrontierStore.put\n"
            "frontier.FrontierStore.__init__ = lambda self, budget, spill_dir: init(self, 0, spill_dir)\n"
            "def slow(self, *a):\n    time.sleep(0.05)\n    put(self, *a)\n"
            "frontier.FrontierStore.put = slow\nfrom pipeline.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def signal_runner(sig: int, ready: Callable[[Path], bool], spill: bool = False) -> Callable[[Case, Path], int]:
    """Start the case's command as a real process, send ``sig`` once ``ready(folder)`` holds, return its exit code
    (recovery's frontier spilled from the first array with ``spill``: a folder on disk to clean up)."""
    def run(case: Case, d: Path) -> int:
        command = [sys.executable, "-c", SPILLING, *case.argv] if spill else _cli(*case.argv)
        proc = __import__("subprocess").Popen(command, env=_env())
        try:
            if not _wait_for(lambda: ready(d), 120):
                print("audit: the process never reached the point to signal", file=sys.stderr)
            proc.send_signal(sig)
            return proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    return run


def concurrent_runner(case: Case, d: Path) -> int:
    """Two ``diprune run`` on one output folder: returns the second's exit code (the first must succeed after it)."""
    import subprocess

    first = subprocess.Popen(_cli(*case.argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    lock = d / "out" / ".diprune.lock"
    try:
        _wait_for(lambda: lock.is_file() and "pid" in lock.read_text(), 120)
        second = subprocess.run(_cli(*case.argv), stdout=sys.stdout, stderr=sys.stderr, timeout=120, env=_env(),
                                check=False)
        still_running = first.poll() is None
        first.wait(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    if not still_running or first.returncode != 0:
        print(f"audit: first run ended early ({still_running=}) or failed (exit {first.returncode})", file=sys.stderr)
        return 99
    return second.returncode


def after_kill_runner(case: Case, d: Path) -> int:
    """``slow.yaml`` (same output folder) SIGKILLed while it holds the lock, then the case's run: its exit code (the
    lock must not be stale)."""
    import subprocess

    first = subprocess.Popen(_cli("-q", "run", "slow.yaml"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=_env())
    lock = d / "out" / ".diprune.lock"
    try:
        _wait_for(lambda: lock.is_file() and "pid" in lock.read_text(), 120)
    finally:
        first.kill()
        first.wait(timeout=60)
    return in_process(case, d)


def twice(change: Setup) -> Callable[[Case, Path], int]:
    """Run the case once, apply ``change`` (to its cache, say), run it again: the second exit code."""
    def run(case: Case, d: Path) -> int:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            first = in_process(case, d)
        if first != 0:
            print(f"audit: the first run failed (exit {first})", file=sys.stderr)
            return 98
        change(d)
        return in_process(case, d)
    return run


# --------------------------------------------------------------------------------------------------------- cases

PRUNE_REST = ["--method", "l2", "--recover", "none", "--target-macs", "0.5", "--limit", "64"]
MODEL_VARIANTS: dict[str, tuple[Setup, ...]] = {
    "empty": (raw("X.onnx", b""),),
    "truncated": (lambda d: (d / "X.onnx").write_bytes(Path(demo_model_path()).read_bytes()[:5000]),),
    "random-bytes": (raw("X.onnx", np.random.default_rng(0).bytes(4096)),),
    "json": (text("X.onnx", '{"graph": {}}'),),
    "npz": (npz("X.onnx"),),
    "folder": (folder("X.onnx"),),
    "missing": (),
    "fifo": (fifo("X.onnx"),),
    "devnull": (link("X.onnx", "/dev/null"),),
    "nan-weights": (edited_model("X.onnx", lambda p: _conv_weight(p, float("nan"))),),
    "inf-weights": (edited_model("X.onnx", lambda p: _conv_weight(p, float("inf"))),),
    "no-conv": (relu_only("X.onnx"),),
    "external-data-missing": (external_data("X.onnx", None),),
    "external-data-traversal": (external_data("X.onnx", "../../../etc/passwd"),),
    "no-graph": (lambda d: onnx.save(helper.make_model(helper.make_graph([], "g", [], [])), str(d / "X.onnx")),),
}
MODEL_COMMANDS: dict[str, list[str]] = {
    "inspect": ["inspect", "X.onnx"],
    "calibrate": ["calibrate", "X.onnx", "--data", "d.npz", "-o", "s.npz"],
    "score": ["score", "--model", "X.onnx", "--method", "l2", "-o", "s.json"],
    "prune": ["prune", "X.onnx", "--data", "d.npz", *PRUNE_REST, "-o", "p.onnx"],
    "eval": ["eval", "X.onnx", "--data", "d.npz"],
    "eval-reference": ["eval", "m.onnx", "--data", "d.npz", "--reference", "X.onnx"],
    "bench": ["bench", "X.onnx", "--warmup", "0", "--duration", "0.01", "--iterations", "2", "--rounds", "1"],
    "apply": ["apply", "X.onnx", "p.json", "-o", "a.onnx"],
    "finetune": ["finetune", "X.onnx", "--reference", "m.onnx", "--data", "d.npz", "--limit", "32", "-o", "f.onnx"],
    "run": ["run", "job.yaml"],
}


def model_cases() -> list[Case]:
    out = []
    for variant, setup in MODEL_VARIANTS.items():
        for command, argv in MODEL_COMMANDS.items():
            if variant == "no-conv" and command in ("inspect", "eval", "eval-reference", "bench", "calibrate", "score"):
                continue  # a model without layers is fine to inspect, time or score (it has nothing to prune)
            extra: tuple[Setup, ...] = (model(), npz())
            if command == "apply":
                extra += (plan_file(),)
            if command == "run":
                extra += (config(model="X.onnx"),)
            out.append(Case(f"model-{variant}-{command}", "corrupt or foreign model", ["-q", *argv],
                            (*extra, *setup)))
    return out


DATA_VARIANTS: dict[str, tuple[Setup, ...]] = {
    "empty-file": (raw("X.npz", b""),),
    "truncated": (lambda d: (npz("_f.npz")(d), (d / "X.npz").write_bytes((d / "_f.npz").read_bytes()[:3000]),
                             (d / "_f.npz").unlink()),),
    "not-a-zip": (text("X.npz", "x,y\n1,2\n"),),
    "pickled": (lambda d: np.savez(d / "X.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, int)),),
    "string-dtype": (npz("X.npz", x=np.array(["a"] * 20), y=np.zeros(20, np.int64)),),
    "wrong-shape": (npz("X.npz", x=np.zeros((20, 5), np.float32), y=np.zeros(20, np.int64)),),
    "nan-values": (npz("X.npz", x=np.full((20, 1, 28, 28), np.nan, np.float32), y=np.zeros(20, np.int64)),),
    "negative-labels": (npz("X.npz", x=_digits(20)[0], y=-np.ones(20, np.int64)),),
    "float-labels": (npz("X.npz", x=_digits(20)[0], y=np.full(20, 0.5)),),
    "labels-2d": (npz("X.npz", x=_digits(20)[0], y=np.zeros((20, 2), np.int64)),),
    "label-out-of-range": (npz("X.npz", x=_digits(20)[0], y=np.full(20, 50, np.int64)),),
    "count-mismatch": (npz("X.npz", x=_digits(20)[0], y=np.zeros(7, np.int64)),),
    "zero-samples": (npz("X.npz", x=np.zeros((0, 28, 28), np.uint8), y=np.zeros(0, np.int64)),),
    "no-arrays": (lambda d: np.savez(d / "X.npz"),),
    "bad-crc-stored": (flipped("X.npz"),),
    "bad-crc-compressed": (flipped("X.npz", compressed=True),),
    "missing": (),
    "fifo": (fifo("X.npz"),),
    "devnull": (link("X.npz", "/dev/null"),),
    "empty-folder": (folder("X.npz"),),
}
DATA_COMMANDS: dict[str, list[str]] = {
    "calibrate": ["calibrate", "m.onnx", "--data", "X.npz", "-o", "s.npz"],
    "prune": ["prune", "m.onnx", "--data", "X.npz", *PRUNE_REST, "-o", "p.onnx"],
    "prune-eval": ["prune", "m.onnx", "--data", "d.npz", "--eval-data", "X.npz", *PRUNE_REST, "-o", "p.onnx"],
    "eval": ["eval", "m.onnx", "--data", "X.npz"],
    "bench": ["bench", "m.onnx", "--data", "X.npz", "--warmup", "0", "--duration", "0.01", "--iterations", "2",
              "--rounds", "1"],
    "run": ["run", "job.yaml"],
}
BENCH_IGNORES = ("label", "labels", "float-labels", "negative-labels", "count-mismatch", "label-out-of-range",
                 "nan-values")  # bench times the model on the inputs; labels and values are not its business


def data_cases() -> list[Case]:
    out = []
    for variant, setup in DATA_VARIANTS.items():
        for command, argv in DATA_COMMANDS.items():
            if command == "bench" and any(variant.startswith(v) or variant == v for v in BENCH_IGNORES):
                continue
            if command == "prune" and variant in ("label-out-of-range",):
                continue  # l2 with recover none reads no labels: nothing to refuse
            extra: tuple[Setup, ...] = (model(), npz())
            if command == "run":
                extra += (config(data={"calibration": {"path": "d.npz"}, "evaluation": {"path": "X.npz"}}),)
            out.append(Case(f"data-{variant}-{command}", "bad data", ["-q", *argv], (*extra, *setup)))
    out += [Case(f"images-{bad}-eval", "bad data", ["-q", "eval", "m.onnx", "--data", "imgs", "--channel-order",
                                                    "gray", "--size", "28", "--crop", "28", "--split", "all"],
                 (model(), images(bad=bad)), timeout=120) for bad in ("corrupt", "empty", "fifo", "bomb")]
    out.append(Case("images-gray-three-means", "bad data", ["-q", "eval", "m.onnx", "--data", "imgs",
                                                            "--channel-order", "gray", "--mean", "0.5", "0.5", "0.5"],
                    (model(), images())))
    out.append(Case("images-crop-over-size", "bad data", ["-q", "eval", "m.onnx", "--data", "imgs", "--channel-order",
                                                          "gray", "--size", "20", "--crop", "28"],
                    (model(), images())))
    out.append(Case("channel-order-on-npz", "bad data", ["-q", "eval", "m.onnx", "--data", "d.npz",
                                                         "--channel-order", "gray"], (model(), npz())))
    return out


NUMBERS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "prune": (["prune", "m.onnx", "--data", "d.npz", "--method", "l2", "-o", "p.onnx"], {
        "--target-macs": ["0", "1.5", "nan", "-1", "abc"], "--target-params": ["inf"], "--round-to": ["0"],
        "--min-channels": ["0"], "--batch-size": ["0", "2.5"], "--seed": ["-1"], "--limit": ["0", "-5"],
        "--scale": ["0", "nan"], "--mean": ["nan"], "--std": ["0", "-1", "inf"], "--size": ["0"], "--crop": ["-1"],
        "--max-drop": ["nan", "-1", "1000"], "--max-top1-drop": ["nan", "-1"], "--finetune-epochs": ["-1"],
        "--workers": ["0"], "--shard-batches": ["0"], "--target-latency": ["0", "2"], "--latency-batch": ["0"],
        "--latency-iterations": ["0"], "--latency-threads": ["0"]}),
    "bench": (["bench", "m.onnx"], {
        "--batch": ["0", "1,a", "", "-2"], "--warmup": ["-1", "inf"], "--duration": ["nan", "1e9", "inf"],
        "--iterations": ["0", "1000000000000"], "--rounds": ["0", "100000"], "--threads": ["0"], "--round-to": ["0"]}),
    "export": (["export", "torchvision:resnet18", "-o", "r.onnx"], {
        "--opset": ["0"], "--rtol": ["-1"], "--atol": ["nan"]}),
    "finetune": (["finetune", "m.onnx", "--reference", "m.onnx", "--data", "d.npz", "-o", "f.onnx"], {
        "--lr": ["0", "nan"], "--temperature": ["0"], "--ce-weight": ["-1"], "--epochs": ["0"], "--threads": ["0"]}),
    "push": (["push", "m.onnx", "--data", "d.npz", "--target-macs", "0.5", "-o", "q.onnx"], {
        "--sep-weight": ["-1"], "--align-weight": ["nan"]}),
    "calibrate": (["calibrate", "m.onnx", "--data", "d.npz", "-o", "s.npz"], {
        "--shard-batches": ["0"], "--batch-size": ["0"], "--task-classes": ["", "3", "a,b", "3,3", "-1,2"]}),
    "score": (["score", "--model", "m.onnx", "--method", "random", "-o", "s.json"], {"--seed": ["-1", "x"]}),
    "eval": (["eval", "m.onnx", "--data", "d.npz"], {"--limit": ["0"], "--split": ["valid"]}),
}


def number_cases() -> list[Case]:
    out = [Case(f"number-{command}{option}={value or 'empty'}", "nonsense number", ["-q", *base, option, value],
                (model(), npz()), expect="usage")
           for command, (base, options) in NUMBERS.items() for option, values in options.items() for value in values]
    out.append(Case("number-input-shape-zero", "nonsense number", ["-q", "inspect", "m.onnx", "--input-shape",
                                                                     "input:0x1x28x28"], (model(),)))
    out.append(Case("number-input-shape-rank", "nonsense number", ["-q", "inspect", "m.onnx", "--input-shape",
                                                                     "1x28x28"], (model(),)))
    out.append(Case("number-bench-batch-beyond-memory", "nonsense number",
                    ["-q", "bench", "m.onnx", "--batch", "200000000", "--warmup", "0", "--duration", "0"], (model(),)))
    out.append(Case("number-task-class-beyond-model", "nonsense number",
                    ["-q", "calibrate", "m.onnx", "--data", "d.npz", "--task-classes", "3,99", "-o", "s.npz"],
                    (model(), npz())))
    return out


OUTPUT_COMMANDS: dict[str, tuple[list[str], tuple[Setup, ...]]] = {
    "calibrate": (["calibrate", "m.onnx", "--data", "d.npz", "--limit", "64", "-o"], ()),
    "score": (["score", "--model", "m.onnx", "--method", "l2", "-o"], ()),
    "plan": (["plan", "s.json", "--model", "m.onnx", "--target-macs", "0.5", "-o"], (scores_file(),)),
    "apply": (["apply", "m.onnx", "p.json", "-o"], (plan_file(),)),
    "prune": (["prune", "m.onnx", "--data", "d.npz", *PRUNE_REST, "-o"], ()),
    "bench": (["bench", "m.onnx", "--data", "d.npz", "--warmup", "0", "--duration", "0.01", "--iterations", "2",
               "--rounds", "1", "--json"], ()),
}
OUTPUT_TARGETS: dict[str, tuple[str, tuple[Setup, ...]]] = {
    "model": ("m.onnx", ()), "data": ("d.npz", ()), "symlink-to-data": ("alias.npz", (link("alias.npz", "d.npz"),)),
    "hardlink-of-model": ("hard.onnx", (hardlink("hard.onnx", "m.onnx"),)),
    "devnull-link": ("null.out", (link("null.out", "/dev/null"),)),
    "device-node": ("dev.out", (devnull_copy("dev.out"),)), "fifo": ("pipe.out", (fifo("pipe.out"),)),
    "folder": ("dir.out", (folder("dir.out"),)), "long-name": ("é" * 130, ()),
    "missing-folder": ("no/such/dir/o.out", ()), "unwritable-folder": ("/proc/diprune-audit/o.out", ()),
    "shipped-digits": (str(mnist_path()), ()),
}


def output_cases() -> list[Case]:
    out = []
    for command, (argv, setup) in OUTPUT_COMMANDS.items():
        for target, (path, target_setup) in OUTPUT_TARGETS.items():
            if "data" in target and "d.npz" not in argv:
                continue  # score, plan and apply read no data: d.npz is no input of theirs
            out.append(Case(f"output-{command}-onto-{target}", "output onto an input or a non-file",
                            ["-q", *argv, path], (model(), npz(), *setup, *target_setup)))
    out += [
        Case("output-plan-onto-recorded-model", "output onto an input or a non-file",
             ["-q", "plan", "s.json", "--target-macs", "0.5", "-o", "m.onnx"], (model(), scores_file())),
        Case("output-apply-onto-plan", "output onto an input or a non-file",
             ["-q", "apply", "m.onnx", "p.json", "-o", "p.json"], (model(), plan_file())),
        Case("output-prune-onto-eval-data", "output onto an input or a non-file",
             ["-q", "prune", "m.onnx", "--data", "d.npz", "--eval-data", "e.npz", *PRUNE_REST, "-o", "e.npz"],
             (model(), npz(), npz("e.npz"))),
        Case("output-prune-report-onto-data", "output onto an input or a non-file",
             ["-q", "prune", "m.onnx", "--data", "x.report.json", *PRUNE_REST, "-o", "x"],
             (model(), npz("x.report.json"))),
        Case("output-calibrate-onto-task-map", "output onto an input or a non-file",
             ["-q", "calibrate", "m.onnx", "--data", "d.npz", "--task-map", "t.json", "-o", "t.json"],
             (model(), npz(), text("t.json", '{"odd": [1, 3], "even": [0, 2]}'))),
        Case("output-score-onto-stats", "output onto an input or a non-file",
             ["-q", "score", "st.npz", "--model", "m.onnx", "-o", "st.npz"], (model(), stats_file())),
        Case("output-prune-inside-image-folder", "output onto an input or a non-file",
             ["-q", "prune", "m.onnx", "--data", "imgs", *PRUNE_REST, "-o", "imgs/c0/new.png"], (model(), images())),
        Case("output-finetune-onto-reference", "output onto an input or a non-file",
             ["-q", "finetune", "p.onnx", "--reference", "m.onnx", "--data", "d.npz", "-o", "m.onnx"],
             (model(), model("p.onnx"), npz())),
        Case("output-finetune-onto-default-plan", "output onto an input or a non-file",
             ["-q", "finetune", "p.onnx", "--reference", "m.onnx", "--data", "d.npz", "-o", "p.onnx.plan.json"],
             (model(), model("p.onnx"), npz())),
        Case("output-push-pushed-onto-model", "output onto an input or a non-file",
             ["-q", "push", "m.onnx", "--data", "d.npz", "--target-macs", "0.5", "--pushed", "m.onnx", "-o", "q.onnx"],
             (model(), npz())),
        Case("output-export-onto-factory-file", "output onto an input or a non-file",
             ["-q", "export", "net.py:net", "--input-shape", "1x3x8x8", "-o", "net.py"],
             (text("net.py", "def net():\n    raise SystemExit('never called')\n"),)),
        Case("output-latency-cache-is-a-file", "output onto an input or a non-file",
             ["-q", "prune", "m.onnx", "--data", "d.npz", *PRUNE_REST[:-4], "--target-latency", "0.8",
              "--latency-cache", "d.npz", "-o", "p.onnx"], (model(), npz())),
        Case("output-latency-cache-unwritable", "output onto an input or a non-file",
             ["-q", "plan", "s.json", "--target-latency", "0.8", "--latency-cache", "/proc/diprune-audit", "-o",
              "p.json"], (model(), scores_file())),
    ]
    return out


def _bad_plan(**meta: Any) -> tuple[Setup, ...]:
    return (model(), plan_file(**meta))


TEXT_CASES: list[tuple[str, list[str], tuple[Setup, ...]]] = [
    ("task-map-non-utf8", ["calibrate", "m.onnx", "--data", "d.npz", "--task-map", "t.json", "-o", "s.npz"],
     (raw("t.json", b'{"a": [1], \xff}'),)),
    ("task-map-not-json", ["calibrate", "m.onnx", "--data", "d.npz", "--task-map", "t.json", "-o", "s.npz"],
     (text("t.json", "odd: 1,3"),)),
    ("task-map-list", ["calibrate", "m.onnx", "--data", "d.npz", "--task-map", "t.json", "-o", "s.npz"],
     (text("t.json", "[1, 2]"),)),
    ("task-map-one-group", ["calibrate", "m.onnx", "--data", "d.npz", "--task-map", "t.json", "-o", "s.npz"],
     (text("t.json", '{"odd": [1, 3]}'),)),
    ("task-map-negative", ["calibrate", "m.onnx", "--data", "d.npz", "--task-map", "t.json", "-o", "s.npz"],
     (text("t.json", '{"a": [-1], "b": [2]}'),)),
    ("task-map-fifo", ["calibrate", "m.onnx", "--data", "d.npz", "--task-map", "t.json", "-o", "s.npz"],
     (fifo("t.json"),)),
    ("scores-non-utf8", ["plan", "s.json", "--model", "m.onnx", "--target-macs", "0.5", "-o", "p.json"],
     (raw("s.json", b"\xff\xfe{}"),)),
    ("scores-missing-keys", ["plan", "s.json", "--model", "m.onnx", "--target-macs", "0.5", "-o", "p.json"],
     (text("s.json", '{"format": "diprune.scores/1"}'),)),
    ("scores-fifo", ["plan", "s.json", "--model", "m.onnx", "--target-macs", "0.5", "-o", "p.json"], (fifo("s.json"),)),
    ("scores-other-model", ["plan", "s.json", "--model", "m.onnx", "--target-macs", "0.5", "-o", "p.json"],
     (scores_file(), edited_json("s.json", lambda d: {**d, "model_sha256": "0" * 64}))),
    ("scores-group-unknown", ["plan", "s.json", "--model", "m.onnx", "--target-macs", "0.5", "-o", "p.json"],
     (scores_file(), edited_json("s.json", lambda d: {**d, "groups": {"nope": {"scores": [1.0]}}}))),
    ("plan-non-utf8", ["apply", "m.onnx", "p.json", "-o", "a.onnx"], (raw("p.json", b"\x80abc"),)),
    ("plan-empty", ["apply", "m.onnx", "p.json", "-o", "a.onnx"], (raw("p.json", b""),)),
    ("plan-array", ["apply", "m.onnx", "p.json", "-o", "a.onnx"], (text("p.json", "[]"),)),
    ("plan-missing-keys", ["apply", "m.onnx", "p.json", "-o", "a.onnx"], (text("p.json", '{"format": "diprune.plan/1"}'),)),
    ("plan-other-model", ["apply", "m.onnx", "p.json", "-o", "a.onnx"],
     (*_bad_plan(), edited_json("p.json", lambda d: {**d, "model_sha256": "0" * 64}))),
    ("plan-unknown-group", ["apply", "m.onnx", "p.json", "-o", "a.onnx"],
     (*_bad_plan(), edited_json("p.json", lambda d: {**d, "groups": {"nope": {"keep": [0]}}}))),
    ("plan-keep-out-of-range", ["apply", "m.onnx", "p.json", "-o", "a.onnx"],
     (*_bad_plan(), edited_json("p.json", lambda d: {**d, "groups": {g: {"keep": [0, 10**6]} for g in d["groups"]}}))),
    ("plan-keep-empty", ["apply", "m.onnx", "p.json", "-o", "a.onnx"],
     (*_bad_plan(), edited_json("p.json", lambda d: {**d, "groups": {g: {"keep": []} for g in d["groups"]}}))),
    ("plan-keep-bools", ["apply", "m.onnx", "p.json", "-o", "a.onnx"],
     (*_bad_plan(), edited_json("p.json", lambda d: {**d, "groups": {g: {"keep": [True]} for g in d["groups"]}}))),
    ("plan-meta-shapes-string", ["apply", "m.onnx", "p.json", "-o", "a.onnx"], _bad_plan(input_shapes={"input": "ab"})),
    ("plan-meta-shapes-list", ["apply", "m.onnx", "p.json", "-o", "a.onnx"], _bad_plan(input_shapes=[1, 2])),
    ("plan-meta-shapes-zero", ["apply", "m.onnx", "p.json", "-o", "a.onnx"],
     _bad_plan(input_shapes={"input": [1, 0, 28, 28]})),
    ("plan-meta-shapes-unknown-input", ["apply", "m.onnx", "p.json", "-o", "a.onnx"],
     _bad_plan(input_shapes={"nope": [1, 1, 28, 28]})),
    ("plan-meta-task-string", ["apply", "m.onnx", "p.json", "-o", "a.onnx"], _bad_plan(task="x")),
    ("plan-meta-task-classes-strings", ["apply", "m.onnx", "p.json", "-o", "a.onnx"],
     _bad_plan(task={"classes": ["a", "b"]})),
    ("plan-meta-task-groups-int", ["apply", "m.onnx", "p.json", "-o", "a.onnx"], _bad_plan(task={"groups": 3})),
    ("plan-meta-task-one-class", ["apply", "m.onnx", "p.json", "-o", "a.onnx"], _bad_plan(task={"classes": [1]})),
    ("stats-truncated", ["score", "st.npz", "--model", "m.onnx", "-o", "s.json"],
     (stats_file(), lambda d: (d / "st.npz").write_bytes((d / "st.npz").read_bytes()[:2000]))),
    ("stats-plain-npz", ["score", "st.npz", "--model", "m.onnx", "-o", "s.json"], (npz("st.npz"),)),
    ("stats-other-model", ["score", "st.npz", "--model", "o.onnx", "-o", "s.json"],
     (stats_file(), edited_model("o.onnx", lambda p: _conv_weight(p, 0.5)))),
    ("stats-label-free-method-mismatch", ["score", "st.npz", "--model", "m.onnx", "--method", "nope", "-o", "s.json"],
     (stats_file(),)),
]


def text_cases() -> list[Case]:
    out = [Case(f"text-{name}", "malformed plan, scores, stats or task map", ["-q", *argv], (model(), npz(), *setup))
           for name, argv, setup in TEXT_CASES]
    for name in ("stats-label-free-method-mismatch",):
        next(c for c in out if c.id == f"text-{name}").expect = "usage"
    return out


CONFIG_CHANGES: dict[str, tuple[dict[str, Any], tuple[Setup, ...]]] = {
    "gate-min-speedup-nan": ({"gates": {"min_speedup": float("nan")}}, ()),
    "gate-top1-drop-inf": ({"gates": {"max_top1_drop": float("inf")}}, ()),
    "gate-top1-drop-fraction": ({"gates": {"max_top1_drop": 0.01}}, ()),
    "gate-top1-drop-negative": ({"gates": {"max_top1_drop": -1}}, ()),
    "gate-min-top1-over-1": ({"gates": {"min_top1": 98}}, ()),
    "gate-unknown": ({"gates": {"max_top1_dorp": 1}}, ()),
    "bench-duration-inf": ({"bench": {"duration": float("inf")}}, ()),
    "bench-warmup-inf": ({"bench": {"warmup": float("inf")}}, ()),
    "bench-duration-huge": ({"bench": {"duration": 1e7}}, ()),
    "bench-iterations-huge": ({"bench": {"iterations": 10**12}}, ()),
    "bench-rounds-huge": ({"bench": {"rounds": 10**7}}, ()),
    "bench-batch-zero": ({"bench": {"batch": [0]}}, ()),
    "bench-batch-string": ({"bench": {"batch": "one"}}, ()),
    "prune-max-drop-nan": ({"prune": {"max_drop": float("nan")}}, ()),
    "prune-target-nan": ({"prune": {"target_macs": [float("nan")]}}, ()),
    "prune-target-zero": ({"prune": {"target_macs": [0]}}, ()),
    "prune-seed-negative": ({"prune": {"seed": -1}}, ()),
    "prune-seed-float": ({"prune": {"seed": 1.5}}, ()),
    "prune-unknown-method": ({"prune": {"methods": ["nope"]}}, ()),
    "data-scale-inf": ({"data": {"scale": float("inf")}}, ()),
    "data-mean-nan": ({"data": {"mean": [float("nan")]}}, ()),
    "data-limit-zero": ({"data": {"limit": 0}}, ()),
    "data-channel-order-bad": ({"data": {"channel_order": "cmyk"}}, ()),
    "task-classes-one": ({"task": {"classes": [3]}}, ()),
    "task-map-missing": ({"task": {"map": "missing.json"}}, ()),
    "task-map-non-utf8": ({"task": {"map": "t.json"}}, (raw("t.json", b"\xff"),)),
    "model-missing": ({"model": "missing.onnx"}, ()),
    "model-folder": ({"model": "dir.onnx"}, (folder("dir.onnx"),)),
    "model-at-out-best": ({"model": "out/best.onnx", "gates": {"min_speedup": 100}},
                          (folder("out"), model("out/best.onnx"))),
    "model-at-out-best-passing": ({"model": "out/best.onnx"}, (folder("out"), model("out/best.onnx"))),
    "model-in-out-candidates": ({"model": "out/candidates/m.onnx"}, (folder("out/candidates"),
                                                                    model("out/candidates/m.onnx"))),
    "data-in-out-cache": ({"data": {"calibration": {"path": "out/cache/d.npz"}}}, (folder("out/cache"),
                                                                                  npz("out/cache/d.npz"))),
    "task-map-at-out-report": ({"task": {"map": "out/report.json"}},
                               (folder("out"), text("out/report.json", '{"odd": [1, 3], "even": [0, 2]}'))),
    "output-inside-image-folder": ({"data": {"calibration": {"path": "imgs", "channel_order": "gray", "size": 28,
                                                             "crop": 28}}, "output": "imgs/out"}, (images(),)),
    "output-is-a-file": ({"output": "d.npz"}, ()),
    "output-is-devnull": ({"output": "/dev/null"}, ()),
    "output-unwritable": ({"output": "/proc/diprune-audit"}, ()),
    "top-level-list": ({}, (text("job.yaml", "- a\n- b\n"),)),
    "empty-file": ({}, (raw("job.yaml", b""),)),
    "not-yaml": ({}, (text("job.yaml", "model: [unclosed\n"),)),
    "non-utf8": ({}, (raw("job.yaml", b"model: m.onnx\n\xff\xfe"),)),
    "fifo": ({}, (lambda d: ((d / "job.yaml").unlink(), os.mkfifo(d / "job.yaml")),)),
}


def config_cases() -> list[Case]:
    out = []
    for name, (changes, setup) in CONFIG_CHANGES.items():
        out.append(Case(f"config-{name}", "run config", ["-q", "run", "job.yaml"],
                        (model(), npz(), config(**changes), *setup)))
    out.append(Case("config-output-flag-onto-config", "run config", ["-q", "run", "job.yaml", "-o", "job.yaml"],
                    (model(), npz(), config())))
    return out


def _cache_files(d: Path, kind: str) -> list[Path]:
    return sorted(p for p in (d / "out" / "cache").glob(f"{kind}-*") if p.is_file())


def _change_weights(d: Path) -> None:
    path = next(p for p in _cache_files(d, "candidate") if p.suffix == ".onnx")
    proto = onnx.load(str(path))
    _conv_weight(proto, 123.0)
    onnx.save(proto, str(path))


def _rewrite_json(kind: str, content: str, only: str = ".json") -> Setup:
    def change(d: Path) -> None:
        for path in _cache_files(d, kind):
            if path.name.endswith(only) and not path.name.endswith(".plan.json"):
                path.write_text(content)
    return change


def _truncate_stats(d: Path) -> None:
    for path in _cache_files(d, "calibration"):
        path.write_bytes(path.read_bytes()[:1000])


def _recomputed(key: str, count: int = 1) -> Callable[[Path], bool]:
    return lambda d: _run_report(d)["cache"][key] == count


def _reused_nothing(d: Path) -> bool:
    return _run_report(d)["cache"]["evaluations_reused"] == 0


CACHE_CASES: dict[str, tuple[Setup, Callable[[Path], bool], dict[str, Any]]] = {
    "candidate-weights-changed": (_change_weights, _recomputed("candidates_computed"), {}),
    "candidate-meta-missing-keys": (_rewrite_json("candidate", '{"method": "l2"}'), _recomputed("candidates_computed"),
                                    {}),
    "candidate-meta-not-json": (_rewrite_json("candidate", "{nope"), _recomputed("candidates_computed"), {}),
    "candidate-meta-list": (_rewrite_json("candidate", "[1, 2]"), _recomputed("candidates_computed"), {}),
    "eval-missing-keys": (_rewrite_json("eval", '{"n": 1}'), _reused_nothing, {}),
    "eval-wrong-types": (_rewrite_json("eval", '{"n": 1, "top1": "high", "top5": null, "agreement": null, '
                                               '"relative_logit_error": null}'), _reused_nothing, {}),
    "calibration-truncated": (lambda d: (_truncate_stats(d), _rewrite_json("candidate", "{}")(d)),
                              lambda d: _run_report(d)["cache"]["calibration"] == "computed",
                              {"prune": {"methods": ["di"]}, "data": {"calibration": {"path": "mnist",
                                                                                       "limit": 64}}}),
    "search-missing-keys": (_rewrite_json("search", '{"found": 1}'), _recomputed("candidates_computed"),
                            {"prune": {"methods": ["l2"], "max_drop": 50}}),
}


def cache_cases() -> list[Case]:
    out = []
    for name, (change, check, changes) in CACHE_CASES.items():
        outputs = ("out/**",)
        out.append(Case(f"cache-{name}", "run cache changed or partial", ["-q", "run", "job.yaml"],
                        (model(), npz(), config(**changes)), expect="ok", outputs=outputs, check=check,
                        runner=twice(change), timeout=180))
    return out


def _spilled(d: Path) -> bool:
    return any(d.glob("out/.diprune-sweep-*/frontier.bin"))


def process_cases() -> list[Case]:
    recover = ["-q", "prune", "m.onnx", "--data", "mnist", "--limit", "256", "--method", "l2", "--recover", "lstsq",
               "--target-macs", "0.5", "--batch-size", "16", "-o", "out/p.onnx"]
    calibrating = ["calibrate", "m.onnx", "--data", "mnist", "--split", "all", "--batch-size", "1", "-o",
                   "out/s.npz"]  # not quiet: its progress bar on stderr says calibration has started
    return [
        Case("signal-sigterm-during-recovery", "signals and concurrency", recover, (model(), folder("out")),
             expect="signal", runner=signal_runner(signal.SIGTERM, _spilled, spill=True), timeout=240),
        Case("signal-sigint-during-recovery", "signals and concurrency", recover, (model(), folder("out")),
             expect="signal", runner=signal_runner(signal.SIGINT, _spilled, spill=True), timeout=240),
        Case("signal-sigterm-during-calibration", "signals and concurrency", calibrating, (model(), folder("out")),
             expect="signal", runner=signal_runner(signal.SIGTERM, lambda d: os.fstat(2).st_size > 0), timeout=240),
        Case("concurrent-runs-one-output", "signals and concurrency", ["-q", "run", "job.yaml"],
             (model(), npz(), config(bench={"duration": 4.0})), outputs=("out/**",), runner=concurrent_runner,
             timeout=300),
        Case("run-after-a-killed-run", "signals and concurrency", ["-q", "run", "job.yaml"],
             (model(), npz(), config(), config("slow.yaml", bench={"duration": 60.0})), expect="ok",
             outputs=("out/**",), runner=after_kill_runner, timeout=300),
    ]


def valid_cases() -> list[Case]:
    """Hostile but valid: these must work."""
    return [
        Case("valid-unicode-and-spaces", "valid but unusual", ["-q", "prune", "mö del.onnx", "--data", "dä ta.npz",
                                                                 *PRUNE_REST, "-o", "öut put.onnx"],
             (model("mö del.onnx"), npz("dä ta.npz")), expect="ok", outputs=("öut put.onnx*",)),
        Case("valid-symlinked-inputs", "valid but unusual", ["-q", "prune", "ml.onnx", "--data", "dl.npz",
                                                               *PRUNE_REST, "-o", "p.onnx"],
             (model(), npz(), link("ml.onnx", "m.onnx"), link("dl.npz", "d.npz")), expect="ok", outputs=("p.onnx*",)),
        Case("valid-overwrite-an-old-output", "valid but unusual", ["-q", "prune", "m.onnx", "--data", "d.npz",
                                                                      *PRUNE_REST, "-o", "p.onnx"],
             (model(), npz(), text("p.onnx", "old output")), expect="ok", outputs=("p.onnx*",),
             check=lambda d: (d / "p.onnx").stat().st_size > 1000),
        Case("valid-bare-input-shape", "valid but unusual", ["-q", "inspect", "m.onnx", "--input-shape", "1x1x28x28"],
             (model(),), expect="ok"),
        Case("valid-run-with-data-in-output", "valid but unusual", ["-q", "run", "job.yaml"],
             (model(), folder("out"), npz("out/d.npz"), config(data={"calibration": {"path": "out/d.npz"},
                                                                      "evaluation": {"path": "out/d.npz"}})),
             expect="ok", outputs=("out/**",)),
        Case("valid-non-utf8-file-names", "valid but unusual",
             ["-q", "prune", os.fsdecode(b"m\xff.onnx"), "--data", "d.npz", *PRUNE_REST, "-o", os.fsdecode(b"p\xfe.onnx")],
             (model(os.fsdecode(b"m\xff.onnx")), npz()), expect="ok", outputs=(os.fsdecode(b"p\xfe.onnx"),)),
        Case("valid-gray-image-folder", "valid but unusual", ["-q", "eval", "m.onnx", "--data", "imgs",
                                                                "--channel-order", "gray", "--size", "28", "--crop",
                                                                "28", "--split", "all"],
             (model(), images()), expect="ok"),
    ]


def cases() -> list[Case]:
    """Every case of the audit."""
    return [*model_cases(), *data_cases(), *number_cases(), *output_cases(), *text_cases(), *config_cases(),
            *cache_cases(), *process_cases(), *valid_cases()]


# ---------------------------------------------------------------------------------------------- run and classify


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a file's sha256, a symlink's target, a FIFO / device / folder marker."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            mode = os.lstat(path).st_mode
            key = str(path.relative_to(folder))
            if stat.S_ISLNK(mode):
                out[key] = "link:" + os.readlink(path)
            elif stat.S_ISREG(mode):
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISDIR(mode):
                out[key] = "dir"
            else:
                out[key] = f"special:{stat.S_IFMT(mode)}"
    return out


def _child(case: Case, d: Path, log: Path) -> None:
    """In the forked child: make the files, record them, run the case with stdout/stderr to files, exit with its
    code (never returns)."""
    code = 1
    try:
        os.chdir(d)
        quiet = os.open(log / "setup.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # what the setup prints
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        for make in case.setup:
            make(d)
        (log / "before.json").write_text(json.dumps(snapshot(d)))
        sys.stdout.flush()
        sys.stderr.flush()
        out = os.open(log / "stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(log / "stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.argv = ["diprune", *case.argv]
        try:
            code = (case.runner or in_process)(case, d)
        except BaseException:  # what the interpreter prints for an uncaught exception
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # the audit's own setup failed
        with open(log / "setup_error", "w") as handle:
            traceback.print_exc(file=handle)
        code = 97
    os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


def classify(case: Case, d: Path, log: Path, code: int | None) -> tuple[str, str]:
    """The outcome class and a short note (the error line, or what went wrong)."""
    err = (log / "stderr").read_text(errors="replace") if (log / "stderr").is_file() else ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("diprune: error:")]
    usage = [ln for ln in lines if ln.startswith("diprune ") and ": error: " in ln]
    note = (errors or usage or lines or [""])[-1][:300]
    if (log / "setup_error").is_file():
        return "audit setup failed", (log / "setup_error").read_text().splitlines()[-1][:300]
    before = json.loads((log / "before.json").read_text())
    after = snapshot(d)
    declared = [k for k in before if case.expect == "ok" and any(k.startswith(p.rstrip("*")) for p in case.outputs)]
    changed = sorted(k for k, v in before.items() if after.get(k) != v and not k.startswith("out/")
                     and k not in declared)
    if case.expect != "ok":
        changed += sorted(k for k, v in before.items() if k.startswith("out/") and after.get(k) != v
                          and not k.endswith(".diprune.lock") and v != "dir")
    new = sorted(k for k, v in after.items() if k not in before and v != "dir" and not k.endswith(".diprune.lock"))
    temporary = [k for k in new if ".diprune-" in k or k.endswith((".tmp", ".probe"))]
    allowed = [k for k in new if any(k.startswith(p.rstrip("*")) for p in case.outputs)]
    if code is None:
        return "hang", f"no exit after {case.timeout:g} s"
    if "Traceback" in err:
        return "traceback", next((ln for ln in reversed(lines) if ln and not ln.startswith(" ")), "")[:300]
    if changed:
        return "input modified", ", ".join(changed)[:300]
    if case.expect == "ok":
        if code != 0:
            return "failed", note
        if temporary or set(new) - set(allowed):
            return "partial output", ", ".join(sorted(set(new) - set(allowed)) or temporary)[:300]
        if case.check is not None and not case.check(d):
            return "failed", "the case's check did not hold (e.g. a changed cache entry was reused)"
        return "clean", ""
    if set(new) - set(allowed) or temporary:
        return "partial output", ", ".join(sorted(set(new) - set(allowed)) or temporary)[:300]
    if code == 0:
        return "silent acceptance", (lines or ["exit 0"])[-1][:300]
    if case.expect == "usage":
        return ("clean error", note) if code == 2 and len(usage) == 1 else ("wrong exit code" if code != 2 else
                                                                          "unclear error", note)
    if case.expect == "signal":
        marker = "terminated" if "sigterm" in case.id else "interrupted"
        return ("clean error", lines[-1][:300] if lines else "") if code in (130, 143) and any(
            marker in ln for ln in lines) else ("wrong exit code", f"exit {code}: {note}")
    if len(errors) != 1:
        return "unclear error", f"exit {code}, {len(errors)} error lines: {note}"
    return "clean error", note


def _shipped() -> dict[Path, bytes]:
    """The package's own data files (a case that writes over one is flagged and the file restored)."""
    return {path: path.read_bytes() for path in (Path(mnist_path()), Path(demo_model_path()))}


def run_cases(selected: list[Case], jobs: int, work: Path) -> list[dict[str, Any]]:
    """Run every case (``jobs`` at a time), each in a forked child with its timeout; the classified rows."""
    shipped = _shipped()
    pending = list(enumerate(selected))
    running: dict[int, tuple[int, Case, Path, Path, float]] = {}
    rows: list[dict[str, Any]] = [{}] * len(selected)
    while pending or running:
        while pending and len(running) < jobs:
            index, case = pending.pop(0)
            d, log = work / f"case{index:04d}", work / f"log{index:04d}"
            d.mkdir()
            log.mkdir()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.setpgid(0, 0)  # its own process group: a timeout kills what it started too
                _child(case, d, log)
            running[pid] = (index, case, d, log, time.monotonic())
        done = []
        for pid, (index, case, d, log, start) in running.items():
            waited, status = os.waitpid(pid, os.WNOHANG)
            seconds = time.monotonic() - start
            if waited == 0 and seconds < case.timeout:
                continue
            code: int | None
            if waited == 0:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                code = None
            else:
                code = os.waitstatus_to_exitcode(status)
            outcome, note = classify(case, d, log, code)
            for path, content in shipped.items():
                if not path.is_file() or path.read_bytes() != content:
                    atomic_write_bytes(path, content)
                    outcome, note = "input modified", f"the shipped {path.name} (restored)"
            shown = " ".join(case.argv).encode(errors="backslashreplace").decode()  # names that are not UTF-8
            rows[index] = {"id": case.id, "category": case.category, "command": shown, "expect": case.expect,
                           "outcome": outcome, "exit_code": code, "seconds": round(seconds, 2),
                           "note": note.encode(errors="backslashreplace").decode()}
            mark = "ok " if outcome in CLEAN else "BAD"
            print(f"{mark} {index + 1:3d}/{len(selected)} {case.id}: {outcome} ({code}) {note[:120]}", flush=True)
            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(log, ignore_errors=True)
            done.append(pid)
        for pid in done:
            running.pop(pid)
        time.sleep(0.02)
    return rows


def to_markdown(doc: dict[str, Any]) -> str:
    rows = doc["cases"]
    lines = [f"# Hostile-input audit ({len(rows)} cases)", "",
             f"Command: `{doc['command']}`; {doc['jobs']} jobs; {doc['seconds']:.0f} s wall, {doc['cpu_seconds']:.0f} "
             f"CPU s of the cases, on {doc['machine']['cpu']} ({doc['machine']['cores_available']} cores, shared "
             f"with other jobs: load average {doc['load_average'][0]} at the end). Outcomes: "
             + ", ".join(f"{k} {v}" for k, v in doc["outcomes"].items()) + ".", "",
             "| category | cases | clean | not clean |", "|---|---|---|---|"]
    for category, counts in doc["by_category"].items():
        lines.append(f"| {category} | {counts['cases']} | {counts['clean']} | {counts['cases'] - counts['clean']} |")
    bad = [r for r in rows if r["outcome"] not in CLEAN]
    lines += ["", f"## Not clean ({len(bad)})", ""]
    lines += [f"- `{r['id']}` ({r['outcome']}, exit {r['exit_code']}): {r['note']}" for r in bad] or ["None."]
    lines += ["", "## Every case", "", "| case | expected | outcome | exit | s | message |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['id']} | {r['expect']} | {r['outcome']} | {r['exit_code']} | {r['seconds']} | "
              f"{r['note'].replace('|', '/')[:160]} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="only the cases whose id contains this (results not written)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    parser.add_argument("--list", action="store_true", help="list the case ids and exit")
    args = parser.parse_args(argv)
    selected = [c for c in cases() if args.k is None or args.k in c.id]
    if args.list:
        print("\n".join(f"{c.id}\t{c.category}\t{c.expect}" for c in selected))
        return 0
    import pipeline.cli  # noqa: F401  (imported once here: every forked case starts with it loaded)

    _all_digits()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="diprune-audit-") as tmp:
        rows = run_cases(selected, args.jobs, Path(tmp))
    seconds = time.monotonic() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the cases' CPU time (load-independent, unlike wall)
    cpu = round(usage.ru_utime + usage.ru_stime, 1)
    outcomes = Counter(r["outcome"] for r in rows)
    by_category: dict[str, dict[str, int]] = {}
    for r in rows:
        entry = by_category.setdefault(r["category"], {"cases": 0, "clean": 0})
        entry["cases"] += 1
        entry["clean"] += r["outcome"] in CLEAN
    doc = {"format": "diprune.hostile-audit/1", "command": "python -m benchmarks.hostile_audit"
           + (f" -k {args.k}" if args.k else "") + ("" if args.jobs == 2 else f" --jobs {args.jobs}"),
           "jobs": args.jobs, "seconds": round(seconds, 1), "cpu_seconds": cpu,
           "load_average": [round(v, 1) for v in os.getloadavg()], "machine": machine_info(), "outcomes": dict(outcomes),
           "by_category": by_category, "cases": rows}
    bad = len(rows) - sum(outcomes[c] for c in CLEAN)
    print(f"{len(rows)} cases in {seconds:.0f} s ({cpu:.0f} CPU s): "
          + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    if args.k is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(RESULTS / "hostile_audit.json", (json.dumps(doc, indent=1) + "\n").encode())
        atomic_write_bytes(RESULTS / "hostile_audit.md", to_markdown(doc).encode())
        print(f"wrote {RESULTS / 'hostile_audit.json'} and hostile_audit.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
