"""Short distillation of a pruned model: same graph, lower distillation loss, deterministic; CLI and config."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pipeline.cli import main
from pipeline.data.datasets import from_iterable
from pipeline.data.named import open_dataset
from pipeline.errors import UserInputError
from pipeline.job.config import config_from_dict
from pipeline.prune.demo import demo_model_path
from pipeline.prune.orchestrate import PruneRun
from pipeline.training.finetune import FinetuneOptions, finetune, probe_channels
from pipeline.training.loop import learning_rate_factor
from tests.graphs import INPUT_SHAPE, MOTIFS

needs_torch = pytest.mark.skipif(importlib.util.find_spec("onnx2torch") is None,
                                 reason="needs the [torch] extra (onnx2torch is not installed)")


def _structure(model: onnx.ModelProto) -> tuple:
    graph = model.graph
    return (tuple(n.SerializeToString(deterministic=True) for n in graph.node),
            tuple(i.SerializeToString(deterministic=True) for i in [*graph.input, *graph.output]),
            tuple((t.name, t.data_type, tuple(t.dims)) for t in graph.initializer))


@pytest.fixture(scope="module")
def pruned_demo() -> tuple[PruneRun, object]:
    """The demo CNN at 0.35 of the MACs, channels removed without recovery: far from its teacher."""
    run = PruneRun(demo_model_path(), open_dataset("mnist", split="train", limit=256), progress=False,
                   intra_op_threads=1)
    return run, run.candidate("di", target_macs=0.35, recover="none")


@needs_torch
def test_a_short_finetune_lowers_the_distillation_loss_and_keeps_the_graph(pruned_demo) -> None:
    run, candidate = pruned_demo
    model, record = finetune(candidate.model, run.prepared.model, run.data, FinetuneOptions(epochs=1))
    assert record.kept and record.distill_loss_after < 0.8 * record.distill_loss_before
    assert record.objective_after < record.objective_before
    assert record.round_trip_error <= 1e-5 and record.write_back_error <= 1e-4
    assert _structure(model) == _structure(candidate.model)  # same nodes, interface, initializer names and shapes
    onnx.checker.check_model(model, full_check=True)
    changed = [a.name for a, b in zip(model.graph.initializer, candidate.model.graph.initializer, strict=True)
               if not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))]
    assert len(changed) == record.trained_initializers > 0
    test = open_dataset("mnist", split="test", limit=300)
    assert run.evaluate(model, test)["top1"] > run.evaluate(candidate.model, test)["top1"]


@needs_torch
def test_finetune_is_deterministic_and_feature_matching_uses_the_kept_channels(pruned_demo) -> None:
    run, candidate = pruned_demo
    data = open_dataset("mnist", split="train", limit=96)
    features = probe_channels(run.prepared, candidate.plan.keep, candidate.model)
    widths = {probe: run.prepared.index.shapes[probe][1] for probe in features}
    assert any(len(idx) < widths[probe] for probe, idx in features.items())  # the plan removed channels there
    assert all(idx.max() < widths[probe] for probe, idx in features.items())
    options = FinetuneOptions(epochs=1, batch_size=32, feature_weight=1.0)
    first, record = finetune(candidate.model, run.prepared.model, data, options, features=features)
    second, _ = finetune(candidate.model, run.prepared.model, data, options, features=features)
    assert record.feature_probes == tuple(features)
    assert first.SerializeToString() == second.SerializeToString()


@needs_torch
def test_a_finetune_whose_epochs_do_not_beat_the_input_on_validation_returns_the_input(pruned_demo) -> None:
    run, candidate = pruned_demo
    options = FinetuneOptions(epochs=2, batch_size=128, lr=1.0)  # absurd step size: training diverges
    model, record = finetune(candidate.model, run.prepared.model, open_dataset("mnist", split="train", limit=128),
                             options)
    assert not record.kept and record.best_epoch == 0 and [c.epoch for c in record.checks] == [0, 1, 2]
    assert all(c.worse_than_input() and c.change > 2 * c.noise > 0 for c in record.checks[1:])
    assert model.SerializeToString() == candidate.model.SerializeToString()
    assert "every epoch was worse than the input beyond the noise" in record.summary()


@needs_torch
def test_the_best_epoch_on_the_validation_slice_is_returned(pruned_demo) -> None:
    """Every epoch is measured on the held-out slice; the one returned has the lowest objective there, and
    onnxruntime on the returned model reproduces that epoch's validation top-1."""
    from pipeline.model.runtime import open_session
    from pipeline.training.validation import validation_split

    run, candidate = pruned_demo
    data = open_dataset("mnist", split="train", limit=320)
    options = FinetuneOptions(epochs=3, batch_size=32, lr=3e-3, validation=0.25)
    model, record = finetune(candidate.model, run.prepared.model, data, options)
    fit, held = validation_split(320, 0.25, options.seed)
    assert record.validation_samples == held.size == 80 and not set(fit) & set(held) and fit.size == 240
    assert record.steps == 3 * 8  # the 240 training samples in batches of 32, three times
    best = record.checks[1]
    for check in record.checks[2:]:
        best = check if check.objective < best.objective else best
    assert record.best_epoch == best.epoch > 0 and not best.worse_than_input()
    session = open_session(model.SerializeToString(), "ort-cpu", 1)
    feeds, labels = {model.graph.input[0].name: next(iter(data.loader(held).values()))}, data.labels[held]
    logits = session.run(None, feeds)[0]
    assert float((logits.argmax(axis=1) == labels).mean()) == pytest.approx(best.top1)
    doc = record.to_dict()
    assert doc["best_epoch"] == best.epoch and doc["epochs_run"] == 3 and len(doc["validation"]) == 4


def test_paired_change_is_the_mean_difference_and_its_standard_error() -> None:
    from pipeline.training.validation import paired_change

    before = np.array([1.0, 2.0, 3.0, 4.0])
    change, noise = paired_change(before + np.array([0.1, 0.3, 0.1, 0.3]), before)
    assert change == pytest.approx(0.2) and noise == pytest.approx(np.std([0.1, 0.3, 0.1, 0.3], ddof=1) / 2)
    assert paired_change(before + 0.5, before) == pytest.approx((0.5, 0.0))  # the same shift everywhere: no noise
    assert paired_change(np.array([2.0]), np.array([1.0])) == (1.0, 0.0)


def test_the_best_trained_epoch_is_kept_unless_worse_than_the_input_beyond_the_noise() -> None:
    from pipeline.training.validation import EpochCheck, chosen_epoch

    def check(epoch: int, objective: float, change: float = 0.0, noise: float = 0.0) -> EpochCheck:
        return EpochCheck(epoch, None, objective, objective, change, noise)

    start = check(0, 0.10)
    within = [start, check(1, 0.13, 0.03, 0.02), check(2, 0.12, 0.02, 0.02)]  # worse, but by less than 2 SE
    assert chosen_epoch(within) == 2  # the lowest objective among the trained epochs
    assert chosen_epoch([start, check(1, 0.09, -0.01, 0.01), check(2, 0.095, -0.005, 0.01)]) == 1
    beyond = [start, check(1, 0.20, 0.10, 0.02), check(2, 0.19, 0.09, 0.04)]  # epoch 2 best: 0.09 > 2 x 0.04
    assert chosen_epoch(beyond) == 0 and chosen_epoch(beyond, z=3.0) == 2
    assert chosen_epoch([start]) == 0
    assert check(1, 0.2, 0.05, 0.0).worse_than_input() and not check(1, 0.2, 0.0, 0.0).worse_than_input()


def test_validation_split_is_seeded_disjoint_and_never_empty() -> None:
    from pipeline.training.validation import validation_split

    fit, held = validation_split(1000, 0.1, 3)
    assert held.size == 100 and fit.size == 900 and np.union1d(fit, held).size == 1000
    assert np.array_equal(held, validation_split(1000, 0.1, 3)[1])
    assert not np.array_equal(held, validation_split(1000, 0.1, 4)[1])
    assert validation_split(5, 0.01, 0)[1].size == 1 and validation_split(5, 0.0, 0)[1].size == 0
    assert validation_split(1, 0.5, 0)[1].size == 0  # a single sample trains


@needs_torch
def test_cli_finetune_writes_the_model_and_its_report(pruned_demo, tmp_path: Path) -> None:
    _, candidate = pruned_demo
    pruned = tmp_path / "pruned.onnx"
    onnx.save(candidate.model, str(pruned))
    (tmp_path / "pruned.onnx.plan.json").write_text(candidate.plan.to_json())
    out = tmp_path / "ft.onnx"
    code = main(["-q", "finetune", str(pruned), "--reference", str(demo_model_path()), "--data", "mnist",
                 "--limit", "128", "--epochs", "1", "--feature-weight", "0.5", "-o", str(out)])
    assert code == 0
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["format"] == "diprune.finetune/1" and report["finetune"]["kept"]
    assert report["finetune"]["best_epoch"] == 1 and len(report["finetune"]["validation"]) == 2
    assert report["finetune"]["validation_samples"] == 13  # 10 % of the 128 samples
    assert report["finetune"]["feature_probes"]  # the plan beside the model was found and used
    assert _structure(onnx.load(str(out))) == _structure(candidate.model)


def test_cli_refuses_a_missing_reference_and_a_bad_epoch_count(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", str(demo_model_path()), "--data", "mnist", "-o", str(tmp_path / "o.onnx")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["prune", str(demo_model_path()), "--finetune-epochs", "-1", "-o", str(tmp_path / "o.onnx")])
    assert "--finetune-epochs" in capsys.readouterr().err
    code = main(["-q", "prune", str(demo_model_path()), "--data", "mnist",
                 "--finetune-epochs", "1", "--max-drop", "1", "--eval-data", "mnist", "-o", str(tmp_path / "o.onnx")])
    assert code == 1 and not (tmp_path / "o.onnx").exists()


def test_without_torch_the_commands_name_the_extra(tmp_path: Path) -> None:
    model, out = str(demo_model_path()), str(tmp_path / "o.onnx")
    commands = [["finetune", model, "--reference", model, "--data", "mnist", "-o", out],
                ["push", model, "--data", "mnist", "--target-macs", "0.5", "-o", out],
                ["prune", model, "--data", "mnist", "--target-macs", "0.5", "--finetune-epochs", "1", "-o", out]]
    code = ("import sys; sys.modules['torch'] = None; from pipeline.cli import main; "
            f"codes = [main(argv) for argv in {commands!r}]; print(codes)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.stdout.strip() == "[1, 1, 1]", result.stderr
    assert result.stderr.count("pip install 'diprune[torch]'") == 3 and "Traceback" not in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_config_finetune_epochs(tmp_path: Path) -> None:
    doc = {"model": "m.onnx", "data": {"calibration": "mnist", "evaluation": "mnist"},
           "prune": {"target_macs": 0.5, "finetune_epochs": 2}, "output": "out"}
    assert config_from_dict(doc, tmp_path).prune.finetune_epochs == 2
    with pytest.raises(UserInputError, match="finetune_epochs"):
        config_from_dict({**doc, "prune": {"target_macs": 0.5, "finetune_epochs": -1}}, tmp_path)
    with pytest.raises(UserInputError, match="finetune_epochs' trains on it"):
        config_from_dict({**doc, "data": {"evaluation": "mnist"},
                          "prune": {"methods": "l2", "recover": "none", "target_macs": 0.5, "finetune_epochs": 1}},
                         tmp_path)


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    factors = [learning_rate_factor(step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:])) and factors[-1] < 0.01


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"lr": 0.0}, {"ce_weight": -1.0}, {"temperature": 0.0},
                                    {"validation": 1.0}, {"validation": -0.1}, {"noise_z": -1.0}])
def test_options_refuse_nonsense(kwargs: dict) -> None:
    with pytest.raises(UserInputError):
        FinetuneOptions(**kwargs)


@needs_torch
@pytest.mark.slow
def test_run_config_finetunes_every_candidate_once(tmp_path: Path) -> None:
    import yaml

    bench = {"backend": "ort-cpu", "batch": [1], "warmup": 0.02, "duration": 0.05, "iterations": 2, "rounds": 1}
    doc = {"model": str(demo_model_path()),
           "data": {"calibration": {"path": "mnist", "limit": 128}, "evaluation": {"path": "mnist", "limit": 200}},
           "prune": {"methods": ["l2"], "target_macs": [0.5], "recover": "none", "finetune_epochs": 1},
           "bench": bench, "output": "out"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    assert main(["-q", "run", str(tmp_path / "job.yaml")]) == 0
    record = json.loads((tmp_path / "out/candidates/l2-macs0.5.onnx.report.json").read_text())["recovery"]
    assert record["finetune"]["options"]["epochs"] == 1 and record["finetune"]["kept"]
    assert main(["-q", "run", str(tmp_path / "job.yaml")]) == 0
    assert json.loads((tmp_path / "out/report.json").read_text())["cache"]["candidates_reused"] == 1


def _perturbed(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """The same graph with every Conv/Gemm/MatMul weight and bias scaled by 1 + 0.2 * noise: a different teacher."""
    rng = np.random.default_rng(seed)
    weights = {name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") for name in n.input[1:]}
    teacher = onnx.ModelProto()
    teacher.CopyFrom(model)
    for i, tensor in enumerate(teacher.graph.initializer):
        if tensor.name in weights:
            value = numpy_helper.to_array(tensor)
            noisy = value * (1 + 0.2 * rng.standard_normal(value.shape)).astype(np.float32)
            teacher.graph.initializer[i].CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    return teacher


def _batch_free(model: onnx.ModelProto) -> onnx.ModelProto:
    """The motif with a symbolic batch dimension (the motifs fix it to 1; finetune checks on 16 samples)."""
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def _interface(model: onnx.ModelProto) -> tuple:
    """Structure plus what the graph promises its users: opsets, IR version, value infos, metadata."""
    graph = model.graph
    return (_structure(model), tuple(o.SerializeToString() for o in model.opset_import), model.ir_version,
            tuple(v.SerializeToString(deterministic=True) for v in graph.value_info),
            tuple((p.key, p.value) for p in model.metadata_props), graph.name)


@needs_torch
@pytest.mark.parametrize("name", sorted(set(MOTIFS) - {"channel_shuffle"}))  # its Reshape fixes the batch to 1
def test_finetune_on_every_motif_trains_values_and_never_the_structure(name: str) -> None:
    student = _batch_free(MOTIFS[name]()[0])
    rng = np.random.default_rng(5)
    data = from_iterable([(rng.standard_normal((48, *INPUT_SHAPE[1:])).astype(np.float32), None)])
    model, record = finetune(student, _perturbed(student, 6), data,
                             FinetuneOptions(epochs=2, batch_size=8, validation=0.0))  # the last epoch, measured on the data
    assert record.round_trip_error <= 1e-5
    assert record.kept and record.objective_after < record.objective_before  # it did learn something
    assert _interface(model) == _interface(student)
    onnx.checker.check_model(model, full_check=True)
    assert any(not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
               for a, b in zip(model.graph.initializer, student.graph.initializer, strict=True))


@needs_torch
def test_prune_with_finetune_epochs_writes_the_same_graph_as_without(tmp_path: Path) -> None:
    common = ["-q", "prune", str(demo_model_path()), "--data", "mnist", "--limit", "192", "--method", "l2",
              "--recover", "none", "--target-macs", "0.5"]
    plain, tuned = tmp_path / "plain.onnx", tmp_path / "tuned.onnx"
    assert main([*common, "-o", str(plain)]) == 0
    assert main([*common, "--finetune-epochs", "1", "-o", str(tuned)]) == 0
    before, after = onnx.load(str(plain)), onnx.load(str(tuned))
    assert _interface(after) == _interface(before)  # the finetune changed values only
    assert before.SerializeToString() != after.SerializeToString()
    record = json.loads(Path(f"{tuned}.report.json").read_text())["recovery"]["finetune"]
    assert record["kept"] and record["options"]["epochs"] == 1 and record["round_trip_error"] <= 1e-5
