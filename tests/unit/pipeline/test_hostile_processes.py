"""Issue 25, the cases that need real processes: SIGTERM during recovery cleans up like SIGINT, and two concurrent
``diprune run`` on one output folder: the second is refused while the first holds the lock."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from graph_ops.io import sha256_file
from pipeline.data.datasets import mnist_path
from pipeline.prune.demo import demo_model_path

pytestmark = pytest.mark.slow  # real processes: a few seconds each

# Recovery with its frontier spilled from the first array on, slowed down so that SIGTERM lands in the middle.
SPILLING_PRUNE = """
import sys, time
from pipeline.recovery import frontier

init, put = frontier.FrontierStore.__init__, frontier.FrontierStore.put
frontier.FrontierStore.__init__ = lambda self, budget, spill_dir: init(self, 0, spill_dir)

def slow_put(self, *args):
    time.sleep(0.05)
    put(self, *args)

frontier.FrontierStore.put = slow_put
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[3])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_recovery_leaves_nothing_behind(sig: signal.Signals, tmp_path: Path) -> None:
    """SIGTERM (what CI sends on cancel) left ``.diprune-sweep-*/frontier.bin`` beside the output; now it unwinds
    like SIGINT: temporary folders removed, no output, the input intact, a non-zero exit without a traceback."""
    model = tmp_path / "m.onnx"
    shutil.copy(demo_model_path(), model)
    before = sha256_file(model)
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    argv = ["-q", "prune", str(model), "--data", "mnist", "--limit", "256", "--method", "l2", "--recover", "lstsq",
            "--target-macs", "0.5", "--batch-size", "16", "-o", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", SPILLING_PRUNE, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert _wait_for(lambda: any(out.parent.glob(".diprune-sweep-*/frontier.bin")), 120), "no spill seen"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    assert "Traceback" not in err
    assert ("terminated" if sig == signal.SIGTERM else "interrupted") in err
    assert list(out.parent.iterdir()) == []  # no spill folder, no partial output, no temporary file
    assert sha256_file(model) == before


def _config(folder: Path, duration: float) -> Path:
    with np.load(mnist_path()) as digits:
        np.savez(folder / "d.npz", x=digits["x"][8000:8064], y=digits["y"][8000:8064])
    shutil.copy(demo_model_path(), folder / "m.onnx")
    doc = {"model": "m.onnx", "data": {"calibration": "d.npz", "evaluation": "d.npz", "mean": 0.1307, "std": 0.3081},
           "prune": {"methods": ["l2"], "target_macs": [0.5], "recover": "none"},
           "bench": {"batch": [1], "warmup": 0, "duration": duration, "iterations": 2, "rounds": 1},
           "output": "out"}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_two_concurrent_runs_on_one_output_folder(tmp_path: Path) -> None:
    """Both exited 0 and ``best.onnx`` could hold the other job's model; now the second is refused while the first
    holds the lock, the first finishes normally, and a third run after it takes the lock again (never stale)."""
    config = _config(tmp_path, duration=6.0)
    command = [sys.executable, "-m", "pipeline.cli", "-q", "run", str(config)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    lock = tmp_path / "out" / ".diprune.lock"
    try:
        assert _wait_for(lambda: lock.is_file() and "pid" in lock.read_text(), 120), "the first run took no lock"
        second = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_env(), check=False)
        assert first.poll() is None, "the first run ended before the second started; lengthen its bench"
        first_out, first_err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert second.stderr.startswith("diprune: error: output folder") and "is in use by diprune pid" in second.stderr
    assert str(first.pid) in second.stderr and second.stdout == ""
    assert first.returncode == 0, first_err
    assert "best: l2-macs0.5" in first_out
    quick = _config(tmp_path, duration=0.01)  # same folder again: the first's lock died with it
    third = subprocess.run([*command[:-1], str(quick)], capture_output=True, text=True, timeout=180, env=_env(),
                           check=False)
    assert third.returncode == 0, third.stderr


def test_a_killed_run_leaves_no_stale_lock(tmp_path: Path) -> None:
    """SIGKILL (no cleanup at all): the kernel drops the flock with the process; the next run proceeds."""
    config = _config(tmp_path, duration=30.0)
    command = [sys.executable, "-m", "pipeline.cli", "-q", "run", str(config)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    lock = tmp_path / "out" / ".diprune.lock"
    try:
        assert _wait_for(lambda: lock.is_file() and "pid" in lock.read_text(), 120)
    finally:
        first.kill()
        first.wait(timeout=60)
    assert lock.is_file()  # the file stays, the lock does not
    quick = _config(tmp_path, duration=0.01)
    result = subprocess.run([*command[:-1], str(quick)], capture_output=True, text=True, timeout=180, env=_env(),
                            check=False)
    assert result.returncode == 0, result.stderr


HOLD = """
import sys, time
from pipeline.locks import exclusive_lock
with exclusive_lock(sys.argv[1], "the test's lock"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    print("releasing", flush=True)
"""


def test_a_lock_held_by_another_process_refuses_or_waits(tmp_path: Path) -> None:
    """The latency cache's entries wait for their builder (then reuse its model); an output folder refuses."""
    from pipeline.locks import LockedError, exclusive_lock

    lock = tmp_path / "entry.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), "2"], stdout=subprocess.PIPE, text=True,
                              env=_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match="is in use by diprune pid"), exclusive_lock(lock, "x"):
            pass
        with exclusive_lock(lock, "x", wait=True):  # returns once the holder let go
            assert holder.stdout.readline().strip() == "releasing"
    finally:
        holder.kill()
        holder.wait()
