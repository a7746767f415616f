"""The ``diprune run`` job file: YAML in, nested frozen dataclasses out, every mistake named with its key.

Schema (``key: default``; every key but ``model``, ``data`` and a budget is optional)::

    model: path/to/model.onnx        # or {export: "torchvision:resnet18", input_shape: [1, 3, 224, 224],
                                     #     input_name: input, opset: 17, dynamic_batch: true, exporter: dynamo}
    data:
      calibration: calib.npz         # 'mnist', an .npz or an image folder (as --data); or a mapping
                                     # {path: ..., split, limit, scale, mean, std, size, crop, channel_order,
                                     #  input_key, label_key, label_format, labels_path}  (dense labels: yolo, coco,
                                     #  mask, text)
      evaluation: test.npz           # same forms; held-out data ('test' split by default where there is one)
      limit / scale / mean / std / size / crop / channel_order / input_key / label_key: defaults for both
    prune:
      methods: [di]                  # keys of pipeline.selection.scorers.SCORERS
      target_macs: [0.5]             # fractions kept; and/or target_params: [...]
      target_latency: []             # fractions of the original's latency measured on bench.backend at the first
                                     # bench batch with bench.threads (closed loop; pipeline.deployment.latency_plan)
      latency_model: null            # a file from 'diprune latency fit' (the board's profiles): target_latency is
                                     # planned against it, nothing timed here
      quantize: null                 # int8: every candidate and the original also quantized (<name>-int8)
      recover: lstsq                 # keys of pipeline.recovery.RECOVERY
      recover_mode: sequential       # or one-pass
      round_to: null                 # null: the bench backend's default (8 on ort-cpu)
      min_channels: 8
      protect: []                    # group ids never pruned
      prune_ends: false              # rule allocation: also prune the first layer and the classifier input
      allocation: measured           # measured: groups ranked by measured output damage; rule: by the criterion
      steps: 1                       # rounds of prune + recover on the recovered model to reach each budget
      pooling: auto                  # auto: what each probe's consumers read; or gap, avg2, avg4
      labels: null                   # data or model (default: the data's labels, else the model's decisions)
      output_kind: null              # classes, sequence, map or yolo (default: detected from the output's shape)
      blank: 0                       # CTC blank class; map_threshold: 0.5, conf_threshold: 0.25, iou_threshold: 0.7
      locations_per_class: 16        # dense labels: locations per class and image; background_ratio: 1.0
      batch_size: 64
      seed: 0
      max_drop: null                 # accuracy points: also search, per method, the smallest model within them
      finetune_epochs: 0             # > 0: distil the original into every candidate (needs the [torch] extra)
    task: {classes: [3, 8]}          # or {map: {odd: [1, 3, 5, 7, 9], even: [0, 2, 4, 6, 8]}} or {map: task.json}
    bench: {backend: ort-cpu, batch: [1], threads: null, warmup: 1.0, duration: 3.0, iterations: 30, rounds: 5}
    gates: {max_top1_drop: 1.0, min_speedup: 1.3}    # names from pipeline.job.gates.GATES; max_top1_drop in points
    output: runs/exp1
    mlflow: {uri: null, experiment: diprune}           # or true; used when given (or with --mlflow)

Relative paths (model, data, output) are relative to the config file's folder, so a config and its data can move
together; ``mnist`` is the shipped digits. Unknown keys are refused with the closest known key; every number must be
finite and in its range (NaN or infinity is refused with the key's name: a gate against NaN fails every candidate, an
infinite bench duration never ends).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graph_ops.io import read_text
from pipeline.calibration.calibrate import DEFAULT_POOLING, POOLINGS
from pipeline.data.locations import DEFAULT_BACKGROUND_RATIO, DEFAULT_PER_CLASS, Sampling
from pipeline.data.outputs import MAP_THRESHOLD, OUTPUT_KINDS, YOLO_CONF, YOLO_IOU, DecodeOptions
from pipeline.data.shards import SHARD_BATCHES
from pipeline.data.targets import LABEL_FORMATS, LABEL_SOURCES, LabelOptions
from pipeline.data.task import Task, load_task_map, task_from_map
from pipeline.deployment.engines import BACKENDS, PRECISIONS
from pipeline.errors import UserInputError
from pipeline.job.gates import DENSE_GATES, GATE_RANGES, GATES, POINTS_FLOOR, POINTS_GATES
from pipeline.job.values import _choice, _jsonable, _keys, _list, _number, _path
from pipeline.recovery import DEFAULT_RECOVERY, RECOVERY
from pipeline.selection.scorers import SCORERS

DATA_OPTIONS = ("limit", "scale", "mean", "std", "size", "crop", "channel_order", "input_key", "label_key",
                "label_format", "labels_path")


@dataclass(frozen=True)
class ModelSpec:
    """An ONNX file, or a torch model to export first (``export`` is a ``diprune export`` spec)."""

    path: Path | None = None
    export: str | None = None
    input_shape: tuple[int, ...] | None = None
    input_name: str | None = None
    opset: int = 17
    dynamic_batch: bool = True
    exporter: str = "dynamo"


@dataclass(frozen=True)
class DataSpec:
    """One dataset as ``--data`` and the data options would give it (``split`` None: the default part)."""

    source: str
    split: str | None = None
    limit: int | None = None
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    size: int | None = None
    crop: int | None = None
    input_key: tuple[str, ...] | None = None
    label_key: str | None = None
    label_format: str | None = None
    labels_path: str | None = None
    channel_order: str | None = None


@dataclass(frozen=True)
class PruneSpec:
    """Which candidates to make: every method at every budget, with one recovery."""

    methods: tuple[str, ...] = ("di",)
    target_macs: tuple[float, ...] = ()
    target_params: tuple[float, ...] = ()
    target_latency: tuple[float, ...] = ()
    quantize: str | None = None
    recover: str = DEFAULT_RECOVERY
    recover_mode: str = "sequential"
    round_to: int | None = None
    min_channels: int = 8
    protect: tuple[str, ...] = ()
    prune_ends: bool = False
    allocation: str = "measured"
    steps: int = 1
    pooling: str = DEFAULT_POOLING
    batch_size: int = 64
    seed: int = 0
    max_drop: float | None = None
    workers: int | None = None
    ray: str | None = None
    shard_batches: int = SHARD_BATCHES
    finetune_epochs: int = 0
    latency_model: Path | None = None
    labels: str | None = None
    output_kind: str | None = None
    blank: int = 0
    map_threshold: float = MAP_THRESHOLD
    conf_threshold: float = YOLO_CONF
    iou_threshold: float = YOLO_IOU
    locations_per_class: int = DEFAULT_PER_CLASS
    background_ratio: float = DEFAULT_BACKGROUND_RATIO

    def label_options(self) -> LabelOptions:
        """The label keys as :class:`pipeline.data.targets.LabelOptions`."""
        return LabelOptions(source=self.labels, output_kind=self.output_kind,
                            decode=DecodeOptions(blank=self.blank, map_threshold=self.map_threshold,
                                                 conf=self.conf_threshold, iou=self.iou_threshold),
                            sampling=Sampling(per_class=self.locations_per_class,
                                              background_ratio=self.background_ratio))

    @property
    def targets(self) -> tuple[tuple[str, float], ...]:
        """``(kind, fraction)`` budgets, MACs first, then params, then latency, in config order."""
        return (tuple(("macs", t) for t in self.target_macs) + tuple(("params", t) for t in self.target_params)
                + tuple(("latency", t) for t in self.target_latency))


@dataclass(frozen=True)
class BenchSpec:
    """Latency measurement of the original and every candidate, in the same interleaved rounds."""

    backend: str = "ort-cpu"
    batch: tuple[int, ...] = (1,)
    threads: int | None = None
    warmup: float = 1.0
    duration: float = 3.0
    iterations: int = 30
    rounds: int = 5
    precision: str = "fp32"


@dataclass(frozen=True)
class MlflowSpec:
    """Where to log the run (``uri`` None: a sqlite store in the output folder)."""

    uri: str | None = None
    experiment: str = "diprune"


@dataclass(frozen=True)
class RunConfig:
    """A whole ``diprune run`` job."""

    model: ModelSpec
    calibration: DataSpec | None
    evaluation: DataSpec
    prune: PruneSpec
    bench: BenchSpec
    gates: Mapping[str, float]
    output: Path
    mlflow: MlflowSpec | None = None
    task: Task | None = None
    source: Path | None = field(default=None, compare=False)
    task_map: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, JSON-ready (paths as strings)."""
        doc = asdict(self)
        doc.pop("source")
        doc.pop("task_map")
        doc["task"] = None if self.task is None else self.task.to_dict()
        return _jsonable(doc)

    def input_paths(self) -> list[Path]:
        """Every file (or folder) the job reads: the config, the model (or its export's ``file.py``), the data
        (``mnist``: the shipped file) and the task map."""
        from pipeline.data.datasets import mnist_path

        paths = [p for p in (self.source, self.model.path, self.task_map) if p is not None]
        if self.model.export and self.model.export.rpartition(":")[0].endswith(".py"):
            paths.append(Path(self.model.export.rpartition(":")[0]))
        paths += [mnist_path() if spec.source == "mnist" else Path(spec.source)
                  for spec in (self.calibration, self.evaluation) if spec is not None]
        return paths


# ----------------------------------------------------------------------------------------------------- parsing


def _model(value: Any, base: Path) -> ModelSpec:
    if isinstance(value, str):
        return ModelSpec(path=_path(value, "model", base))
    section = _keys(value, "model", ("export", "input_shape", "input_name", "opset", "dynamic_batch", "exporter"))
    spec = section.get("export")
    if not isinstance(spec, str) or not spec:
        raise UserInputError("config: 'model' is a path to an .onnx file or {export: SPEC, input_shape: [...]} with "
                             "SPEC torchvision:NAME, timm:NAME or path/to/file.py:FACTORY")
    file, _, factory = spec.rpartition(":")
    if file.endswith(".py"):  # the factory file is relative to the config too
        spec = f"{_path(file, 'model.export', base)}:{factory}"
    shape = section.get("input_shape")
    dims = None if shape is None else tuple(_number(d, "model.input_shape", integer=True, low=1)
                                            for d in _list(shape, "model.input_shape"))
    dynamic = section.get("dynamic_batch", True)
    if not isinstance(dynamic, bool):
        raise UserInputError(f"config: 'model.dynamic_batch' must be true or false, got {dynamic!r}")
    name = section.get("input_name")
    return ModelSpec(export=spec, input_shape=dims, input_name=None if name is None else str(name),
                     opset=_number(section.get("opset", 17), "model.opset", integer=True, low=7), dynamic_batch=dynamic,
                     exporter=_choice(section.get("exporter", "dynamo"), "model.exporter", ("dynamo", "legacy")))


def _floats(value: Any, where: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    return tuple(_number(v, where) for v in _list(value, where))


def _dataset(value: Any, where: str, base: Path, defaults: Mapping[str, Any]) -> DataSpec:
    section = {"path": value} if isinstance(value, str) else dict(_keys(value, where, ("path", "split",
                                                                                        *DATA_OPTIONS)))
    options = {**defaults, **{k: v for k, v in section.items() if k in DATA_OPTIONS}}
    raw = section.get("path")
    if not isinstance(raw, str) or not raw:
        raise UserInputError(f"config: '{where}' needs a path: 'mnist', an .npz file or an image folder")
    source = raw if raw == "mnist" else str(_path(raw, f"{where}.path", base))
    split = section.get("split")
    if split is not None:
        _choice(split, f"{where}.split", ("train", "test", "all"))
    keys = options.get("input_key")
    label_format = options.get("label_format")
    if label_format is not None:
        _choice(label_format, f"{where}.label_format", LABEL_FORMATS)
    labels_path = options.get("labels_path")
    return DataSpec(
        source=source, split=split,
        limit=None if options.get("limit") is None else _number(options["limit"], f"{where}.limit", integer=True, low=1),
        scale=None if options.get("scale") is None else _number(options["scale"], f"{where}.scale"),
        mean=_floats(options.get("mean"), f"{where}.mean"), std=_floats(options.get("std"), f"{where}.std"),
        size=None if options.get("size") is None else _number(options["size"], f"{where}.size", integer=True, low=1),
        crop=None if options.get("crop") is None else _number(options["crop"], f"{where}.crop", integer=True, low=1),
        input_key=None if keys is None else tuple(str(k) for k in _list(keys, f"{where}.input_key")),
        label_key=None if options.get("label_key") is None else str(options["label_key"]),
        label_format=label_format,
        labels_path=None if labels_path is None else str(_path(labels_path, f"{where}.labels_path", base)),
        channel_order=None if options.get("channel_order") is None else _choice(
            options["channel_order"], f"{where}.channel_order", ("rgb", "bgr", "gray")))


def _data(value: Any, base: Path) -> tuple[DataSpec | None, DataSpec]:
    section = _keys(value, "data", ("calibration", "evaluation", *DATA_OPTIONS))
    if "evaluation" not in section:
        raise UserInputError("config: 'data.evaluation' is missing: every candidate is evaluated on held-out data "
                             "('mnist', an .npz or an image folder)")
    defaults = {k: section[k] for k in DATA_OPTIONS if k in section}
    _dataset({"path": "mnist", **defaults}, "data", base, {})  # the defaults are checked even where overridden
    calibration = section.get("calibration")
    calib = None if calibration is None else _dataset(calibration, "data.calibration", base, defaults)
    return calib, _dataset(section["evaluation"], "data.evaluation", base, defaults)


def _prune(value: Any, base: Path) -> PruneSpec:
    names = [f.name for f in PruneSpec.__dataclass_fields__.values()]
    section = _keys(value, "prune", names)
    methods = tuple(_choice(m, "prune.methods", sorted(SCORERS)) for m in _list(section.get("methods", "di"),
                                                                                 "prune.methods"))
    targets = {key: tuple(dict.fromkeys(_number(t, f"prune.{key}", low=0.0, high=1.0, low_open=True)
                                        for t in _list(section[key], f"prune.{key}"))) if key in section else ()
               for key in ("target_macs", "target_params", "target_latency")}
    max_drop = section.get("max_drop")
    max_drop = None if max_drop is None else _number(max_drop, "prune.max_drop", low=0.0)
    if not any(targets.values()) and max_drop is None:
        raise UserInputError("config: give a budget: 'prune.target_macs', 'prune.target_params' and/or "
                             "'prune.target_latency' (fractions kept, e.g. [0.5, 0.25]), or 'prune.max_drop' "
                             "(accuracy points)")
    quantize = section.get("quantize")
    latency_model = section.get("latency_model")
    if latency_model is not None and not targets["target_latency"]:
        raise UserInputError("config: 'prune.latency_model' is what 'prune.target_latency' plans against; give "
                             "'prune.target_latency' too")
    round_to = section.get("round_to")
    protect = section.get("protect") or []
    prune_ends = section.get("prune_ends", False)
    if not isinstance(prune_ends, bool):
        raise UserInputError(f"config: 'prune.prune_ends' must be true or false, got {prune_ends!r}")
    return PruneSpec(
        methods=tuple(dict.fromkeys(methods)), **targets,
        recover=_choice(section.get("recover", DEFAULT_RECOVERY), "prune.recover", list(RECOVERY)),
        recover_mode=_choice(section.get("recover_mode", "sequential"), "prune.recover_mode",
                             ("sequential", "one-pass")),
        round_to=None if round_to is None else _number(round_to, "prune.round_to", integer=True, low=1),
        min_channels=_number(section.get("min_channels", 8), "prune.min_channels", integer=True, low=1),
        protect=tuple(str(p) for p in _list(protect, "prune.protect")) if protect else (), prune_ends=prune_ends,
        allocation=_choice(section.get("allocation", "measured"), "prune.allocation", ("measured", "rule")),
        steps=_number(section.get("steps", 1), "prune.steps", integer=True, low=1),
        quantize=None if quantize is None else _choice(quantize, "prune.quantize", ("int8",)),
        pooling=_choice(section.get("pooling", DEFAULT_POOLING), "prune.pooling", tuple(POOLINGS)),
        batch_size=_number(section.get("batch_size", 64), "prune.batch_size", integer=True, low=1),
        seed=_number(section.get("seed", 0), "prune.seed", integer=True, low=0), max_drop=max_drop,
        workers=None if section.get("workers") is None else _number(section["workers"], "prune.workers",
                                                                     integer=True, low=1),
        ray=None if section.get("ray") is None else str(section["ray"]),
        shard_batches=_number(section.get("shard_batches", SHARD_BATCHES), "prune.shard_batches", integer=True,
                              low=1),
        finetune_epochs=_number(section.get("finetune_epochs", 0), "prune.finetune_epochs", integer=True, low=0),
        latency_model=None if latency_model is None else _path(latency_model, "prune.latency_model", base),
        **_label_keys(section))


def _label_keys(section: Mapping[str, Any]) -> dict[str, Any]:
    """The label keys of the prune section (as ``--labels``, ``--output-kind``, ...), checked."""
    labels, kind = section.get("labels"), section.get("output_kind")
    keys = {"labels": None if labels is None else _choice(labels, "prune.labels", LABEL_SOURCES),
            "output_kind": None if kind is None else _choice(kind, "prune.output_kind", tuple(OUTPUT_KINDS)),
            "blank": _number(section.get("blank", 0), "prune.blank", integer=True, low=0),
            "locations_per_class": _number(section.get("locations_per_class", DEFAULT_PER_CLASS),
                                           "prune.locations_per_class", integer=True, low=1),
            "background_ratio": _number(section.get("background_ratio", DEFAULT_BACKGROUND_RATIO),
                                        "prune.background_ratio", low=0.0)}
    for key, default in (("map_threshold", MAP_THRESHOLD), ("conf_threshold", YOLO_CONF),
                         ("iou_threshold", YOLO_IOU)):
        value = _number(section.get(key, default), f"prune.{key}", low=0.0, high=1.0, low_open=True)
        if value >= 1.0:
            raise UserInputError(f"config: 'prune.{key}' must be in (0, 1), got {value!r}")
        keys[key] = value
    return keys


def _task_map(value: Any, base: Path) -> Path | None:
    """The task map file of ``task: {map: file.json}`` (an input of the job), or None."""
    if isinstance(value, Mapping) and isinstance(value.get("map"), str):
        return _path(value["map"], "task.map", base)
    return None


def _task(value: Any, base: Path) -> Task | None:
    """``{classes: [3, 8]}``, ``{map: {group: [ids], ...}}`` or ``{map: file.json}`` (as --task-classes/--task-map)."""
    if value is None:
        return None
    section = _keys(value, "task", ("classes", "map"))
    if ("classes" in section) == ("map" in section):
        raise UserInputError("config: 'task' takes either 'classes: [3, 8]' or 'map: {group: [class ids], ...}' "
                             "(or a JSON file), not both and not neither")
    try:
        if "classes" in section:
            classes = _list(section["classes"], "task.classes")
            return Task(classes=tuple(_number(c, "task.classes", integer=True, low=0) for c in classes))
        if isinstance(section["map"], str):
            return load_task_map(_path(section["map"], "task.map", base))
        return task_from_map(section["map"], "'task.map'")
    except UserInputError as err:
        message = str(err)
        raise UserInputError(message if message.startswith("config:") else f"config: 'task': {message}") from None


def _bench(value: Any) -> BenchSpec:
    from pipeline.deployment.bench import MAX_ITERATIONS, MAX_ROUNDS, MAX_SECONDS

    section = _keys(value or {}, "bench", [f.name for f in BenchSpec.__dataclass_fields__.values()])
    threads = section.get("threads")
    return BenchSpec(
        backend=_choice(section.get("backend", "ort-cpu"), "bench.backend", BACKENDS),
        batch=tuple(_number(b, "bench.batch", integer=True, low=1) for b in _list(section.get("batch", 1),
                                                                                  "bench.batch")),
        threads=None if threads is None else _number(threads, "bench.threads", integer=True, low=1),
        warmup=_number(section.get("warmup", 1.0), "bench.warmup", low=0.0, high=MAX_SECONDS),
        duration=_number(section.get("duration", 3.0), "bench.duration", low=0.0, high=MAX_SECONDS),
        iterations=_number(section.get("iterations", 30), "bench.iterations", integer=True, low=1,
                           high=MAX_ITERATIONS),
        rounds=_number(section.get("rounds", 5), "bench.rounds", integer=True, low=1, high=MAX_ROUNDS),
        precision=_choice(section.get("precision", "fp32"), "bench.precision", PRECISIONS))


def _gates(value: Any) -> dict[str, float]:
    section = _keys(value or {}, "gates", list(GATES))
    gates = {}
    for name, limit in section.items():
        low, high = GATE_RANGES[name]
        gates[name] = _number(limit, f"gates.{name}", low=low, high=high)
    for name in POINTS_GATES:
        drop = gates.get(name)
        if drop is not None and 0 < drop < POINTS_FLOOR:
            unit = "accuracy points (1 = one point of top-1" if name == "max_top1_drop" else \
                f"points of the metric (1 = one point of {DENSE_GATES[name][1]}"
            raise UserInputError(f"config: 'gates.{name}' is in {unit}, as --max-drop and the report); {drop:g} "
                                 f"reads like the fraction spelling ({drop:g} = {100 * drop:g} points): write "
                                 f"{100 * drop:g}, or 0 for no change at all")
    return gates


def _mlflow(value: Any) -> MlflowSpec | None:
    if value is None or value is False:
        return None
    if value is True:
        return MlflowSpec()
    section = _keys(value, "mlflow", ("uri", "experiment"))
    uri = section.get("uri")
    return MlflowSpec(uri=None if uri is None else str(uri), experiment=str(section.get("experiment", "diprune")))


def config_from_dict(doc: Any, base: Path, *, source: Path | None = None) -> RunConfig:
    """Validate a parsed config (relative paths against ``base``); every error names its key."""
    top = _keys(doc, "(top level)", ("model", "data", "prune", "bench", "gates", "output", "mlflow", "task"))
    for key in ("model", "data", "prune", "output"):
        if key not in top:
            raise UserInputError(f"config: '{key}' is missing (see README, 'Use it in a pipeline')")
    calibration, evaluation = _data(top["data"], base)
    prune = _prune(top["prune"], base)
    task = _task(top.get("task"), base)
    task_map = _task_map(top.get("task"), base)
    if calibration is None and (prune.recover != "none" or any(getattr(SCORERS[m], "requires_stats", False)
                                                               for m in prune.methods)):
        raise UserInputError(f"config: 'data.calibration' is missing: methods {', '.join(prune.methods)} with "
                             f"recover {prune.recover} need calibration data (or use l1/l2/random with recover: none)")
    if calibration is None and prune.finetune_epochs:
        raise UserInputError("config: 'data.calibration' is missing: 'prune.finetune_epochs' trains on it")
    return RunConfig(model=_model(top["model"], base), calibration=calibration, evaluation=evaluation, prune=prune,
                     bench=_bench(top.get("bench")), gates=_gates(top.get("gates")),
                     output=_path(top["output"], "output", base), mlflow=_mlflow(top.get("mlflow")), task=task,
                     source=source, task_map=task_map)


def load_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and validate a YAML job file (see the module docstring)."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(read_text(path, "config file"))
    except yaml.YAMLError as err:
        raise UserInputError(f"config {path} is not valid YAML: {err}") from err
    return config_from_dict(doc, path.resolve().parent, source=path)
