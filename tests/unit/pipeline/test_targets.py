"""Dense label readers (YOLO, COCO, mask PNGs, npz arrays), their pairing with samples, and label resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.datasets import from_image_folder, from_npz
from pipeline.data.labels import guess_format
from pipeline.data.named import open_dataset
from pipeline.data.targets import LabelOptions, resolve_targets
from pipeline.errors import CalibrationError, UserInputError
from pipeline.model.prepare import prepare
from tests.dense_models import ctc_net, seg_net, yolo_net

PIL = pytest.importorskip("PIL.Image", reason="image folders need Pillow")


def _npz(path: Path, n: int = 4, **extra: np.ndarray) -> Path:
    np.savez(path, x=np.random.default_rng(0).random((n, 1, 16, 16)).astype(np.float32), **extra)
    return path


def test_yolo_folder_pairs_npz_samples_by_integer_stem(tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "0.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.2 0.1 0.1\n")
    (labels / "0002.txt").write_text("\n3 0.25 0.75 0.5 0.5\n")
    (labels / "2 0.2 0.2 0.2 0.8 0.4 0.8.txt").write_text("")  # not an integer stem: ignored
    data = from_npz(_npz(tmp_path / "d.npz"), labels_path=labels)
    assert data.labels is None and data.targets.kind == "boxes" and data.targets.format == "yolo"
    first, second, third, fourth = data.targets.take(0, 4)
    np.testing.assert_allclose(first, [[1, 0.5, 0.5, 0.2, 0.4], [0, 0.1, 0.2, 0.1, 0.1]])
    assert second.shape == (0, 5) and fourth.shape == (0, 5)  # no file: no objects
    np.testing.assert_allclose(third, [[3, 0.25, 0.75, 0.5, 0.5]])
    assert data.targets.num_classes == 4
    np.testing.assert_allclose(data.subset(2, 4).targets.take(0, 1)[0], third)


def test_yolo_polygon_lines_count_as_their_bounding_box(tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "0.txt").write_text("2 0.2 0.2 0.6 0.2 0.6 0.8 0.2 0.8\n")
    data = from_npz(_npz(tmp_path / "d.npz", n=1), labels_path=labels, label_format="yolo")
    np.testing.assert_allclose(data.targets.take(0, 1)[0], [[2, 0.4, 0.5, 0.4, 0.6]])


@pytest.mark.parametrize(("line", "message"), [("1 0.5 0.5 0.2", "5 numbers"), ("a b c d e", "numbers"),
                                               ("1 0.5 0.5 0.2 1.7", "normalised"), ("-1 0.5 0.5 0.2 0.2", "class")])
def test_bad_yolo_lines_name_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "0.txt").write_text(f"0 0.5 0.5 0.1 0.1\n{line}\n")
    with pytest.raises(UserInputError, match=f"0.txt:2: .*{message}"):
        from_npz(_npz(tmp_path / "d.npz", n=1), labels_path=labels)


def _coco(path: Path, names: list[str]) -> Path:
    doc = {"categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],
           "images": [{"id": 10 + i, "file_name": f"dir/{name}.jpg", "width": 200, "height": 100}
                      for i, name in enumerate(names)],
           "annotations": [{"image_id": 10, "category_id": 7, "bbox": [20, 10, 40, 20], "iscrowd": 0},
                           {"image_id": 10, "category_id": 3, "bbox": [0, 0, 200, 100], "iscrowd": 1},
                           {"image_id": 11, "category_id": 3, "bbox": [100, 50, 100, 50]}]}
    path.write_text(json.dumps(doc))
    return path


def test_coco_boxes_are_normalised_and_categories_contiguous(tmp_path: Path) -> None:
    data = from_npz(_npz(tmp_path / "d.npz", n=3), labels_path=_coco(tmp_path / "ann.json", ["0", "1", "2"]))
    first, second, third = data.targets.take(0, 3)
    np.testing.assert_allclose(first, [[1, 0.2, 0.2, 0.2, 0.2]])  # category 7 -> 1 (sorted ids 3, 7); crowd skipped
    np.testing.assert_allclose(second, [[0, 0.75, 0.75, 0.5, 0.5]])
    assert third.shape == (0, 5) and data.targets.num_classes == 2 and data.targets.format == "coco"


def test_coco_without_an_entry_for_a_sample_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"1 samples have no image entry.*e.g. '2'"):
        from_npz(_npz(tmp_path / "d.npz", n=3), labels_path=_coco(tmp_path / "ann.json", ["0", "1"]))


def test_mask_pngs_are_read_lazily_with_255_ignored(tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):
        values = np.full((16, 16), i, np.uint8)
        values[0, :] = 255
        PIL.fromarray(values).save(masks / f"{i}.png")
    data = from_npz(_npz(tmp_path / "d.npz", n=2), labels_path=masks)
    assert data.targets.kind == "map" and guess_format(masks) == "mask"
    first, second = data.targets.take(0, 2)
    assert first[0].tolist() == [-1] * 16 and int(second[5, 5]) == 1 and data.targets.num_classes == 2


def test_missing_masks_are_refused(tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    PIL.fromarray(np.zeros((4, 4), np.uint8)).save(masks / "0.png")
    with pytest.raises(UserInputError, match="1 samples have no mask"):
        from_npz(_npz(tmp_path / "d.npz", n=2), labels_path=masks)


def test_npz_arrays_give_maps_and_sequences(tmp_path: Path) -> None:
    maps = np.zeros((4, 16, 16), np.uint8)
    maps[:, 4:8, 4:8] = 2
    maps[:, 0, 0] = 255
    data = from_npz(_npz(tmp_path / "m.npz", y=maps))
    assert data.labels is None and data.targets.kind == "map" and data.targets.num_classes == 3
    assert int(data.targets.take(1, 2)[0][0, 0]) == -1
    seqs = np.array([[1, 2, -1], [3, -1, -1], [2, 2, 4], [1, -1, -1]])
    data = from_npz(_npz(tmp_path / "s.npz", y=seqs), label_format="text")
    assert data.targets.kind == "sequence" and [t.tolist() for t in data.targets.take(0, 2)] == [[1, 2], [3]]
    with pytest.raises(UserInputError, match="--label-format mask does not fit"):
        from_npz(_npz(tmp_path / "s2.npz", y=seqs), label_format="mask")


def test_npz_split_and_limit_apply_to_dense_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.random((6, 1, 4, 4)).astype(np.float32),
             y_train=np.arange(6)[:, None, None] * np.ones((1, 4, 4), np.int64),
             x_test=rng.random((2, 1, 4, 4)).astype(np.float32), y_test=np.full((2, 4, 4), 9))
    data = open_dataset(tmp_path / "d.npz", limit=3)
    assert data.num_samples == 3 and [int(t[0, 0]) for t in data.targets.take(0, 3)] == [0, 1, 2]
    assert int(open_dataset(tmp_path / "d.npz", split="test").targets.take(0, 1)[0][0, 0]) == 9


def test_image_folder_boxes_and_masks_follow_resize_and_crop(tmp_path: Path) -> None:
    images, labels, masks = tmp_path / "images", tmp_path / "labels", tmp_path / "masks"
    for folder in (images, labels, masks):
        folder.mkdir()
    PIL.fromarray(np.zeros((100, 200, 3), np.uint8)).save(images / "a.png")  # 200 wide, 100 high
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.05 0.5 0.1 0.1\n")  # the second lies outside the crop
    data = from_image_folder(images, size=50, crop=(50, 50), mean=(0, 0, 0), std=(1, 1, 1), labels_path=labels)
    (boxes,) = data.targets.take(0, 1)
    # resized to 100 x 50, cropped [25, 75) horizontally: the centre box spans x 80..120 -> 55..95 of 100 -> crop
    np.testing.assert_allclose(boxes, [[0, 0.5, 0.5, 0.4, 0.2]])
    mask = np.zeros((100, 200), np.uint8)
    mask[:, 100:] = 1
    PIL.fromarray(mask).save(masks / "a.png")
    data = from_image_folder(images, size=50, crop=(50, 50), mean=(0, 0, 0), std=(1, 1, 1), labels_path=masks)
    (grid,) = data.targets.take(0, 1)
    assert grid.shape == (50, 50) and grid[:, :25].max() == 0 and grid[:, 25:].min() == 1


def test_class_folders_with_a_labels_path_are_refused(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    PIL.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "cat" / "a.png")
    (tmp_path / "labels").mkdir()
    with pytest.raises(UserInputError, match="class sub-folders"):
        from_image_folder(tmp_path, size=8, crop=8, mean=(0, 0, 0), std=(1, 1, 1), labels_path=tmp_path / "labels")


def test_label_format_guess(tmp_path: Path) -> None:
    assert guess_format(_coco(tmp_path / "a.json", ["0"])) == "coco"
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "0.txt").write_text("")
    assert guess_format(tmp_path / "y") == "yolo"
    with pytest.raises(UserInputError, match="labels path not found"):
        guess_format(tmp_path / "absent")


def test_resolution_defaults_and_records(tmp_path: Path) -> None:
    seg = prepare(seg_net(str(tmp_path / "seg.onnx"))).model
    unlabelled = from_npz(_npz(tmp_path / "u.npz"))
    assert resolve_targets(seg, unlabelled, None, require=False) is None
    model = resolve_targets(seg, unlabelled, None, require=True)
    assert (model.source, model.kind, model.num_classes, model.output_kind) == ("model", "map", 3, "map")
    assert model.to_dict()["reason"] == "the data has no labels"
    with pytest.raises(UserInputError, match=r"--labels data: the data .* has no labels"):
        resolve_targets(seg, unlabelled, LabelOptions(source="data"), require=True)
    yolo = prepare(yolo_net(str(tmp_path / "yolo.onnx"))).model
    detected = resolve_targets(yolo, unlabelled, LabelOptions(source="model"), require=True)
    assert (detected.kind, detected.num_classes, detected.background) == ("boxes", 3, 2)
    ctc = prepare(ctc_net(str(tmp_path / "ctc.onnx"))).model
    text = from_npz(_npz(tmp_path / "t.npz", y=np.array([[1, 2], [3, -1], [4, 4], [1, -1]])))
    aligned = resolve_targets(ctc, text, None, require=True)
    assert (aligned.source, aligned.kind, aligned.num_classes, aligned.background) == ("data", "sequence", 5, 0)
    with pytest.raises(UserInputError, match=r"text labels are aligned.*reads as 'map'"):
        resolve_targets(seg, text, None, require=True)
    too_big = from_npz(_npz(tmp_path / "b.npz", y=np.array([[1, 9], [3, -1], [4, 4], [1, -1]])))
    with pytest.raises(CalibrationError, match="class id 9, the CTC output has 5"):
        resolve_targets(ctc, too_big, None, require=True)
