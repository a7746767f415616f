"""The CLI keeps its promises (issue 11, item 4): every case a new user broke, run through ``main``, real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from graph_ops.io import sha256_file
from pipeline.cli import build_parser, main
from pipeline.data.datasets import mnist_path
from pipeline.prune.demo import demo_model_path
from tests.graphs import tiny_classifier


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A copy of the shipped MNIST CNN (input 'input' 1x28x28, 10 classes)."""
    path = tmp_path / "model.onnx"
    shutil.copy(demo_model_path(), path)
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return Path(tiny_classifier(str(tmp_path / "tiny.onnx"), in_channels=3, widths=(64, 64), classes=10))


def _error(argv: list[str], capsys: pytest.CaptureFixture[str], code: int = 1) -> str:
    """Run a failing command: the exit code, no traceback, exactly one 'diprune: error:' line (returned)."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("diprune: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def _mnist_arrays(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    with np.load(mnist_path()) as data:
        return data["x"][8000:8000 + n], data["y"][8000:8000 + n]


# ------------------------------------------------------------------------------------------------ no tracebacks


@pytest.mark.parametrize("kind", ["truncated-zip", "not-a-zip"])
@pytest.mark.parametrize("command", ["calibrate", "eval", "bench"])
def test_corrupt_npz_is_one_error_line(kind: str, command: str, model: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(mnist_path().read_bytes()[:4000] if kind == "truncated-zip" else b"\x80\x04 not numpy" * 50)
    extra = {"calibrate": ["-o", str(tmp_path / "s.npz")], "eval": [], "bench": ["--duration", "0"]}[command]
    line = _error(["-q", command, str(model), "--data", str(bad), *extra], capsys)
    assert "bad.npz is not a readable .npz file" in line
    assert not (tmp_path / "s.npz").exists()


def test_eval_reference_with_other_input_names(model: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    proto = onnx.load(str(model))
    proto.graph.input[0].name = "image"
    for node in proto.graph.node:
        node.input[:] = ["image" if name == "input" else name for name in node.input]
    renamed = tmp_path / "renamed.onnx"
    onnx.save(proto, str(renamed))
    line = _error(["-q", "eval", str(model), "--data", "mnist", "--limit", "50", "--reference", str(renamed)], capsys)
    assert "'image'" in line and "'input'" in line


def test_demo_work_pointing_at_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "a-file"
    target.write_text("keep me")
    line = _error(["-q", "demo", "--work", str(target)], capsys)
    assert "is a file" in line
    assert target.read_text() == "keep me"


# ------------------------------------------------------------------------------------- outputs checked first


def _outputs(where: str, tmp_path: Path) -> Path:
    if where == "directory":
        (tmp_path / "taken").mkdir()
        return tmp_path / "taken"
    return Path("/proc/diprune-no-such-dir/out")  # a directory nobody (root included) can create files in


@pytest.mark.parametrize("where", ["directory", "unwritable"])
@pytest.mark.parametrize("command", ["prune", "calibrate", "bench"])
def test_unwritable_output_is_found_before_the_work(command: str, where: str, model: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = str(_outputs(where, tmp_path))
    argv = {
        "prune": ["prune", str(model), "--data", "mnist", "--limit", "64", "--target-macs", "0.5", "-o", out],
        "calibrate": ["calibrate", str(model), "--data", "mnist", "--limit", "64", "-o", out],
        "bench": ["bench", str(model), "--warmup", "0", "--duration", "0.01", "--iterations", "1", "--json", out],
    }[command]
    assert main(argv) == 1  # not quiet: a progress bar or a table would show that work was done
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "sample/s" not in captured.err and "Traceback" not in captured.err
    assert captured.err.startswith("diprune: error:")


def test_nothing_partial_when_the_report_cannot_be_written(model: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.onnx"
    Path(f"{out}.report.json").mkdir()
    line = _error(["-q", "prune", str(model), "--data", "mnist", "--limit", "64", "--target-macs", "0.5", "-o",
                   str(out)], capsys)
    assert "report.json" in line
    assert not out.exists() and not Path(f"{out}.plan.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files either


# ------------------------------------------------------------------------------------------- refused settings


def test_protect_with_an_unknown_id_is_refused(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scores = tmp_path / "s.json"
    assert main(["-q", "score", "--model", str(tiny), "--method", "l2", "-o", str(scores)]) == 0
    line = _error(["-q", "plan", str(scores), "--target-macs", "0.5", "--protect", "conv_typo", "-o",
                   str(tmp_path / "p.json")], capsys)
    assert "conv_typo" in line and "diprune inspect" in line
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("argv", [
    ["bench", "m.onnx", "--threads", "0"], ["bench", "m.onnx", "--threads", "-2"],
    ["bench", "m.onnx", "--duration", "-1"], ["bench", "m.onnx", "--warmup", "-0.5"],
    ["plan", "s.json", "--target-macs", "0.5", "--min-channels", "-4", "-o", "p.json"],
    ["prune", "m.onnx", "--target-macs", "0.5", "--round-to", "0", "-o", "o.onnx"],
    ["calibrate", "m.onnx", "--data", "mnist", "--limit", "0", "-o", "s.npz"],
], ids=["threads-0", "threads-neg", "duration-neg", "warmup-neg", "min-channels-neg", "round-to-0", "limit-0"])
def test_nonsense_numbers_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(argv, capsys)
    option = next(a for a in argv if a.startswith("--") and a not in ("--target-macs", "--data"))
    assert f"argument {option}" in err


# --------------------------------------------------------------------------------------- budget not reached


@pytest.mark.parametrize(("extra", "cause"), [
    (["--round-to", "128"], "too narrow to prune"),
    ([], "protected by default (first layer"),
], ids=["round-to-larger-than-groups", "groups-protected-by-default"])
@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_budget_not_reached_says_what_blocked_it_once(extra: list[str], cause: str, quiet: bool, model: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not extra:  # two groups: the first layer and the classifier input, nothing else
        model = Path(tiny_classifier(str(tmp_path / "m.onnx"), in_channels=3, widths=(8, 16), classes=10))
    out = tmp_path / "o.onnx"
    argv = ["prune", str(model), "--method", "l2", "--recover", "none", "--target-macs", "0.5", *extra,
            "-o", str(out)]
    assert main(["-q", *argv] if quiet else argv) == 0
    captured = capsys.readouterr()
    assert "budget NOT reached" in captured.out  # the result line says it, -q or not
    warnings = [line for line in captured.err.splitlines() if "budget not reached" in line]
    assert len(warnings) == (0 if quiet else 1)
    note = json.loads(Path(f"{out}.report.json").read_text())["notes"][0]
    assert cause in note and "every prunable group is at its minimum width" not in note
    if not quiet:
        assert cause in warnings[0]


# ------------------------------------------------------------------------------------------------------ data


def test_eval_on_unlabelled_data_says_so(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, _ = _mnist_arrays(64)
    data = tmp_path / "unlabelled.npz"
    np.savez(data, x=x)
    line = _error(["-q", "eval", str(model), "--data", str(data)], capsys)
    assert "no labels" in line and "--label-key" in line and "--reference" in line
    assert main(["eval", str(model), "--data", str(data), "--reference", str(model), "--mean", "0.1307", "--std",
                 "0.3081"]) == 0
    captured = capsys.readouterr()
    assert "no labels" in captured.err
    result = json.loads(captured.out)
    assert result["top1"] is None and result["agreement"] == 1.0


def test_std_zero_is_blamed_on_the_setting(model: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _usage_error(["-q", "calibrate", str(model), "--data", "mnist", "--std", "0", "-o", str(tmp_path / "s.npz")],
                       capsys)  # a nonsense number: a usage error (exit 2), issue 25
    assert "argument --std: 0 is not a number > 0" in err


def test_npz_with_other_array_names_via_input_and_label_keys(model: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _mnist_arrays(200)
    data = tmp_path / "digits.npz"
    np.savez(data, images=x, labels=y, ids=np.arange(len(y)), y=y)
    line = _error(["-q", "eval", str(model), "--data", str(data)], capsys)  # three candidate inputs: which one?
    assert "--input-key" in line and "input_map=" not in line.split("Python:")[0]
    assert main(["-q", "eval", str(model), "--data", str(data), "--input-key", "images", "--label-key", "labels",
                 "--mean", "0.1307", "--std", "0.3081"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] > 0.9


def test_split_hint_names_the_cli_option(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _mnist_arrays(100)
    data = tmp_path / "small.npz"
    np.savez(data, x=x, y=y)
    line = _error(["-q", "calibrate", str(model), "--data", str(data), "--split", "train", "-o",
                   str(tmp_path / "s.npz")], capsys)
    assert "--split all" in line


# ---------------------------------------------------------------------------------------------- verbosity, inspect


@pytest.mark.parametrize(("argv", "verbose", "quiet"), [
    (["-q", "inspect", "m.onnx"], 0, True), (["inspect", "m.onnx", "-q"], 0, True),
    (["inspect", "m.onnx", "-vv"], 2, False), (["-v", "inspect", "m.onnx"], 1, False),
    (["prune", "m.onnx", "-o", "o.onnx", "--quiet"], 0, True),
], ids=["q-before", "q-after", "vv-after", "v-before", "quiet-after-options"])
def test_verbosity_before_or_after_the_subcommand(argv: list[str], verbose: int, quiet: bool) -> None:
    args = build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


def test_quiet_after_the_subcommand_silences_progress(model: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(model), "--data", "mnist", "--limit", "64", "-o", str(tmp_path / "s.npz"),
                 "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_inspect_status_column_marks_protected_groups(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "inspect", str(model)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("group ")]
    status = [line.split("\tstatus ")[1].split("\t")[0] for line in rows]
    assert "frozen -" not in "\n".join(rows)
    assert sum(s.startswith("protected (first layer") for s in status) == 1
    assert sum(s.startswith("protected (classifier input") for s in status) == 1
    assert status.count("prunable") == 4
    assert all(s.startswith("frozen (") for s in status if not s.startswith(("protected", "prunable")))
    assert main(["-q", "inspect", str(model), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert sorted(g["status"] for g in groups) == sorted(s.split(" ")[0] for s in status)
    assert {g["protected"] for g in groups} == {None, "first layer", "classifier input"}


def test_inputs_are_never_modified(model: Path, tmp_path: Path) -> None:
    before = sha256_file(model)
    main(["-q", "prune", str(model), "--data", "mnist", "--limit", "64", "--target-macs", "0.5", "--recover", "none",
          "-o", str(tmp_path / "o.onnx")])
    assert sha256_file(model) == before


def test_prune_ends_lifts_the_default_protection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = Path(tiny_classifier(str(tmp_path / "m.onnx"), in_channels=3, widths=(8, 16), classes=10))
    out = tmp_path / "o.onnx"
    assert main(["-q", "prune", str(model), "--method", "l2", "--recover", "none", "--target-macs", "0.9",
                 "--prune-ends", "-o", str(out)]) == 0
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["macs_fraction"] <= 0.9
    assert not [n for n in report["notes"] if "protect" in n or "not reached" in n], report["notes"]
    printed = capsys.readouterr().out
    assert "budget NOT reached" not in printed
    assert f"({report['macs_fraction']:.3f}, target 0.9)" in printed  # the achieved value next to the target
