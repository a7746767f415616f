"""Calibration and recovery on a real local Ray instance: 1, 2 and 3 workers give statistics, plans and recovered
models identical to the last bit (and to a run without Ray); a worker killed once is retried or restarted and the
result does not change. Skipped, with the reason, when Ray (the extra ``[ray]``) is not installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from graph_ops.prune import apply_plan
from pipeline.calibration.calibrate import calibrate
from pipeline.data.datasets import from_iterable, mnist_path
from pipeline.data.named import open_dataset
from pipeline.errors import UserInputError
from pipeline.model.prepare import prepare
from pipeline.prune.one_shot import prune
from pipeline.prune.orchestrate import PruneRun, keep_lists, score
from pipeline.recovery import recover
from pipeline.selection.allocate import select_channels

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = [pytest.mark.ray, pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (extra [ray]: "
                                                                      "make test-ray installs it)")]
MODEL = mnist_path().with_name("mnist_cnn.onnx")
FIELDS = ("class_counts", "sum", "class_sums", "gram", "zeros", "abs_sum")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[object]:
    """One local Ray instance with 3 CPUs for the module (the code under test reuses a running Ray)."""
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def mnist() -> tuple:
    return prepare(MODEL), open_dataset("mnist", split="train", limit=700)


def _options(workers: int, **kwargs: object) -> object:
    from pipeline.cluster import RayOptions

    return RayOptions(workers=workers, **kwargs)


def _assert_same_stats(a, b) -> None:
    assert list(a.probes) == list(b.probes)
    for name, stats in a.probes.items():
        for field in FIELDS:
            assert np.array_equal(getattr(stats, field), getattr(b.probes[name], field)), (name, field)


@pytest.mark.usefixtures("local_ray")
class TestOnRay:
    pytestmark = needs_ray

    def test_statistics_and_plans_from_1_2_3_workers_are_identical(self, mnist: tuple, tmp_path: Path) -> None:
        prepared, data = mnist
        reference = calibrate(prepared, data, progress=False)
        plans = set()
        for workers in (1, 2, 3):
            stats = calibrate(prepared, data, progress=False, cluster=_options(workers))
            _assert_same_stats(reference, stats)
            plan = select_channels(score(prepared, stats, "di"), prepared.index, target_macs=0.5)
            plans.add(plan.with_sha(prepared.sha256).save(tmp_path / f"plan{workers}.json").read_bytes())
        assert len(plans) == 1

    @pytest.mark.parametrize("labels", ["masks", "model"])
    def test_location_statistics_from_1_2_workers_are_identical(self, tmp_path: Path, labels: str) -> None:
        from pipeline.data.datasets import from_npz
        from pipeline.data.targets import LabelOptions
        from tests.dense_models import seg_net

        model = prepare(seg_net(str(tmp_path / "seg.onnx")))
        rng = np.random.default_rng(0)
        maps = (rng.random((40, 16, 16)) > 0.7).astype(np.int64)
        np.savez(tmp_path / "d.npz", x=rng.standard_normal((40, 1, 16, 16)).astype(np.float32),
                 **({"y": maps} if labels == "masks" else {}))
        data = from_npz(tmp_path / "d.npz")
        options = {"progress": False, "batch_size": 8, "shard_batches": 1, "labels": LabelOptions(
            source="data" if labels == "masks" else "model")}
        reference = calibrate(model, data, **options)
        assert reference.targets["labels"] == ("data" if labels == "masks" else "model")
        for workers in (1, 2):
            _assert_same_stats(reference, calibrate(model, data, cluster=_options(workers), **options))

    def test_recovered_models_from_1_2_3_workers_are_identical(self, mnist: tuple) -> None:
        prepared, data = mnist
        keep = keep_lists(select_channels(score(prepared, None, "l2"), prepared.index, target_macs=0.4))
        pruned = apply_plan(prepared.model, prepared.index, keep)
        reference, report = recover(prepared.model, pruned, prepared.index, keep, data)
        assert report.consumers
        for workers in (1, 2, 3):
            got, _ = recover(prepared.model, pruned, prepared.index, keep, data, cluster=_options(workers))
            assert got.SerializeToString() == reference.SerializeToString(), workers

    def test_a_killed_calibration_task_is_retried_and_the_statistics_do_not_change(
            self, mnist: tuple, tmp_path: Path) -> None:
        prepared, data = mnist
        marker = tmp_path / "killed"
        stats = calibrate(prepared, data, progress=False, cluster=_options(2, fault=(str(marker), 1)))
        assert marker.exists()  # shard 1's first worker process was killed
        _assert_same_stats(calibrate(prepared, data, progress=False), stats)

    def test_a_recovery_actor_killed_mid_run_is_restarted_and_the_model_does_not_change(
            self, mnist: tuple, tmp_path: Path) -> None:
        prepared, data = mnist
        keep = keep_lists(select_channels(score(prepared, None, "l2"), prepared.index, target_macs=0.4))
        pruned = apply_plan(prepared.model, prepared.index, keep)
        reference, _ = recover(prepared.model, pruned, prepared.index, keep, data)
        marker = tmp_path / "killed"
        got, _ = recover(prepared.model, pruned, prepared.index, keep, data, cluster=_options(2, fault=(str(marker),
                                                                                                       2)))
        assert marker.exists()  # an actor died at level 2 and was restarted: it replayed levels 0 and 1
        assert got.SerializeToString() == reference.SerializeToString()

    def test_prune_with_workers_writes_the_same_files(self, tmp_path: Path) -> None:
        data = open_dataset("mnist", split="train", limit=500)
        outputs = {}
        for name, cluster in (("local", None), ("ray", _options(2))):
            out = tmp_path / f"{name}.onnx"
            report = prune(MODEL, out, data=data, target_macs=0.5, progress=False, cluster=cluster)
            assert report.recovery["method"] == "lstsq"
            outputs[name] = out.read_bytes(), Path(f"{out}.plan.json").read_bytes()
        assert outputs["local"] == outputs["ray"]

    def test_in_memory_data_is_refused(self) -> None:
        data = from_iterable([(np.zeros((4, 1, 28, 28), np.float32), np.arange(4))])
        with pytest.raises(UserInputError, match="open themselves"):
            PruneRun(MODEL, data, cluster=_options(2), progress=False).stats()

    def test_cli_calibrate_with_workers(self, tmp_path: Path) -> None:
        from pipeline.calibration.stats import CalibrationStats
        from pipeline.cli import main

        args = [str(MODEL), "--data", "mnist", "--limit", "300"]
        assert main(["-q", "calibrate", *args, "-o", str(tmp_path / "a.npz")]) == 0
        assert main(["-q", "calibrate", *args, "--workers", "2", "-o", str(tmp_path / "b.npz")]) == 0
        _assert_same_stats(CalibrationStats.load(tmp_path / "a.npz"), CalibrationStats.load(tmp_path / "b.npz"))


def test_without_ray_the_options_name_the_extra() -> None:
    """In a process where ``import ray`` fails, --workers is a one-line user error naming the extra."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "from pipeline.cli import main\n"
            f"sys.exit(main(['calibrate', {str(MODEL)!r}, '--data', 'mnist', '--workers', '2', '-o', 'x.npz']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("diprune: error: --workers / --ray run on Ray, which is not "
                                                     "installed: pip install 'diprune[ray]'")
