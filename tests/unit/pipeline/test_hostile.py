"""Issue 25: nothing lost, nothing silently wrong. Every case of the issue through ``main`` (real files, tiny inputs):
inputs never overwritten, bad data and NaN refused, no hangs, one clear line per mistake, the CLI speaking one
language. The cases that need real processes (SIGTERM, two concurrent runs) are in ``test_hostile_processes.py``."""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from graph_ops.io import sha256_file
from pipeline.cli import build_parser, main
from pipeline.data.datasets import mnist_path
from pipeline.prune.demo import demo_model_path
from tests.unit.pipeline.test_cli_promises import _error, _usage_error


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    shutil.copy(demo_model_path(), path)
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """200 held-out digits, uint8, labels y (an uncompressed npz: its arrays are memory-mapped)."""
    with np.load(mnist_path()) as digits:
        x, y = digits["x"][8000:8200], digits["y"][8000:8200]
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    return path


def _usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """A usage error: exit 2 (argparse), no traceback, its error line returned."""
    err = _usage_error(argv, capsys)
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _shas(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------- inputs never overwritten


def _prune(model: Path, data: Path, out: Path | str, *extra: str) -> list[str]:
    return ["-q", "prune", str(model), "--data", str(data), "--method", "l2", "--recover", "none",
            "--target-macs", "0.5", "--limit", "64", "-o", str(out), *extra]


@pytest.mark.parametrize("case", ["prune-data", "prune-eval-data", "calibrate-data", "bench-json-data",
                                  "score-stats", "plan-scores", "plan-model", "plan-recorded-model", "apply-plan",
                                  "calibrate-task-map", "finetune-reference", "finetune-default-plan",
                                  "push-pushed-model", "export-factory-file", "prune-mnist", "prune-inside-images"])
def test_output_equal_to_any_input_is_refused(case: str, model: Path, data: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Every input of every subcommand, not only the model (today's check compared the model alone)."""
    stats, plan, task_map = (tmp_path / n for n in ("s.npz", "p.json", "t.json"))
    stats.write_bytes(b"{}")
    plan.write_bytes(b"{}")
    task_map.write_text('{"odd": [1, 3], "even": [0, 2]}')
    assert main(["-q", "score", "--model", str(model), "--method", "l2", "-o", str(tmp_path / "sc.json")]) == 0
    scores = tmp_path / "sc.json"
    factory = tmp_path / "net.py"
    factory.write_text("def net():\n    pass\n")
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    argv = {
        "prune-data": _prune(model, data, data),
        "prune-eval-data": _prune(model, data, tmp_path / "e.npz", "--eval-data", str(tmp_path / "e.npz")),
        "calibrate-data": ["-q", "calibrate", str(model), "--data", str(data), "-o", str(data)],
        "bench-json-data": ["-q", "bench", str(model), "--data", str(data), "--json", str(data)],
        "score-stats": ["-q", "score", str(stats), "--model", str(model), "-o", str(stats)],
        "plan-scores": ["-q", "plan", str(scores), "--model", str(model), "--target-macs", "0.5", "-o", str(scores)],
        "plan-model": ["-q", "plan", str(scores), "--model", str(model), "--target-macs", "0.5", "-o", str(model)],
        "plan-recorded-model": ["-q", "plan", str(scores), "--target-macs", "0.5", "-o", str(model)],
        "apply-plan": ["-q", "apply", str(model), str(plan), "-o", str(plan)],
        "calibrate-task-map": ["-q", "calibrate", str(model), "--data", str(data), "--task-map", str(task_map), "-o",
                               str(task_map)],
        "finetune-reference": ["-q", "finetune", str(model), "--reference", str(data), "--data", str(data), "-o",
                               str(data)],
        "finetune-default-plan": ["-q", "finetune", str(model), "--reference", str(model), "--data", str(data),
                                  "-o", f"{model}.plan.json"],
        "push-pushed-model": ["-q", "push", str(model), "--data", str(data), "--target-macs", "0.5", "-o",
                              str(tmp_path / "pp.onnx"), "--pushed", str(model)],
        "export-factory-file": ["-q", "export", f"{factory}:net", "-o", str(factory), "--input-shape", "1x3x8x8"],
        "prune-mnist": ["-q", "prune", str(model), "--data", "mnist", "--target-macs", "0.5", "-o", str(mnist_path())],
        "prune-inside-images": ["-q", "prune", str(model), "--data", str(tmp_path / "imgs"), "--target-macs", "0.5",
                                "-o", str(tmp_path / "imgs" / "a" / "x.png")],
    }[case]
    before = _shas(tmp_path)
    mnist = sha256_file(mnist_path())
    line = _error(argv, capsys)
    assert "is the input file" in line or "inside the input folder" in line, line
    assert _shas(tmp_path) == before and sha256_file(mnist_path()) == mnist


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_output_that_links_to_an_input_is_refused(link: str, model: Path, data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The same file through a symlink or a hard link (compared by resolved path and by inode)."""
    alias = tmp_path / "alias.npz"
    (os.symlink if link == "symlink" else os.link)(data, alias)
    before = sha256_file(data)
    line = _error(_prune(model, data, alias), capsys)
    assert "is the input file" in line
    assert sha256_file(data) == before and (alias.is_symlink() == (link == "symlink"))


@pytest.mark.parametrize("node", ["fifo", "devnull-link", "devnull-copy"])
def test_output_onto_a_device_or_fifo_is_refused(node: str, model: Path, data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "node.onnx"
    if node == "fifo":
        os.mkfifo(target)
    elif node == "devnull-link":
        os.symlink("/dev/null", target)
    else:
        try:
            os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null (needs root)
        except PermissionError:
            pytest.skip("mknod needs root here")
    line = _error(_prune(model, data, target), capsys)
    assert "not a regular file" in line
    mode = os.lstat(target).st_mode
    assert {"fifo": stat.S_ISFIFO, "devnull-link": stat.S_ISLNK, "devnull-copy": stat.S_ISCHR}[node](mode)
    assert not Path(f"{target}.plan.json").exists()


def _run_config(folder: Path, **changes: Any) -> Path:
    doc: dict[str, Any] = {
        "model": "m.onnx", "data": {"calibration": {"path": "d.npz", "limit": 32},
                                    "evaluation": {"path": "d.npz", "limit": 32}},
        "prune": {"methods": ["l2"], "target_macs": [0.5], "recover": "none"},
        "bench": {"batch": [1], "warmup": 0, "duration": 0.01, "iterations": 2, "rounds": 1},
        "output": "out",
    }
    for key, value in changes.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("where", ["out/best.onnx", "out/candidates/m.onnx", "out/cache/m.onnx", "out/report.json"])
def test_run_refuses_inputs_where_it_writes(where: str, model: Path, data: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``model: out/best.onnx, output: out``: today the input is deleted as a stale best (no candidate passes) or
    overwritten (one passes)."""
    inside = tmp_path / where
    inside.parent.mkdir(parents=True)
    shutil.copy(model, inside)
    config = _run_config(tmp_path, model=where, gates={"min_speedup": 100})  # no candidate could pass
    before = sha256_file(inside)
    line = _error(["-q", "run", str(config)], capsys)
    assert "lies where this run writes" in line and where.split("/", 1)[1] in line
    assert inside.is_file() and sha256_file(inside) == before
    assert not (tmp_path / "out" / "report.json").exists() or where == "out/report.json"


def test_run_refuses_an_output_folder_inside_an_image_folder(model: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Its plots (PNG files) would become images of the data."""
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        Image.new("L", (28, 28)).save(tmp_path / "imgs" / label / "x.png")
    spec = {"path": "imgs", "channel_order": "gray", "size": 28, "crop": 28, "split": "all"}
    config = _run_config(tmp_path, data={"calibration": spec, "evaluation": spec}, output="imgs/out")
    line = _error(["-q", "run", str(config)], capsys)
    assert "lies inside the input folder" in line
    assert not (tmp_path / "imgs" / "out").exists()


def test_run_with_its_data_beside_the_output_is_fine(model: Path, data: Path, tmp_path: Path) -> None:
    """Inputs in the output folder but not where the run writes are fine (config and data beside the results)."""
    (tmp_path / "out").mkdir()
    shutil.copy(data, tmp_path / "out" / "d.npz")
    config = _run_config(tmp_path, data={"calibration": {"path": "out/d.npz"}, "evaluation": {"path": "out/d.npz"}})
    assert main(["-q", "run", str(config)]) == 0
    assert sha256_file(tmp_path / "out" / "d.npz") == sha256_file(data)


# -------------------------------------------------------------------------------------------- silently wrong


def _flip_inside_member(path: Path, member: str) -> None:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.compress_size // 2] ^= 0x5A  # one byte in the middle of the pixels
    path.write_bytes(bytes(raw))


def test_npz_member_with_a_bad_crc_is_refused(model: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stored member is memory-mapped, which skips zipfile's CRC check: eval reported 47 % on data numpy refuses."""
    _flip_inside_member(data, "x.npy")
    line = _error(["-q", "eval", str(model), "--data", str(data), "--mean", "0.1307", "--std", "0.3081"], capsys)
    assert "'x.npy' is corrupt" in line and "CRC-32" in line


def _with_weights(model: Path, out: Path, change: Any) -> Path:
    proto = onnx.load(str(model))
    for i, init in enumerate(proto.graph.initializer):
        values = numpy_helper.to_array(init)
        if values.ndim == 4:  # the first conv weight
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(change(values.copy()), init.name))
            break
    onnx.save(proto, str(out))
    return out


@pytest.mark.parametrize("command", ["prune", "eval", "inspect", "calibrate"])
def test_nan_weights_are_refused_naming_the_initializer(command: str, model: Path, data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = _with_weights(model, tmp_path / "nan.onnx", lambda w: w * np.nan)
    name = next(i.name for i in onnx.load(str(bad)).graph.initializer if len(i.dims) == 4)
    argv = {"prune": _prune(bad, data, tmp_path / "p.onnx"),
            "eval": ["-q", "eval", str(bad), "--data", str(data)],
            "inspect": ["-q", "inspect", str(bad)],
            "calibrate": ["-q", "calibrate", str(bad), "--data", str(data), "-o", str(tmp_path / "s.npz")]}[command]
    line = _error(argv, capsys)
    assert "non-finite weights" in line and name in line and "NaN" in line
    assert not (tmp_path / "p.onnx").exists() and not (tmp_path / "s.npz").exists()


def test_non_finite_outputs_are_refused_in_eval_and_prune(model: Path, data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Finite but huge weights: the logits overflow to infinity. Today: top-5 = 1.0 from such logits."""
    proto = onnx.load(str(model))
    for i, init in enumerate(proto.graph.initializer):
        values = numpy_helper.to_array(init)
        if values.ndim == 2:  # a Gemm weight
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(values * np.float32(3e38), init.name))
    huge = tmp_path / "huge.onnx"
    onnx.save(proto, str(huge))
    line = _error(["-q", "eval", str(huge), "--data", str(data)], capsys)
    assert "NaN or infinite values" in line and "'logits'" in line
    line = _error(_prune(huge, data, tmp_path / "p.onnx", "--eval-data", str(data)), capsys)
    assert "NaN or infinite values" in line
    assert not (tmp_path / "p.onnx").exists()


@pytest.mark.parametrize("classes", ["", "3", "a,b", "3,3", "-1,2"])
def test_bad_task_classes_are_usage_errors(classes: str, model: Path, data: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``--task-classes ''`` pruned for all classes today."""
    line = _usage(["-q", "calibrate", str(model), "--data", str(data), "--task-classes", classes, "-o",
                   str(tmp_path / "s.npz")], capsys)
    assert "argument --task-classes" in line
    assert not (tmp_path / "s.npz").exists()


def test_eval_split_is_what_it_says(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``eval --split train`` was accepted and ignored (it evaluated the test split); the split and the reference's
    own top-1 are reported."""
    results = {}
    for flag, split in [("--split", "train"), ("--eval-split", "train"), ("--split", "test")]:
        assert main(["-q", "eval", str(model), "--data", "mnist", flag, split, "--limit", "300", "--reference",
                     str(model)]) == 0
        results[(flag, split)] = json.loads(capsys.readouterr().out)
    train = results[("--split", "train")]
    assert train["split"] == "train" and "[train]" in train["data"]
    assert train == results[("--eval-split", "train")]
    assert results[("--split", "test")]["split"] == "test" and results[("--split", "test")]["top1"] != train["top1"]
    assert train["reference"]["top1"] == train["top1"]  # the model is its own reference


@pytest.mark.parametrize(("section", "key", "value"), [
    ("gates", "min_speedup", float("nan")), ("gates", "max_top1_drop", float("inf")),
    ("bench", "duration", float("inf")), ("bench", "warmup", float("inf")), ("bench", "duration", 1e7),
    ("bench", "iterations", 10**12), ("prune", "max_drop", float("nan")), ("prune", "target_macs", float("nan")),
    ("data", "scale", float("inf")), ("data", "mean", [float("nan")]),
], ids=["min-speedup-nan", "top1-drop-inf", "duration-inf", "warmup-inf", "duration-huge", "iterations-huge",
        "max-drop-nan", "target-nan", "scale-inf", "mean-nan"])
def test_config_numbers_must_be_finite_and_in_range(section: str, key: str, value: Any, model: Path, data: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``gates.min_speedup: .nan`` failed every candidate; ``bench: {duration: .inf}`` never ended."""
    config = _run_config(tmp_path)
    doc = yaml.safe_load(config.read_text())
    doc.setdefault(section, {})[key] = value
    config.write_text(yaml.safe_dump(doc))
    line = _error(["-q", "run", str(config)], capsys)
    assert f"'{section}." in line and f"{key}'" in line  # the key is named (data options: of each dataset)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("drop", [0.01, 0.05])
def test_old_fraction_spelling_of_max_top1_drop_is_refused(drop: float, model: Path, data: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = _run_config(tmp_path, gates={"max_top1_drop": drop})
    line = _error(["-q", "run", str(config)], capsys)
    assert "accuracy points" in line and f"write {100 * drop:g}" in line


def test_max_top1_drop_gate_is_in_points(model: Path, data: Path, tmp_path: Path) -> None:
    """l2 at half the MACs without recovery loses tens of points: a 5-point gate fails it (as a fraction, 5 would
    have allowed a drop of 500 points and passed it)."""
    config = _run_config(tmp_path, gates={"max_top1_drop": 5}, data={"mean": 0.1307, "std": 0.3081})
    assert main(["-q", "run", str(config)]) == 3
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (candidate,) = report["candidates"]
    assert candidate["top1_drop"] > 0.05 and candidate["passed"]["max_top1_drop"] is False


def _cached(folder: Path, kind: str, suffix: str) -> Path:
    (path,) = [p for p in (folder / "out" / "cache").glob(f"{kind}-*{suffix}") if not p.name.endswith(".plan.json")]
    return path


def test_cache_entries_changed_or_partial_are_recomputed(model: Path, data: Path, tmp_path: Path) -> None:
    """A cached candidate whose weights changed is not reused (its digest is checked); cache entries that are valid
    JSON but miss keys are recomputed, not a traceback."""
    config = _run_config(tmp_path)
    assert main(["-q", "run", str(config)]) == 0
    first = json.loads((tmp_path / "out" / "report.json").read_text())["candidates"][0]
    cached = _cached(tmp_path, "candidate", ".onnx")
    _with_weights(cached, cached, lambda w: w + np.float32(1.0))  # a valid model, other weights
    for entry in (tmp_path / "out" / "cache").glob("eval-*.json"):
        entry.write_text('{"n": 32}')  # valid JSON, keys missing
    assert main(["-q", "run", str(config)]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["cache"]["candidates_computed"] == 1 and report["cache"]["evaluations_reused"] == 0
    assert report["candidates"][0]["sha256"] == first["sha256"]
    meta = json.loads(_cached(tmp_path, "candidate", ".json").read_text())
    meta.pop("method")
    _cached(tmp_path, "candidate", ".json").write_text(json.dumps(meta))
    assert main(["-q", "run", str(config)]) == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["cache"]["candidates_computed"] == 1


# ----------------------------------------------------------------------------------------------------- hangs


@pytest.mark.parametrize(("option", "value"), [("--duration", "inf"), ("--warmup", "inf"), ("--duration", "1e7"),
                                               ("--iterations", "1000000000000"), ("--rounds", "100000")])
def test_bench_settings_that_never_end_are_usage_errors(option: str, value: str, model: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage(["-q", "bench", str(model), option, value], capsys)
    assert f"argument {option}" in line


# ------------------------------------------------------------------------------------------------- tracebacks


def _relu_only(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("command", ["prune", "plan"])
def test_graph_without_conv_or_gemm(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    relu = _relu_only(tmp_path / "relu.onnx")
    if command == "prune":
        argv = ["-q", "prune", str(relu), "--method", "l2", "--recover", "none", "--target-macs", "0.5", "-o",
                str(tmp_path / "p.onnx")]
    else:
        assert main(["-q", "score", "--model", str(relu), "--method", "l2", "-o", str(tmp_path / "s.json")]) == 0
        argv = ["-q", "plan", str(tmp_path / "s.json"), "--target-params", "0.5", "-o", str(tmp_path / "p.json")]
    line = _error(argv, capsys)
    assert "no Conv, ConvTranspose, Gemm or MatMul" in line


@pytest.mark.parametrize("command", ["prune", "calibrate", "score"])
def test_output_name_over_255_bytes(command: str, model: Path, data: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / ("é" * 130 + ".onnx")  # 265 bytes
    argv = {"prune": _prune(model, data, out),
            "calibrate": ["-q", "calibrate", str(model), "--data", str(data), "-o", str(out)],
            "score": ["-q", "score", "--model", str(model), "--method", "l2", "-o", str(out)]}[command]
    line = _error(argv, capsys)
    assert "bytes long; file systems take at most 255" in line


def test_name_just_under_the_limit_still_writes_its_siblings_atomically(model: Path, data: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Temporary names are short whatever the output's length (a 255-byte name used to fail in mkstemp)."""
    out = tmp_path / ("a" * 250 + ".onnx")
    line = _error(_prune(model, data, out), capsys)  # its .report.json sibling is over 255 bytes
    assert "bytes long" in line
    out = tmp_path / ("a" * 238 + ".onnx")  # 243 bytes: OUT.report.json is 255
    assert main(_prune(model, data, out)) == 0
    assert Path(f"{out}.report.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".probe"))]


def test_decompression_bomb_image(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        Image.new("L", (64, 64)).save(tmp_path / "imgs" / label / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000: Pillow's bomb error
    line = _error(["-q", "eval", str(model), "--data", str(tmp_path / "imgs"), "--channel-order", "gray",
                   "--size", "28", "--crop", "28"], capsys)
    assert "cannot read image" in line and "decompression bomb" in line


@pytest.mark.parametrize(("option", "value"), [("--seed", "-1"), ("--workers", "0"), ("--max-drop", "nan"),
                                               ("--max-drop", "-1"), ("--scale", "0"), ("--scale", "nan"),
                                               ("--mean", "nan"), ("--std", "-1"), ("--max-top1-drop", "inf"),
                                               ("--limit", "0"), ("--target-macs", "nan"), ("--batch-size", "0")])
def test_nonsense_numbers_exit_2(option: str, value: str, model: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``--seed -1`` was a traceback; ``--max-drop nan`` exited 3, ``--scale 0`` / ``--workers 0`` exited 1."""
    line = _usage(["-q", "prune", str(model), "--data", "mnist", "--target-macs", "0.5", "-o",
                   str(tmp_path / "p.onnx"), option, value], capsys)
    assert f"argument {option}" in line


def test_unwritable_latency_cache_is_found_before_any_work(model: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Found after 28 s of work today."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for cache in (str(blocker / "cache"), str(blocker)):
        assert main(["prune", str(model), "--data", "mnist", "--limit", "64", "--target-latency", "0.8",
                     "--latency-cache", cache, "-o", str(tmp_path / "p.onnx")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("diprune: error: --latency-cache") and "sample/s" not in err
    assert not (tmp_path / "p.onnx").exists()


@pytest.mark.parametrize("kind", ["task-map", "scores", "plan", "config"])
def test_non_utf8_text_inputs(kind: str, model: Path, data: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"odd": [1], \xff\xfe}')
    argv = {"task-map": ["-q", "calibrate", str(model), "--data", str(data), "--task-map", str(bad), "-o",
                         str(tmp_path / "s.npz")],
            "scores": ["-q", "plan", str(bad), "--model", str(model), "--target-macs", "0.5", "-o",
                       str(tmp_path / "p.json")],
            "plan": ["-q", "apply", str(model), str(bad), "-o", str(tmp_path / "a.onnx")],
            "config": ["-q", "run", str(bad)]}[kind]
    line = _error(argv, capsys)
    assert "bad.json is not UTF-8 text (byte 0xff" in line


def _plan(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], **meta: Any) -> Path:
    assert main(["-q", "score", "--model", str(model), "--method", "l2", "-o", str(tmp_path / "s.json")]) == 0
    assert main(["-q", "plan", str(tmp_path / "s.json"), "--target-macs", "0.5", "-o", str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["meta"].update(meta)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    return tmp_path / "p.json"


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("input_shapes", {"input": "abc"}, "meta.input_shapes"), ("input_shapes", [1, 2], "meta.input_shapes"),
    ("input_shapes", {"input": [1, 0, 28, 28]}, "meta.input_shapes"), ("task", "x", "malformed task"),
    ("task", {"classes": ["a", 1]}, "malformed task"), ("task", {"groups": 3}, "malformed task"),
], ids=["shape-string", "shape-list", "shape-zero", "task-string", "task-class-string", "task-groups-int"])
def test_malformed_plan_metadata(field: str, value: Any, expected: str, model: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan(model, tmp_path, capsys, **{field: value})
    line = _error(["-q", "apply", str(model), str(plan), "-o", str(tmp_path / "a.onnx")], capsys)
    assert expected in line and "p.json" in line
    assert not (tmp_path / "a.onnx").exists()


# ---------------------------------------------------------------------------------------- one CLI language


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("diprune ")


def _subparsers() -> dict[str, Any]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_option_has_help_and_shows_its_default(command: str) -> None:
    sub = _subparsers()[command]
    text = sub.format_help()
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help line"
        default = action.default
        if action.option_strings and default not in (None, False, [], "==SUPPRESS==") and action.help != "==SUPPRESS==":
            shown = sub.formatter_class(prog="x")._get_help_string(action)
            assert "default" in shown, f"{command} {action.option_strings}: default {default!r} not shown"
    assert "(default: 64)" in _subparsers()["calibrate"].format_help() or command != "calibrate"
    assert text


@pytest.mark.parametrize("command", ["inspect", "bench"])
def test_input_shape_has_one_syntax(command: str, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``[NAME:]DIMS`` everywhere: a bare DIMS is the single input (export and push took it, others did not)."""
    extra = ["--json"] if command == "inspect" else ["--warmup", "0", "--duration", "0", "--iterations", "1",
                                                     "--rounds", "1"]
    outputs = []
    for shape in ("input:1x1x28x28", "1x1x28x28"):
        assert main(["-q", command, str(model), "--input-shape", shape, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    if command == "inspect":
        first, second = (json.loads(o) for o in outputs)
        assert first["input_shapes"] == second["input_shapes"] == {"input": [1, 1, 28, 28]}
    else:
        assert all("| m.onnx | 1 |" in o for o in outputs)
    line = _error(["-q", command, str(model), "--input-shape", "1x1x28x28", "--input-shape", "input:1x1x28x28",
                   *extra], capsys)
    assert "twice" in line


def test_export_takes_the_repeatable_syntax_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(["-q", "export", "torchvision:resnet18", "-o", str(tmp_path / "r.onnx"), "--input-shape",
                   "a:1x3x8x8", "--input-shape", "b:1x3x8x8"], capsys)
    assert "a torch export takes one example input" in line


def test_inspect_counts_prunable_and_protected_apart(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "inspect", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    statuses = [g["status"] for g in info["groups"]]
    assert info["prunable_groups"] == statuses.count("prunable")
    assert info["protected_groups"] == statuses.count("protected") > 0
    assert info["frozen_groups"] == statuses.count("frozen")
    assert main(["-q", "inspect", str(model)]) == 0
    assert (f"prunable {statuses.count('prunable')} protected {statuses.count('protected')} "
            f"frozen {statuses.count('frozen')}") in capsys.readouterr().out


def test_bench_flags_noise_dominated_timings(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No warm-up: the first call (session warm-up) dominates a few timed calls, a CV far above the bound."""
    out = tmp_path / "b.json"
    assert main(["-q", "bench", str(model), "--warmup", "0", "--duration", "0", "--iterations", "3", "--rounds",
                 "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    result = doc["results"][0]["latency"]
    noisy = result["cv"] > doc["noise"]["cv_bound"]
    assert doc["noise"]["cv_bound"] == 0.25
    assert bool(doc["noise"]["noisy"]) == noisy
    assert ("noise-dominated" in capsys.readouterr().out) == noisy


def test_image_folder_in_grayscale(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pillow is a core dependency; a one-channel model reads a folder with --channel-order gray, and gets the same
    accuracy as from the npz the images came from."""
    from PIL import Image

    with np.load(mnist_path()) as digits:
        x, y = digits["x"][8000:8060], digits["y"][8000:8060]
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        (tmp_path / "imgs" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "imgs" / str(label) / f"{i:03d}.png")
    folder_argv = ["-q", "eval", str(model), "--data", str(tmp_path / "imgs"), "--channel-order", "gray", "--size",
                   "28", "--crop", "28", "--mean", "0.1307", "--std", "0.3081", "--split", "all"]
    assert main(folder_argv) == 0
    from_folder = json.loads(capsys.readouterr().out)
    order = sorted(range(len(y)), key=lambda i: (str(y[i]), i))  # folders sort by class name, then file name
    np.savez(tmp_path / "same.npz", x=x[order], y=y[order])
    assert main(["-q", "eval", str(model), "--data", str(tmp_path / "same.npz"), "--mean", "0.1307", "--std",
                 "0.3081"]) == 0
    assert from_folder["top1"] == json.loads(capsys.readouterr().out)["top1"]
    line = _error([*folder_argv[:-6], "--mean", "0.5", "0.5", "0.5"], capsys)
    assert "gray images have 1 channel" in line.replace("L images", "gray images") or "1 channel" in line


@pytest.mark.parametrize("command", ["finetune", "push"])
def test_finetune_and_push_print_their_result_on_stdout(command: str, model: Path, data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch", reason="finetune and push need the [torch] extra")
    out = tmp_path / "o.onnx"
    if command == "finetune":
        argv = ["-q", "finetune", str(model), "--reference", str(model), "--data", str(data), "--limit", "32",
                "--epochs", "1", "-o", str(out)]
    else:
        argv = ["-q", "push", str(model), "--data", str(data), "--limit", "64", "--epochs", "1", "--target-macs",
                "0.5", "--recover", "none", "-o", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and str(out) in captured.out
    assert "wrote" not in captured.err


def test_pyproject_lists_every_package_and_pillow() -> None:
    from setuptools import find_namespace_packages

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    root = Path(__file__).resolve().parents[3]
    doc = tomllib.loads((root / "pyproject.toml").read_text())
    find = doc["tool"]["setuptools"]["packages"]["find"]
    assert find.get("namespaces") is True  # pipeline/assets has no __init__.py
    found = set(find_namespace_packages(where=str(root), include=find["include"]))
    folders = {".".join(p.relative_to(root).parts) for top in ("pipeline", "graph_ops")
               for p in [root / top, *(root / top).rglob("*")]
               if p.is_dir() and p.name != "__pycache__" and any(f.is_file() for f in p.iterdir())}
    assert folders <= found and "pipeline.assets" in found
    assert any(d.lower().startswith("pillow") for d in doc["project"]["dependencies"])


def _plot_doc() -> dict[str, Any]:
    """A run report (JSON form) with two candidates at the same point and a long group id, benchmarked at 1 and 8."""
    latency = [{"batch": 1, "median_ms": 1.0, "speedup": 1.0}, {"batch": 8, "median_ms": 6.0, "speedup": 1.0}]
    long_id = "/backbone/stage.3/block.2/conv_pw/Conv_output_0_with_a_very_long_name"

    def candidate(name: str, method: str, macs: float, top1: float) -> dict[str, Any]:
        return {"name": name, "method": method, "macs_fraction": macs, "top1": top1, "agreement": 1.0,
                "latency": [{"batch": 1, "median_ms": macs, "speedup": 1 / macs},
                            {"batch": 8, "median_ms": 6 * macs, "speedup": 1 / macs}],
                "pareto": {"macs": True, "latency": True},
                "groups": {long_id: {"size": 64, "kept": 32}, "g2": {"size": 16, "kept": 8}}}

    return {"original": {"top1": 0.99, "latency": latency}, "gates": {"max_top1_drop": 1}, "best": "di-macs0.5",
            "candidates": [candidate("di-macs0.5", "di", 0.5, 0.98), candidate("di-params0.9", "di", 0.5, 0.98),
                           candidate("l2-macs0.5", "l2", 0.5, 0.98), candidate("l2-macs0.25", "l2", 0.25, 0.9)]}


def test_plots_keep_every_candidate_visible_with_full_labels_and_every_batch() -> None:
    """Two candidates drawn on top of each other, group ids cut, only the first batch size: fixed."""
    pytest.importorskip("matplotlib", reason="plots need the [plots] extra (matplotlib)")
    from pipeline.job.plots import kept_width_figure, scatter_figure

    doc = _plot_doc()
    macs = scatter_figure(doc, "macs")
    (ax,) = macs.axes
    labels = " ".join(t.get_text() for t in ax.texts)
    assert all(c["name"] in labels for c in doc["candidates"])  # every candidate named, the three at one point too
    rings = [c.get_sizes()[0] for c in ax.collections if len(c.get_offsets()) == 1
             and tuple(c.get_offsets()[0]) == (0.5, 0.98) and c.get_facecolors().size == 0]
    assert len(set(rings)) >= 3  # three concentric rings (and the best's circle), none hides another
    assert ax.get_legend_handles_labels()[1].count("di") == 1  # one legend entry per method
    latency = scatter_figure(doc, "latency")
    assert [a.get_xlabel() for a in latency.axes] == ["median latency (ms), batch 1", "median latency (ms), batch 8"]
    widths = kept_width_figure(doc)
    assert [t.get_text() for t in widths.axes[0].get_yticklabels()] == list(doc["candidates"][0]["groups"])


def test_latency_model_build_shows_progress_unless_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    """31 s of silence today: the build now has a tqdm bar on stderr (LatencyBudget.progress = not -q)."""
    from pipeline.deployment.latency_build import build_latency_model
    from pipeline.deployment.latency_model import LatencyTarget
    from pipeline.model.prepare import prepare

    prepared = prepare(demo_model_path())
    quick = LatencyTarget(threads=1, variants=2, rounds=1, round_seconds=0.005)
    build_latency_model(prepared, quick, progress=True)
    assert "latency model" in capsys.readouterr().err
    build_latency_model(prepared, quick, progress=False)
    assert "latency model" not in capsys.readouterr().err
