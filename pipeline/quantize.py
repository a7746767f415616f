"""INT8 after pruning: onnxruntime static quantization of the pruned and recovered model, and the four-way comparison.

:func:`quantize_int8` is ``onnxruntime.quantization.quantize_static`` in QDQ format: weights symmetric signed int8
per output channel, activations asymmetric unsigned int8 (the onnxruntime recommendation for x86 CPUs), MinMax
ranges calibrated on the first ``samples`` samples of the calibration data (the same data pruning calibrated and
recovered on). Per tensor ``x``, activation ``scale = (max - min) / 255``, ``zero_point = round(-min / scale)``;
per output channel ``c`` of a weight ``W``, ``scale_c = max|W_c| / 127``, zero point 0; onnxruntime's CPU kernels
then run the int8 Conv / Gemm / MatMul (QLinearConv, MatMulInteger) between the Q/DQ pairs. Nodes named in
``exclude`` stay fp32 (``nodes_to_exclude``: the mixed precision of :mod:`pipeline.mixed_precision`); ``only`` quantizes
just those nodes (``nodes_to_quantize``). The activation ranges are computed once per model and calibration set
(:class:`Int8Quantizer` keeps them in a cache file when onnxruntime supports ``calibration_cache_path``) and
reused by every quantization of that model.

:func:`compare_precisions` gives top-1 / top-5 and latency of the original fp32, original int8, pruned fp32 and
pruned int8 models, all four timed in the same interleaved rounds (:func:`pipeline.timing.interleaved_ratios`).
"""

from __future__ import annotations

import inspect
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx

from pipeline.errors import CalibrationError, UserInputError
from pipeline.latency_model import LatencyTarget
from pipeline.runtime import feed_batches, model_input_specs
from pipeline.timing import interleaved_ratios

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8",)
DEFAULT_SAMPLES = 256
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


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
        data: calibration data (:class:`pipeline.data.Dataset`).
        samples: calibration samples for the activation ranges.
        batch_size: samples per onnxruntime call during calibration.
        workdir: where the range cache lives (default: a temporary folder of this object's lifetime).
    """

    def __init__(self, model: onnx.ModelProto, data: Any, *, samples: int = DEFAULT_SAMPLES, batch_size: int = 32,
                 workdir: str | Path | None = None) -> None:
        """Keep the model and data; nothing is computed until the first :meth:`quantize`."""
        if data is None:
            raise UserInputError("INT8 quantization calibrates activation ranges: pass calibration data (--data)")
        if samples < 1:
            raise UserInputError(f"INT8 calibration needs at least one sample, got {samples}")
        self.model, self.data, self.samples, self.batch_size = model, data, samples, batch_size
        self._tmp = tempfile.TemporaryDirectory(prefix="diprune-int8-", dir=workdir)
        self.cache = Path(self._tmp.name) / "ranges.json"
        self.calibrations = 0

    def quantize(self, *, exclude: Iterable[str] = (), only: Iterable[str] | None = None) -> onnx.ModelProto:
        """The model in INT8 QDQ, ``exclude`` nodes kept fp32 (or only ``only`` quantized)."""
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        reader_type = type("DatasetReader", (_Reader, CalibrationDataReader), {})
        reader = reader_type(self.data, model_input_specs(self.model), self.samples, self.batch_size)
        options: dict[str, Any] = {}
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            options["calibration_cache_path"] = str(self.cache)
        self.calibrations += not self.cache.is_file()
        out = Path(self._tmp.name) / "model.int8.onnx"
        source = onnx.ModelProto()
        source.CopyFrom(self.model)  # quantize_static moves the weights of a ModelProto it is given to external data
        quiet = _NoPreprocessAdvice()
        logging.getLogger().addFilter(quiet)
        try:
            quantize_static(source, str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(exclude), nodes_to_quantize=None if only is None else list(only),
                            **options)
        except (ValueError, RuntimeError, onnx.checker.ValidationError) as err:
            raise CalibrationError(f"onnxruntime could not quantize the model to int8: {err}") from err
        finally:
            logging.getLogger().removeFilter(quiet)
        model = onnx.load(str(out))
        out.unlink(missing_ok=True)
        return model

    def close(self) -> None:
        """Remove the range cache."""
        self._tmp.cleanup()


def quantize_int8(model: onnx.ModelProto, data: Any, *, exclude: Iterable[str] = (), samples: int = DEFAULT_SAMPLES,
                  batch_size: int = 32) -> onnx.ModelProto:
    """One INT8 QDQ model of ``model`` calibrated on ``data`` (module docstring); ``exclude`` nodes stay fp32."""
    quantizer = Int8Quantizer(model, data, samples=samples, batch_size=batch_size)
    try:
        return quantizer.quantize(exclude=exclude)
    finally:
        quantizer.close()


PRECISION_ROWS = ("original_fp32", "original_int8", "pruned_fp32", "pruned_int8")


def compare_precisions(models: Mapping[str, onnx.ModelProto], evaluate: Callable[[onnx.ModelProto], dict],
                       on: LatencyTarget, *, rounds: int | None = None,
                       input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Accuracy (``evaluate(model)``: the held-out metrics) and latency of each model, all timed in the same
    interleaved rounds (``input_shapes``: the sizes of dynamic input dims, ``--input-shape``); ``speedup`` is
    relative to the first model (the original fp32)."""
    names = list(models)
    timing = interleaved_ratios([models[n].SerializeToString() for n in names], backend=on.backend, batch=on.batch,
                                threads=on.threads, rounds=rounds or on.rounds, round_seconds=on.round_seconds,
                                seed=on.seed, input_shapes=input_shapes)
    rows = {}
    for i, name in enumerate(names):
        metrics = evaluate(models[name])
        rows[name] = {"top1": metrics.get("top1"), "top5": metrics.get("top5"), "agreement": metrics.get("agreement"),
                      "latency_ms": timing.median_s[i] * 1e3, "speedup": 1.0 / timing.ratios[i]}
    return {"models": rows, "latency": {"backend": on.backend, "batch": on.batch, "threads": on.threads,
                                        "rounds": timing.rounds}}
