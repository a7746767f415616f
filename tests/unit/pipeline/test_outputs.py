"""Output kinds and decoders: detection from shapes, CTC best path / collapse / forced alignment (against brute
force), map decisions, YOLO decoding with class-wise NMS."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.data.outputs import (
    DecodeOptions,
    box_iou,
    ctc_align,
    ctc_best_path,
    ctc_collapse,
    detect_output_kind,
    detections_as_boxes,
    map_classes,
    output_classes,
    pyramid_cells,
    yolo_decode,
)
from pipeline.errors import UserInputError
from tests.dense_models import ctc_net, seg_net, yolo_net


def _shell(input_shape: list, outputs: list[list]) -> onnx.ModelProto:
    """A model of Identity-like nodes with the given input and output shapes (only shapes are read)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], [f"y{i}"]) for i in range(len(outputs))], "shell",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, shape) for i, shape in enumerate(outputs)])
    return helper.make_model(graph)


@pytest.mark.parametrize(("build", "kind"), [(seg_net, "map"), (ctc_net, "sequence"), (yolo_net, "yolo")],
                         ids=["map", "ctc", "yolo"])
def test_tiny_dense_heads_are_detected(tmp_path: Path, build, kind: str) -> None:
    model = onnx.load(build(str(tmp_path / "m.onnx")))
    assert detect_output_kind(model) == kind


@pytest.mark.parametrize(("inp", "out", "kind"), [
    (["N", 3, 224, 224], ["N", 1000], "classes"),
    (["N", 3, 48, 320], ["N", 40, 6625], "sequence"),  # PP-OCRv4 recognizer
    (["N", 3, 640, 640], ["N", 84, 8400], "yolo"),  # yolov8n / yolo11n: 80 classes, strides 8, 16, 32
    (["N", 3, 640, 640], ["N", 1, 640, 640], "map"),  # DBNet probability map
])
def test_production_layouts_are_detected(inp: list, out: list, kind: str) -> None:
    assert detect_output_kind(_shell(inp, [out])) == kind


def test_yolo_segmentation_export_counts_mask_coefficients() -> None:
    model = _shell(["N", 3, 640, 640], [["N", 116, 8400], ["N", 32, 160, 160]])
    assert detect_output_kind(model) == "yolo" and output_classes(model, "yolo") == 80


@pytest.mark.parametrize(("inp", "out", "message"), [
    (["N", 3, 640, 640], ["N", 8400, 84], "detector laid out other than ultralytics"),
    (["N", 3, 640, 640], ["N", 25200, 85], "detector laid out other than ultralytics"),  # YOLOv5: 3 anchors per cell
    (["N", 3, "H", "W"], ["N", "T", 97], "could be a CTC head"),
    (["N", 3, 32, 32], ["N", 2, 3, 4, 5], "cannot tell what output"),
])
def test_ambiguous_outputs_ask_for_output_kind(inp: list, out: list, message: str) -> None:
    with pytest.raises(UserInputError, match=f"{message}.*--output-kind"):
        detect_output_kind(_shell(inp, [out]))


def test_pyramid_cells_of_a_640_input() -> None:
    cells = pyramid_cells(640, 640)
    assert cells[8400] == (8, 16, 32) and cells[6400 + 1600] == (8, 16)


def test_ctc_best_path_and_collapse() -> None:
    scores = np.zeros((1, 7, 4))
    for t, c in enumerate([0, 2, 2, 0, 2, 3, 3]):
        scores[0, t, c] = 1.0
    path = ctc_best_path(scores)
    assert path.tolist() == [[0, 2, 2, 0, 2, 3, 3]]
    assert ctc_collapse(path, blank=0) == [[2, 2, 3]]  # a blank separates the repeated 2


def _brute_alignment(lp: np.ndarray, target: list[int], blank: int) -> tuple[float, list[int]]:
    """The most likely frame labelling that collapses to ``target`` (every labelling enumerated)."""
    best, arg = -np.inf, None
    for labels in itertools.product(range(lp.shape[1]), repeat=lp.shape[0]):
        if ctc_collapse(np.asarray([labels]), blank)[0] == target:
            score = sum(lp[t, c] for t, c in enumerate(labels))
            if score > best:
                best, arg = score, list(labels)
    assert arg is not None
    return best, arg


@pytest.mark.parametrize("target", [[1], [1, 2], [2, 2], [1, 2, 1], []], ids=str)
def test_forced_alignment_is_the_viterbi_path(target: list[int]) -> None:
    rng = np.random.default_rng(len(target))
    logits = rng.standard_normal((1, 5, 3))
    path, fits = ctc_align(logits, [target], blank=0)
    lp = logits[0] - np.log(np.exp(logits[0]).sum(axis=1, keepdims=True))
    best, brute = _brute_alignment(lp, target, 0)
    assert fits.tolist() == [True]
    assert ctc_collapse(path, 0)[0] == target
    assert sum(lp[t, c] for t, c in enumerate(path[0])) == pytest.approx(best)
    assert path[0].tolist() == brute


def test_alignment_of_a_target_longer_than_the_steps_falls_back_to_the_best_path() -> None:
    scores = np.random.default_rng(0).random((2, 3, 4))
    path, fits = ctc_align(scores, np.asarray([[1, 2, -1], [1, 1, 1]]), blank=0)  # [1,1,1] needs 5 steps
    assert fits.tolist() == [True, False]
    assert path[1].tolist() == ctc_best_path(scores)[1].tolist()


def test_map_decisions() -> None:
    scores = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    np.testing.assert_array_equal(map_classes(scores), scores.argmax(axis=1))
    prob = np.array([[[[0.2, 0.6], [0.5, 0.9]]]])
    assert map_classes(prob).tolist() == [[[0, 1], [0, 1]]]
    assert map_classes(prob, threshold=0.3).tolist() == [[[0, 1], [1, 1]]]
    logits = np.log(prob / (1 - prob))  # logits leave [0, 1]: the same decisions as after a sigmoid
    assert map_classes(logits * 1.0001, threshold=0.3).tolist() == [[[0, 1], [1, 1]]]


def test_yolo_decode_keeps_confident_boxes_after_classwise_nms() -> None:
    anchors = [  # cx, cy, w, h, class 0 score, class 1 score
        (50, 50, 20, 20, 0.9, 0.1),
        (52, 51, 20, 20, 0.8, 0.1),  # overlaps the first, same class: suppressed
        (52, 51, 20, 20, 0.1, 0.85),  # same place, other class: kept
        (10, 10, 4, 4, 0.2, 0.1),  # below the confidence threshold
        (90, 20, 10, 30, 0.3, 0.26),
    ]
    out = np.asarray(anchors, np.float64).T[None]
    (det,) = yolo_decode(out, DecodeOptions(conf=0.25, iou=0.7))
    assert det[:, 4].tolist() == [0.9, 0.85, 0.3]
    assert det[:, 5].tolist() == [0, 1, 0]
    np.testing.assert_allclose(det[0, :4], [40, 40, 60, 60])
    (boxes,) = detections_as_boxes([det], 100, 100)
    np.testing.assert_allclose(boxes[0], [0, 0.5, 0.5, 0.2, 0.2])


def test_box_iou() -> None:
    a = np.array([[0, 0, 2, 2]], float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]], float)
    np.testing.assert_allclose(box_iou(a, b), [[1 / 7, 1.0, 0.0]])


@pytest.mark.parametrize(("options", "message"), [({"blank": -1}, "--blank"), ({"map_threshold": 1.0}, "--map"),
                                                  ({"conf": 0.0}, "--conf"), ({"iou": 2.0}, "--iou")])
def test_bad_decoder_options(options: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        DecodeOptions(**options)
