"""Latency models from the board: ``latency variants`` / ``latency fit``, trtexec and onnxruntime profile reading,
and ``--latency-model`` planning, on profiles of a known synthetic cost (tests/board_profiles.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.deployment.device_profiles import (
    _Names,
    fit_board_profiles,
    load_latency_model,
    read_manifest,
    read_trt_layer_info,
    read_trt_profile,
)
from pipeline.deployment.latency_build import model_ladders
from pipeline.deployment.latency_fit import _Graph
from pipeline.deployment.latency_model import LatencyModel
from pipeline.errors import UserInputError
from pipeline.job.config import config_from_dict
from pipeline.model.prepare import PreparedModel, prepare
from pipeline.prune.demo import demo_model_path
from pipeline.selection.plan import PruningPlan
from tests.board_profiles import true_ms, write_trtexec_profiles

COSTLY = ("/stem/stem.1/stem.1.0/Conv", "/block/body/body.0/body.0.0/Conv", "/block/body/body.1/body.1.0/Conv",
          "/mid/mid.1/mid.1.0/Conv", "/mid/mid.2/mid.2.0/Conv")
"""The layers whose latency is proportional to their MACs in the synthetic board (every other layer: fixed)."""
COST = {"ms_per_mmac": 0.01, "fixed_ms": 0.002, "reformat_ms": 0.003}


@pytest.fixture(scope="module")
def prepared() -> PreparedModel:
    return prepare(demo_model_path())


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory, prepared: PreparedModel) -> Path:
    """A variants folder of the demo CNN with synthetic trtexec profiles, as copied back from the board."""
    folder = tmp_path_factory.mktemp("board") / "variants"
    assert main(["-q", "latency", "variants", str(demo_model_path()), "-o", str(folder), "--variants", "10"]) == 0
    write_trtexec_profiles(folder, prepared, COSTLY, **COST)
    return folder


@pytest.fixture(scope="module")
def fitted(board: Path) -> Path:
    assert main(["-q", "latency", "fit", str(board), "-o", str(board / "board.latency.json")]) == 0
    return board / "board.latency.json"


# ----------------------------------------------------------------------------------------------- reading


def test_trtexec_profile_format_is_read_as_trtexec_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('[\n  { "count" : 200 }\n, { "name" : "conv1 + relu1", "timeMs" : 20.0, "averageMs" : 0.1, '
                    '"medianMs" : 0.09, "percentage" : 80.0 }\n, { "name" : "fc", "timeMs" : 5.0, "averageMs" : '
                    '0.025, "percentage" : 20.0 }\n, { "name" : "old", "timeMs" : 2.0, "percentage" : 1.0 }\n]\n')
    assert read_trt_profile(path) == [("conv1 + relu1", pytest.approx(90.0)), ("fc", pytest.approx(25.0)),
                                      ("old", pytest.approx(10.0))]  # median, else average, else total / count
    path.write_text('[{"count": 1}, {"name": "a", "timeMs":')
    with pytest.raises(UserInputError, match="not valid JSON"):
        read_trt_profile(path)
    path.write_text('{"Layers": []}')
    with pytest.raises(UserInputError, match="JSON list"):
        read_trt_profile(path)


def test_layer_info_metadata_lists_the_onnx_nodes_of_each_layer(tmp_path: Path) -> None:
    path = tmp_path / "layers.json"
    path.write_text(json.dumps({"Layers": [
        {"Name": "fused", "Metadata": "[ONNX Layer: /a/Conv]\x1f[ONNX Layer: /a/Relu | f (Func)]"},
        {"Name": "bare"}, "plain-name-only"], "Bindings": ["x"]}))
    assert read_trt_layer_info(path) == {"fused": ("/a/Conv", "/a/Relu")}


def test_trt_layer_names_map_back_to_onnx_nodes(prepared: PreparedModel) -> None:
    names = _Names.of(_Graph.of(prepared))
    conv, relu = "/stem/stem.1/stem.1.0/Conv", "/stem/stem.1/stem.1.2/Relu"
    assert names.layer(f"{conv} + {relu}", {}) == ((conv, relu), "")
    assert names.layer(f"PWN({relu}_clone_0, {conv})", {}) == ((relu, conv), "")
    assert names.layer(f"Reformatting CopyNode for Input Tensor 0 to {conv} + {relu}", {}) == ((conv, relu),
                                                                                              "reformat:")
    nodes, _ = names.layer("{ForeignNode[/mid/mid.1/mid.1.0/Conv.../mid/mid.3/MaxPool]}", {})
    assert nodes[0] == "/mid/mid.1/mid.1.0/Conv" and nodes[-1] == "/mid/mid.3/MaxPool" and len(nodes) == 5
    assert names.layer("__myl_Reshape_0", {}) == ((), "")
    assert names.layer("__myl_Reshape_0", {"__myl_Reshape_0": ("/head/head.0/Flatten",)}) == (
        ("/head/head.0/Flatten",), "")
    graph = names.graph
    assert graph.identify_nodes((conv, relu)).kind == "term"
    two = graph.identify_nodes(("/mid/mid.1/mid.1.0/Conv", "/mid/mid.2/mid.2.0/Conv"))
    assert two.kind == "terms" and sum(share for *_, share in two.parts) == pytest.approx(1.0)
    assert graph.identify_nodes(("/stem/stem.2/MaxPool",)).kind == "channel"
    assert graph.identify_nodes(()).kind == "fixed"


# ----------------------------------------------------------------------------------------------- variants


def test_variants_folder_has_models_manifest_and_one_script_line_per_variant(board: Path,
                                                                          prepared: PreparedModel) -> None:
    manifest = read_manifest(board)
    variants = manifest["variants"]
    assert [v["role"] for v in variants] == ["fit"] * 11 + ["validation"] * 3
    ladders = model_ladders(prepared.index, 8, 8)
    for v in variants[1:]:
        assert all(v["widths"][g] in ladders[g] for g in ladders)
        assert (board / v["file"]).is_file()
    trt = [ln for ln in (board / "run_trtexec.sh").read_text().splitlines() if ln.startswith("trtexec")]
    ort = [ln for ln in (board / "run_onnxruntime.sh").read_text().splitlines() if ln.startswith("python3")]
    assert len(trt) == len(ort) == len(variants)
    for flag in ("--exportProfile=profiles/variant_003.trt.profile.json", "--separateProfileRun",
                 "--profilingVerbosity=detailed", "--noDataTransfers", "--useCudaGraph", "--useSpinWait",
                 "--exportLayerInfo=profiles/variant_003.trt.layers.json", "--shapes=input:1x1x28x28"):
        assert flag in trt[3]
    assert "--fp16" not in trt[3] and "TensorrtExecutionProvider" in ort[0]
    assert (board / "profile_onnxruntime.py").is_file()


# ----------------------------------------------------------------------------------------------- fitting


def test_fit_recovers_the_synthetic_cost_within_10_percent(fitted: Path, prepared: PreparedModel) -> None:
    model = LatencyModel.from_json(fitted.read_text())
    assert model.key["source"] == "trtexec profiles" and model.key["device"] == "NVIDIA RTX 6000 Ada Generation"
    assert model.key["whole_model"] == "calibrated"
    ids = {k.id for k in model.kernels}
    assert set(COSTLY) <= ids and any(i.startswith("reformat:") for i in ids)
    assert all(abs(e) <= 0.10 for e in model.errors()) and len(model.errors()) == 3
    ladders = model_ladders(prepared.index, 8, 8)
    rng = np.random.default_rng(7)
    full = true_ms(prepared, {}, COSTLY, **COST) + 0.02
    assert model.predict_ms() == pytest.approx(full, rel=0.02)
    for _ in range(20):  # fresh widths, none of the profiled ones
        widths = {g: int(rng.choice(ladder)) for g, ladder in ladders.items()}
        truth = true_ms(prepared, widths, COSTLY, **COST) + 0.02
        assert model.predict_ms(widths) == pytest.approx(truth, rel=0.10)


def test_fit_refuses_folders_it_cannot_fit(tmp_path: Path, board: Path, prepared: PreparedModel) -> None:
    with pytest.raises(UserInputError, match=r"variants\.json"):
        fit_board_profiles(tmp_path)
    bare = tmp_path / "bare"
    shutil.copytree(board, bare, ignore=shutil.ignore_patterns("profiles"))
    with pytest.raises(UserInputError, match="no profile of the full model"):
        fit_board_profiles(bare)
    with pytest.raises(UserInputError, match="not found"):
        fit_board_profiles(bare, source="onnxruntime")
    sparse = tmp_path / "sparse"
    shutil.copytree(bare, sparse)
    write_trtexec_profiles(sparse, prepared, COSTLY, skip=[f"variant_{i:03d}" for i in range(3, 11)])
    with pytest.raises(UserInputError, match="at least 5"):
        fit_board_profiles(sparse)


def test_cli_fit_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["latency", "fit", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diprune: error:") and "Traceback" not in err


# ----------------------------------------------------------------------------------------------- planning


def test_prune_with_the_board_model_lands_within_10_percent_of_the_target(tmp_path: Path, fitted: Path,
                                                                         prepared: PreparedModel) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(demo_model_path(), model)
    out = tmp_path / "pruned.onnx"
    code = main(["-q", "prune", str(model), "--method", "l2", "--recover", "none", "--backend", "tensorrt",
                 "--target-latency", "0.5", "--latency-model", str(fitted), "--latency-cache", "", "-o", str(out)])
    assert code == 0
    plan = PruningPlan.load(f"{out}.plan.json")
    record = plan.meta["latency"]
    assert record["closed_loop"] is False and record["measured_ratio"] is None
    assert any("not timed here" in n for n in plan.meta["notes"])
    widths = {gid: len(keep) for gid, keep in plan.keep.items()}
    truth = (true_ms(prepared, widths, COSTLY, **COST) + 0.02) / (true_ms(prepared, {}, COSTLY, **COST) + 0.02)
    assert truth == pytest.approx(0.5, rel=0.10)
    assert record["predicted_ratio"] == pytest.approx(truth, rel=0.05)


def test_plan_command_takes_the_latency_model_too(tmp_path: Path, fitted: Path) -> None:
    scores = tmp_path / "scores.json"
    assert main(["-q", "score", "--model", str(demo_model_path()), "--method", "l2", "-o", str(scores)]) == 0
    out = tmp_path / "plan.json"
    assert main(["-q", "plan", str(scores), "--target-latency", "0.6", "--latency-model", str(fitted),
                 "--backend", "tensorrt", "-o", str(out)]) == 0
    assert PruningPlan.load(out).meta["latency"]["latency_model"] == str(fitted)


def test_latency_model_without_a_latency_target_is_refused(tmp_path: Path, fitted: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", str(demo_model_path()), "--method", "l2", "--recover", "none", "--target-macs", "0.5",
                 "--latency-model", str(fitted), "-o", str(tmp_path / "p.onnx")]) == 1
    assert "add --target-latency" in capsys.readouterr().err


def test_a_latency_model_of_another_model_is_refused(fitted: Path) -> None:
    other = prepare(demo_model_path(), {"input": (2, 1, 28, 28)})
    with pytest.raises(UserInputError, match="another model"):
        load_latency_model(fitted, other)
    with pytest.raises(UserInputError, match="not found"):
        load_latency_model(fitted.with_name("missing.json"), other)


def test_run_config_takes_a_latency_model(tmp_path: Path) -> None:
    doc = {"model": "m.onnx", "data": {"calibration": "mnist", "evaluation": "mnist"},
           "prune": {"target_latency": [0.5], "latency_model": "board/latency.json"}, "output": "out"}
    config = config_from_dict(doc, tmp_path)
    assert config.prune.latency_model == tmp_path / "board" / "latency.json"
    with pytest.raises(UserInputError, match="latency_model"):
        config_from_dict({**doc, "prune": {"target_macs": [0.5], "latency_model": "x.json"}}, tmp_path)


@pytest.mark.slow  # profiles 9 variants with onnxruntime here (a few seconds)
def test_fit_reads_onnxruntime_profiles_made_here(tmp_path: Path) -> None:
    """The board script run here on CPU: real onnxruntime profiles (names, fused and NCHWc kernels, reorders), their
    kernel durations replaced by a known cost (weight elements of each Conv / Gemm kernel, channels in blocks), fit
    within 10 %."""
    from pipeline.deployment.latency_model import LatencyTarget, block_size
    from pipeline.deployment.ort_profile_script import main as profile_main
    from tests.board_profiles import synthetic_ort_durations

    folder = tmp_path / "variants"
    assert main(["-q", "latency", "variants", str(demo_model_path()), "-o", str(folder), "--variants", "5",
                 "--backend", "ort-cpu"]) == 0
    block = block_size(LatencyTarget())
    truth = {}
    for variant in read_manifest(folder)["variants"]:
        out = folder / "profiles" / f"{variant['name']}.ort.json"
        assert profile_main([str(folder / variant["file"]), "--threads", "1", "--warmup", "1", "--runs", "3",
                             "-o", str(out)]) == 0
        timing = json.loads(out.with_name(f"{variant['name']}.ort.timing.json").read_text())
        assert timing["providers"] == ["CPUExecutionProvider"] and timing["median_ms"] > 0
        events, truth[variant["name"]] = synthetic_ort_durations(json.loads(out.read_text()), block=block)
        out.write_text(json.dumps(events))
        out.with_name(f"{variant['name']}.ort.timing.json").unlink()  # whole model = the kernels' sum
    model = fit_board_profiles(folder, block=block)
    assert model.key["source"] == "onnxruntime profiles" and model.key["whole_model"] == "sum of layer medians"
    conv_ids = {k.id for k in model.kernels if k.kind == "term"}
    assert {"/stem/stem.0/stem.0.0/Conv", "/head/head.3/Gemm"} <= conv_ids
    measured = [truth[name] / truth["variant_000"] for name in model.validation["variants"]]
    assert model.validation["measured_ratio"] == pytest.approx(measured, rel=1e-3)
    assert all(abs(e) <= 0.10 for e in model.errors()), model.validation
