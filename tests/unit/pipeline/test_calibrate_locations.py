"""Location-aware calibration against a brute-force numpy reference on tiny dense models.

The reference takes the full activations of every probe from onnxruntime, builds each probe's view (the probe, its
height mean, or its mean), labels every cell (:mod:`pipeline.data.locations`, itself checked against cell-by-cell
references in ``test_locations``), draws the locations with the same seeds through its own class-balanced sampler
(smallest keys first), gathers the features and sums them; calibration (in-graph gathers or fetched views) must give
the same statistics. Model labels must be the argmax / best path / binarised map / NMS detections of the original's
outputs, and the statistics must not depend on sharding.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graph_ops.probes import add_location_views, expose_tensors
from pipeline.calibration.calibrate import calibrate
from pipeline.calibration.calibrate_locations import location_job
from pipeline.calibration.stats import merge_probes
from pipeline.data.datasets import from_npz
from pipeline.data.locations import Sampling, grid_labels, location_rng, view_of
from pipeline.data.outputs import DecodeOptions, ctc_align, detections_as_boxes, map_classes, yolo_decode
from pipeline.data.shards import OrderedMerge, shard_layout
from pipeline.data.targets import LabelOptions, resolve_targets
from pipeline.model.prepare import prepare
from tests.dense_models import ctc_net, seg_net, yolo_net
from tests.graphs import tiny_classifier

FIELDS = ("class_counts", "sum", "class_sums", "gram", "zeros", "abs_sum")
SEED = 5
SAMPLING = Sampling(per_class=3, background_ratio=1.5)


def _run(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    exposed = expose_tensors(model, names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {"input": x}), strict=True))


def _keys_sample(labels: np.ndarray, keys: np.ndarray, background: int | None, candidates: int | None = None
                 ) -> np.ndarray:
    """Class-balanced sampling written out: per class the cells with the smallest keys (among the ``candidates``
    cells of smallest keys when given)."""
    if candidates is not None and candidates < labels.size:
        labels = np.where(keys <= np.sort(keys)[candidates - 1], labels, -1)
    chosen, taken = [], 0
    for k in sorted(set(labels[labels >= 0].tolist()) - {background}):
        cells = sorted(np.flatnonzero(labels == k), key=lambda c: keys[c])[:SAMPLING.per_class]
        chosen += cells
        taken += len(cells)
    quota = math.ceil(SAMPLING.background_ratio * taken) if taken else SAMPLING.per_class
    chosen += sorted(np.flatnonzero(labels == background), key=lambda c: keys[c])[:quota]
    return np.sort(np.asarray(chosen, np.int64))


def _reference(path: Path, x: np.ndarray, targets_of: callable, target: str, background: int | None,
               num_classes: int, candidates: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The statistics of every probe, from full activations (see the module docstring)."""
    prepared = prepare(path)
    probes = list(prepared.probes)
    acts = _run(prepared.model, [*probes, prepared.model.graph.output[0].name], x)
    targets = targets_of(acts[prepared.model.graph.output[0].name])
    out = {}
    for name in probes:
        act = acts[name].astype(np.float64)
        view = view_of(name, act.shape, target)
        if view.kind == "pooled":
            values = act.reshape(*act.shape[:2], -1).mean(axis=2)
        elif view.kind == "line" and act.ndim == 4:
            values = act.mean(axis=2)
        else:
            values = act
        rows, labels = [], []
        for i in range(len(x)):
            grid = grid_labels(view.kind, target, targets[i], values.shape[2:], background).reshape(-1)
            cells = _keys_sample(grid, location_rng(SEED, i, name).random(grid.size), background, candidates)
            feats = values[i][:, None].repeat(len(cells), 1) if view.kind == "pooled" else \
                values[i].reshape(values.shape[1], -1)[:, cells]
            rows.append(feats.T)
            labels.append(grid[cells])
        f, y = np.concatenate(rows), np.concatenate(labels)
        onehot = np.eye(num_classes)[y]
        out[name] = {"n": len(y), "class_counts": onehot.sum(0), "sum": f.sum(0), "class_sums": onehot.T @ f,
                     "gram": f.T @ f, "kind": view.kind}
    return out


def _compare(stats, reference: dict, *, rtol: float = 1e-6) -> None:
    assert set(stats.probes) == set(reference)
    for name, ref in reference.items():
        probe = stats.probes[name]
        assert probe.n == ref["n"] and probe.cells == 1, name
        np.testing.assert_array_equal(probe.class_counts, ref["class_counts"])
        np.testing.assert_allclose(probe.sum, ref["sum"], rtol=rtol, atol=1e-9)
        dense = np.zeros((probe.num_classes, probe.dim))
        dense[probe.rows] = probe.class_sums
        np.testing.assert_allclose(dense, ref["class_sums"], rtol=rtol, atol=1e-9)
        np.testing.assert_allclose(probe.gram, ref["gram"], rtol=rtol, atol=1e-9)


def _calibrate(path: Path, data, labels: LabelOptions | None = None, **options):
    settings = {"progress": False, "intra_op_threads": 1, "batch_size": 4, "seed": SEED,
                "labels": labels or LabelOptions(sampling=SAMPLING)}
    return calibrate(path, data, **{**settings, **options})


def _images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def test_segmentation_masks_gathered_in_the_graph_match_the_reference(tmp_path: Path) -> None:
    path = Path(seg_net(str(tmp_path / "seg.onnx")))
    x = _images(10, (1, 16, 16))
    maps = np.zeros((10, 16, 16), np.int64)
    maps[:, 3:9, 2:12] = 1
    maps[::2, 10:15, 5:9] = 2
    maps[:, 0, :] = 255  # ignored
    np.savez(tmp_path / "d.npz", x=x, y=maps)
    data = from_npz(tmp_path / "d.npz")
    job = location_job(prepare(path), ["r1", "r2"], resolve_targets(prepare(path).model, data, LabelOptions(
        sampling=SAMPLING), require=True), summaries=False, seed=SEED, batch_size=4, backend="ort-cpu",
                       intra_op_threads=1, shard_batches=2)
    assert job.gathered and job.label_output is None  # labels known before each batch: positions fed to the graph
    stats = _calibrate(path, data)
    assert stats.targets["labels"] == "data" and stats.targets["views"] == {"r1": "grid", "r2": "grid"}
    reference = _reference(path, x, lambda out: [np.where(m == 255, -1, m) for m in maps], "map", 0, 3)
    _compare(stats, reference)


@pytest.mark.parametrize("classes", [3, 1], ids=["argmax", "probability-map"])
def test_model_labels_of_a_map_are_its_decisions(tmp_path: Path, classes: int) -> None:
    path = Path(seg_net(str(tmp_path / "seg.onnx"), classes=classes))
    x = _images(9, (1, 16, 16), seed=1)
    np.savez(tmp_path / "u.npz", x=x)
    stats = _calibrate(path, from_npz(tmp_path / "u.npz"), LabelOptions(source="model", sampling=SAMPLING),
                       require_labels=True)
    assert stats.targets["labels"] == "model" and stats.targets["output_kind"] == "map"
    reference = _reference(path, x, lambda out: list(map_classes(out, 0.5)), "map", 0, max(classes, 2))
    _compare(stats, reference)


def test_model_labels_on_large_grids_are_sampled_among_fetched_candidates(tmp_path: Path) -> None:
    path = Path(seg_net(str(tmp_path / "seg.onnx")))
    x = _images(7, (1, 16, 16), seed=11)
    np.savez(tmp_path / "u.npz", x=x)
    data, prepared = from_npz(tmp_path / "u.npz"), prepare(path)
    targets = resolve_targets(prepared.model, data, LabelOptions(source="model", sampling=SAMPLING), require=True)
    job = location_job(prepared, ["r1", "r2"], targets, summaries=False, seed=SEED, batch_size=3, backend="ort-cpu",
                       intra_op_threads=1, shard_batches=2, candidates=40)
    assert [v.gather is not None for v in job.views] == [True, True]  # 256 and 64 cells: 40 candidates fetched
    stats = job.local(data, shard_layout(7, 3, 2), progress=False)
    reference = _reference(path, x, lambda out: list(map_classes(out, 0.5)), "map", 0, 3, candidates=40)
    _compare(type("S", (), {"probes": stats})(), reference)


def test_ctc_model_labels_are_the_best_path(tmp_path: Path) -> None:
    path = Path(ctc_net(str(tmp_path / "ctc.onnx")))
    x = _images(11, (1, 8, 32), seed=2)
    np.savez(tmp_path / "u.npz", x=x)
    stats = _calibrate(path, from_npz(tmp_path / "u.npz"), require_labels=True)  # no labels: the model's, by default
    assert stats.targets["reason"] == "the data has no labels" and stats.targets["kind"] == "sequence"
    assert stats.targets["views"] == {"r1": "line", "col": "line"}
    _compare(stats, _reference(path, x, lambda out: list(out.argmax(axis=2)), "sequence", 0, 5))


def test_ctc_text_labels_are_aligned_through_the_models_output(tmp_path: Path) -> None:
    path = Path(ctc_net(str(tmp_path / "ctc.onnx")))
    x = _images(8, (1, 8, 32), seed=3)
    text = np.array([[1, 2, 3, -1], [4, 4, -1, -1], [2, -1, -1, -1], [1, 3, 1, 3]] * 2)
    np.savez(tmp_path / "t.npz", x=x, y=text)
    stats = _calibrate(path, from_npz(tmp_path / "t.npz", label_format="text"))
    assert stats.targets["labels"] == "data" and stats.targets["format"] == "text"
    _compare(stats, _reference(path, x, lambda out: list(ctc_align(out, text, 0)[0]), "sequence", 0, 5))


def test_yolo_model_labels_are_confident_detections_rasterised(tmp_path: Path) -> None:
    path = Path(yolo_net(str(tmp_path / "yolo.onnx")))
    x = _images(8, (3, 32, 32), seed=4)
    np.savez(tmp_path / "u.npz", x=x)
    stats = _calibrate(path, from_npz(tmp_path / "u.npz"), LabelOptions(source="model", sampling=SAMPLING),
                       require_labels=True)
    assert (stats.targets["kind"], stats.targets["num_classes"], stats.targets["background"]) == ("boxes", 3, 2)

    def detections(out: np.ndarray) -> list[np.ndarray]:
        return detections_as_boxes(yolo_decode(out, DecodeOptions(), num_classes=2), 32, 32)

    assert sum(len(d) for d in detections(_run(prepare(path).model, ["output0"], x)["output0"])) > 0
    _compare(stats, _reference(path, x, detections, "boxes", 2, 3))


def test_yolo_label_files_gathered_in_the_graph_match_the_reference(tmp_path: Path) -> None:
    path = Path(yolo_net(str(tmp_path / "yolo.onnx")))
    x = _images(6, (3, 32, 32), seed=5)
    np.savez(tmp_path / "d.npz", x=x)
    labels = tmp_path / "labels"
    labels.mkdir()
    boxes = {0: [[0, 0.3, 0.3, 0.4, 0.4]], 2: [[1, 0.7, 0.6, 0.5, 0.3], [0, 0.7, 0.6, 0.1, 0.1]], 5: []}
    for i, rows in boxes.items():
        (labels / f"{i}.txt").write_text("".join(" ".join(str(v) for v in r) + "\n" for r in rows))
    data = from_npz(tmp_path / "d.npz", labels_path=labels)
    stats = _calibrate(path, data)
    assert stats.targets["kind"] == "boxes" and stats.targets["num_classes"] == 3  # 2 classes + background
    targets = [np.asarray(boxes.get(i, []), np.float64).reshape(-1, 5) for i in range(6)]
    _compare(stats, _reference(path, x, lambda out: targets, "boxes", 2, 3))


def test_classifier_model_labels_are_the_argmax_fetched_in_the_same_run(tmp_path: Path) -> None:
    path = Path(tiny_classifier(str(tmp_path / "c.onnx"), in_channels=2, widths=(4, 6), classes=3, seed=7))
    x = _images(40, (2, 8, 8), seed=6)
    np.savez(tmp_path / "u.npz", x=x)
    stats = _calibrate(path, from_npz(tmp_path / "u.npz"), require_labels=True, pooling="gap")
    decided = _run(onnx.load(str(path)), ["logits"], x)["logits"].argmax(axis=1)
    assert stats.targets == {"labels": "model", "kind": "classes", "num_classes": 3, "output_kind": "classes",
                             "reason": "the data has no labels"}
    for probe in stats.probes.values():
        np.testing.assert_array_equal(probe.class_counts, np.bincount(decided, minlength=3))
    np.savez(tmp_path / "l.npz", x=x, y=decided)  # the same classes given as data labels: the same statistics
    labelled = _calibrate(path, from_npz(tmp_path / "l.npz"), pooling="gap")
    for name, probe in stats.probes.items():
        for field in FIELDS:
            np.testing.assert_array_equal(getattr(probe, field), getattr(labelled.probes[name], field))


def test_statistics_do_not_depend_on_sharding_or_batches(tmp_path: Path) -> None:
    path = Path(ctc_net(str(tmp_path / "ctc.onnx")))
    x = _images(21, (1, 8, 32), seed=7)
    np.savez(tmp_path / "u.npz", x=x)
    data = from_npz(tmp_path / "u.npz")
    prepared = prepare(path)
    targets = resolve_targets(prepared.model, data, LabelOptions(sampling=SAMPLING), require=True)
    job = location_job(prepared, list(prepared.probes), targets, summaries=True, seed=SEED, batch_size=4,
                       backend="ort-cpu", intra_op_threads=1, shard_batches=2)
    shards = shard_layout(data.num_samples, job.batch_size, job.shard_batches)
    local = job.local(data, shards, progress=False)
    merged: OrderedMerge = OrderedMerge(merge_probes)
    for shard in reversed(shards):  # what Ray workers do: each shard alone, any order, merged in shard order
        merged.add(shard.index, job.shard(data, shard))
    for name, probe in merged.result(len(shards)).items():
        for field in FIELDS:
            assert np.array_equal(getattr(probe, field), getattr(local[name], field)), (name, field)
    other = _calibrate(path, data, batch_size=5, require_labels=True)  # other batches: the same locations
    for name, probe in _calibrate(path, data, require_labels=True).probes.items():
        np.testing.assert_array_equal(probe.class_counts, other.probes[name].class_counts)
        np.testing.assert_allclose(probe.gram, other.probes[name].gram, rtol=1e-12)


def test_many_classes_keep_sums_of_the_classes_seen_only(tmp_path: Path) -> None:
    path = Path(ctc_net(str(tmp_path / "ctc.onnx"), classes=300))
    x = _images(6, (1, 8, 32), seed=8)
    np.savez(tmp_path / "u.npz", x=x)
    stats = _calibrate(path, from_npz(tmp_path / "u.npz"), require_labels=True)
    probe = stats.probes["col"]
    seen = np.flatnonzero(probe.class_counts)
    assert probe.class_ids is not None and probe.class_ids.tolist() == seen.tolist() and probe.num_classes == 300
    _compare(stats, _reference(path, x, lambda out: list(out.argmax(axis=2)), "sequence", 0, 300))
    stats.save(tmp_path / "s.npz")
    loaded = type(stats).load(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded.probes["col"].class_ids, probe.class_ids)
    assert loaded.targets == stats.targets


def test_location_views_of_a_channels_last_probe(tmp_path: Path) -> None:
    path = Path(seg_net(str(tmp_path / "seg.onnx")))
    model = prepare(path).model
    nodes = list(model.graph.node)  # r2 (N, 8, 8, 8) transposed to channels last as an extra tensor
    transposed = onnx.helper.make_node("Transpose", ["r2"], ["r2_last"], perm=[0, 2, 3, 1])
    model.graph.node.insert(nodes.index(next(n for n in nodes if "r2" in n.output)) + 1, transposed)
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("r2_last", onnx.TensorProto.FLOAT,
                                                                     [None, 8, 8, 8]))
    viewed, views, _ = add_location_views(model, [("r2_last", "grid"), ("r2_last", "line"), ("r1", "pooled")],
                                          last_axis=["r2_last"])
    x = _images(3, (1, 16, 16), seed=9)
    got = dict(zip([o.name for o in viewed.graph.output],
                   ort.InferenceSession(viewed.SerializeToString(), providers=["CPUExecutionProvider"]).run(
                       None, {"input": x}), strict=True))
    acts = _run(prepare(path).model, ["r1", "r2"], x)
    np.testing.assert_array_equal(got[views[0].output], acts["r2"])
    np.testing.assert_allclose(got[views[1].output], acts["r2"].mean(axis=2), rtol=1e-6)
    np.testing.assert_allclose(got[views[2].output], acts["r1"].mean(axis=(2, 3)), rtol=1e-6)
    assert got[views[1].shape].tolist() == [3, 8, 8]
