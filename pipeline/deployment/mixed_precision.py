"""DI-guided mixed precision: keep in fp32 the layers whose INT8 error loses the most discriminant information.

Sensitivity of a weight layer ``L`` (Conv / Gemm / MatMul), one registry entry per ranking:

* ``di`` (the DI paper's use of the criterion for precision): the model with only ``L`` quantized to INT8
  (:meth:`pipeline.deployment.quantize.Int8Quantizer.quantize` with ``only=[L]``: its weights per channel, its input and output
  activations) is run on ``samples`` calibration samples, and the Discriminant Information of its class scores
  ``z`` (the first output, ``K`` features) is compared with the fp32 model's::

      DI(z) = tr[(S + rho I)^-1 S_B]        (methods.md §1; pipeline.selection.scorers.di.di_value)
      sensitivity(L) = 1 - DI_L(z) / DI_fp32(z)

  i.e. the fraction of the class separation at the decision that ``L``'s INT8 error destroys.
* ``magnitude`` (a data-free baseline): the relative error of ``L``'s weights under the same per-channel
  symmetric INT8 quantization, ``||W - Q(W)|| / ||W||`` with ``Q(W)_c = round(W_c / s_c) s_c``,
  ``s_c = max|W_c| / 127``.

Search (:func:`search_mixed_precision`): layers sorted by decreasing sensitivity; ``k`` of them are kept fp32
(``nodes_to_exclude``), the rest quantized; the held-out top-1 must stay within ``max_top1_drop`` accuracy points of
the fp32 model being quantized. ``k = 0`` (uniform INT8) first, then ``k = 1, 2, 4, ...`` until one passes, then a
bisection between the last failing and the first passing ``k``. Accuracy need not be monotone in ``k``, so this is a
search, not a proof; every tried ``k`` is returned. ``k = n`` (every layer fp32) always passes; when only it
passes, the result says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.calibration.stats import ProbeStats
from pipeline.deployment.quantize import Int8Quantizer, weight_layers
from pipeline.errors import UserInputError
from pipeline.model.runtime import model_input_specs, open_session, stream
from pipeline.selection.scorers.di import di_value

logger = logging.getLogger(__name__)

DEFAULT_SAMPLES = 512


def head(data: Any, n: int) -> Any:
    """The first ``n`` samples of a :class:`pipeline.data.datasets.Dataset`."""
    if n >= data.num_samples:
        return data
    labels = None if data.labels is None else data.labels[:n]
    return replace(data, name=f"{data.name} (first {n})", num_samples=n, labels=labels)


def logits_di(model: onnx.ModelProto, data: Any, *, batch_size: int = 128) -> float:
    """DI of the model's first output (class scores) over a labelled dataset."""
    if data.labels is None:
        raise UserInputError("DI-guided mixed precision needs labelled calibration data")
    session = open_session(model.SerializeToString(), "auto")
    stats = None
    for batch in stream(session, data, None, model_input_specs(model), batch_size=batch_size,
                        stage="int8 sensitivity"):
        z = batch.outputs[0].reshape(batch.size, -1)
        stats = stats or ProbeStats.empty(z.shape[1], 1, max(int(data.labels.max()) + 1, z.shape[1]))
        stats = stats.update(z, batch.labels)
    return di_value(stats)


def di_sensitivity(quantizer: Int8Quantizer, layers: Sequence[str], *, samples: int = DEFAULT_SAMPLES
                   ) -> dict[str, float]:
    """``1 - DI_L / DI_fp32`` of the class scores for each layer quantized alone (module docstring)."""
    data = head(quantizer.data, samples)
    full = logits_di(quantizer.model, data)
    if full <= 0:
        raise UserInputError("the fp32 model's class scores carry no discriminant information on the calibration "
                             "data (one class only?); DI-guided mixed precision needs several classes")
    return {name: 1.0 - logits_di(quantizer.quantize(only=[name]), data) / full for name in layers}


def magnitude_sensitivity(quantizer: Int8Quantizer, layers: Sequence[str], **_: Any) -> dict[str, float]:
    """Relative per-channel INT8 error of each layer's weights (module docstring)."""
    weights = {init.name: init for init in quantizer.model.graph.initializer}
    nodes = {n.name: n for n in quantizer.model.graph.node}
    out = {}
    for name in layers:
        w = numpy_helper.to_array(weights[nodes[name].input[1]]).astype(np.float64)
        axis = 1 if nodes[name].op_type == "MatMul" else 0  # MatMul weights are (K, N): channels on axis 1
        flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        scale = np.abs(flat).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        error = flat - np.clip(np.round(flat / scale), -127, 127) * scale
        out[name] = float(np.linalg.norm(error) / max(np.linalg.norm(flat), 1e-30))
    return out


SENSITIVITIES: dict[str, Callable[..., dict[str, float]]] = {
    "di": di_sensitivity,
    "magnitude": magnitude_sensitivity,
}
"""Ranking name -> sensitivity function (the registry of ``--int8-ranking``)."""


def fewest_passing(n: int, passes: Callable[[int], bool]) -> int:
    """The smallest ``k`` in ``0..n`` with ``passes(k)``, assuming ``passes(n)`` (not called): ``0``, then
    ``1, 2, 4, ...`` until one passes, then bisection between the last failing and the first passing ``k``."""
    low, k = -1, 0
    while k < n and not passes(k):
        low, k = k, 1 if k == 0 else min(2 * k, n)
    high = min(k, n)
    while high - low > 1:
        mid = (low + high) // 2
        if passes(mid):
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True)
class MixedPrecision:
    """The result of a mixed-precision search: the INT8 model, the layers kept fp32 and what was tried."""

    ranking: str
    model: onnx.ModelProto
    fp32_layers: tuple[str, ...]
    top1: float
    reference_top1: float
    met: bool
    sensitivity: Mapping[str, float]
    tried: tuple[Mapping[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        """What the report records (the model itself is written beside it)."""
        return {"ranking": self.ranking, "fp32_layers": list(self.fp32_layers), "top1": self.top1,
                "reference_top1": self.reference_top1, "met": self.met,
                "sensitivity": {k: round(v, 6) for k, v in self.sensitivity.items()}, "tried": list(self.tried)}


def search_mixed_precision(quantizer: Int8Quantizer, evaluate: Callable[[onnx.ModelProto], float],
                           max_top1_drop: float, *, ranking: str = "di",
                           samples: int = DEFAULT_SAMPLES) -> MixedPrecision:
    """The fewest fp32 layers (in ``ranking`` order) whose INT8 model keeps top-1 within ``max_top1_drop`` points of
    the fp32 model (module docstring); ``evaluate(model)`` returns held-out top-1 as a fraction."""
    if ranking not in SENSITIVITIES:
        raise UserInputError(f"unknown INT8 ranking {ranking!r}; choose one of {', '.join(SENSITIVITIES)}")
    if max_top1_drop < 0:
        raise UserInputError(f"--max-top1-drop is a number of accuracy points >= 0, got {max_top1_drop}")
    layers = weight_layers(quantizer.model)
    sensitivity = SENSITIVITIES[ranking](quantizer, layers, samples=samples)
    order = sorted(layers, key=lambda name: (-sensitivity[name], name))
    reference = evaluate(quantizer.model)
    bound = reference - max_top1_drop / 100.0
    results: dict[int, tuple[float, onnx.ModelProto]] = {}

    def trial(k: int) -> bool:
        if k not in results:
            model = quantizer.quantize(exclude=order[:k]) if k < len(order) else quantizer.model
            results[k] = (evaluate(model), model)
            logger.info("mixed precision (%s): %d fp32 layers -> top-1 %.4f (bound %.4f)", ranking, k,
                        results[k][0], bound)
        return results[k][0] >= bound - 1e-12

    high = fewest_passing(len(order), trial)
    top1, model = results.get(high) or (reference, quantizer.model)
    tried = tuple({"fp32_layers": k, "top1": results[k][0], "within": results[k][0] >= bound - 1e-12}
                  for k in sorted(results))
    return MixedPrecision(ranking, model, tuple(order[:high]), top1, reference, high < len(order), sensitivity, tried)
