"""Latency model of a deployment target: what each channel group's width costs, measured on the real runtime.

Measurement (:func:`build_latency_model`). The canonical model and ``variants`` copies of it with random group
widths (every prunable group independently at a width of its ladder, the first channels kept: timing does not
depend on which) are run with onnxruntime's profiler on the chosen backend, batch and threads
(:func:`pipeline.deployment.timing.profile_kernels`). The profile lists the kernels the runtime really executes, after its own
fusions (Conv+Add+Relu, QuickGelu, ...) and layout changes (NCHWc), each with its median duration.

Kernels and widths. A kernel is tied to the original graph by its name: onnxruntime names fused and
layout-transformed kernels after an original node or tensor (``relu_38_nchwc``, ``fused /6/Gemm``,
``node_silu_3/QuickGeluFusion/``); the longest original node or tensor name that prefixes the kernel name at a
separator wins. A convolution-like kernel (:data:`pipeline.deployment.timing.CONV_LIKE`) is tied to the Conv / Gemm / MatMul
of the cost model (:class:`graph_ops.groups.CostTerm`) that it computes: the matched node itself, or one reached by
walking back from it through at most three non-costed nodes (the fused activation or residual Add), preferring the
one whose weight shape equals the kernel's. Its input and output widths are the term's, ``w_in = in_fixed + sum of
in-group widths`` and ``w_out`` likewise. Any other kernel reads the channel width of the matched tensor, ``w = sum
over its segments of length * w_g / size_g``. Kernels tied to the same node are summed (a variant may run a node
as other kernels: outside NCHWc, with reorders); unmatched kernels (layout reorders) are one fixed cost.

Per id ``k``, with widths rounded up to the runtime's channel block ``B`` (:func:`block_size`: 16 for onnxruntime
CPU with AVX-512, whose NCHWc kernels pad channels to it) and normalised by the full model's,
``u = ceil_B(w_in) / ceil_B(W_in)``, ``v = ceil_B(w_out) / ceil_B(W_out)``::

    t_k(w) = c0 + c1 * u * v + c2 * u + c3 * v,   c >= 0

fitted by non-negative least squares to the profiled variants (the full model included): ``c1`` is the
multiply-accumulate work, ``c2``/``c3`` the memory traffic of inputs and outputs, ``c0`` the fixed part. A channel
kernel has ``u = v``. The whole model is ``T(w) = a * sum_k t_k(w) + b``, with ``(a, b)`` least squares against the
whole-model latency (profiler off, interleaved rounds, :func:`pipeline.deployment.timing.interleaved_ratios`) of the same
variants: ``b`` is the per-call cost outside the kernels minus the profiler's per-kernel cost, ``a`` the rest.

Validation. Held-out variants, every prunable group at 0.75, 0.5 and 0.3 of its width (snapped to its ladder), are
timed in the same rounds; ``validation`` records their predicted and measured ratio to the full model and the
relative errors ``predicted / measured - 1``.

Cache. A model is a JSON file (format ``diprune.latency/1``) named by a key that hashes the backend, the device
(CPU model or the execution providers), the library versions, the threads, the batch, the precision, the ladder
settings, the block and the graph's fingerprint (:func:`graph_ops.proto.fingerprint`: structure and every layer's
shape); :func:`latency_model_for` loads it when present and measures (and writes) it otherwise.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserInputError

logger = logging.getLogger(__name__)

LATENCY_FORMAT = "diprune.latency/1"


@dataclass(frozen=True)
class Width:
    """A channel width as a linear function of group widths: ``fixed + sum coef * width[group]``."""

    fixed: float
    groups: tuple[tuple[str, float], ...] = ()
    full: float = 0.0  # the width in the unpruned model, where a consumer needs it (a part of a "terms" kernel)

    def at(self, widths: Mapping[str, int]) -> float:
        """The width under these group widths."""
        return self.fixed + sum(coef * widths[gid] for gid, coef in self.groups)


def effective(width: float, block: int) -> float:
    """A channel count as the runtime lays it out: rounded up to a multiple of ``block`` (NCHWc blocks)."""
    return float(math.ceil(width / block - 1e-9) * block) if block > 1 else width


def _uv(w_in: Width, w_out: Width, widths: Mapping[str, int], block: int, full: tuple[float, float]) -> np.ndarray:
    """``[0, u v, u, v]`` for one input / output width pair against its full widths."""
    u = effective(w_in.at(widths), block) / full[0] if full[0] else 1.0
    v = effective(w_out.at(widths), block) / full[1] if full[1] else 1.0
    return np.array([0.0, u * v, u, v])


@dataclass(frozen=True)
class KernelModel:
    """The kernels of one original node (or the unmatched ones): widths and fitted microseconds (module docstring).

    ``id``: the cost term (Conv/Gemm/MatMul) a convolution-like kernel computes, the original node another kernel
    was matched to, or ``"~unmatched"``; ``ops``: the onnxruntime ops seen under this id in the full model.
    ``parts`` (kind ``"terms"``: one TensorRT layer computing several cost terms, e.g. a Myelin foreign node): per
    term its input and output widths and its share ``s`` of the layer's MACs in the full model; the features are then
    the share-weighted sums ``[1, sum s u v, sum s u, sum s v]``.
    """

    id: str
    ops: tuple[str, ...]
    kind: str  # "term", "terms", "channel" or "fixed"
    w_in: Width
    w_out: Width
    full: tuple[float, float]
    block: int
    coef: tuple[float, float, float, float]
    parts: tuple[tuple[Width, Width, float], ...] = ()

    def features(self, widths: Mapping[str, int]) -> np.ndarray:
        """``[1, u v, u, v]`` of the module docstring (widths rounded up to the block)."""
        if self.parts:  # each part's full widths are its Widths' ``full``
            return sum((share * _uv(w_in, w_out, widths, self.block, (w_in.full, w_out.full))
                        for w_in, w_out, share in self.parts), np.zeros(4)) + np.array([1.0, 0.0, 0.0, 0.0])
        return np.array([1.0, *_uv(self.w_in, self.w_out, widths, self.block, self.full)[1:]])

    def time_us(self, widths: Mapping[str, int]) -> float:
        """Predicted microseconds under these group widths."""
        return float(self.features(widths) @ np.asarray(self.coef))

    @property
    def groups(self) -> frozenset[str]:
        """Groups whose width changes this kernel's time."""
        return frozenset(g for g, _ in (*self.w_in.groups, *self.w_out.groups))


@dataclass(frozen=True)
class LatencyModel:
    """Predicted latency of a model for any group widths, on one target (see the module docstring).

    Attributes:
        key: what the measurements depend on (backend, device, versions, threads, batch, precision, fingerprint).
        full_widths: every group's width in the unpruned model.
        kernels: the runtime's kernels with their fitted costs.
        scale, offset_us, exponent: whole-model calibration ``T = scale * (sum_k t_k) ** exponent + offset_us``.
        samples: the profiled variants: MACs fraction, kernel sum, measured and predicted ratio to the full model.
        validation: held-out variants: predicted and measured ratios and relative errors.
    """

    key: Mapping[str, Any]
    full_widths: Mapping[str, int]
    kernels: tuple[KernelModel, ...]
    scale: float
    offset_us: float
    exponent: float = 1.0
    samples: tuple[Mapping[str, Any], ...] = ()
    validation: Mapping[str, Any] = field(default_factory=dict)

    def widths(self, widths: Mapping[str, int] | None = None) -> dict[str, int]:
        """Full widths updated with ``widths``."""
        return {**self.full_widths, **(widths or {})}

    def kernel_us(self, widths: Mapping[str, int] | None = None) -> float:
        """Sum of the kernels' predicted microseconds."""
        full = self.widths(widths)
        return float(sum(k.time_us(full) for k in self.kernels))

    def predict_ms(self, widths: Mapping[str, int] | None = None) -> float:
        """Predicted whole-model latency in milliseconds."""
        return self.whole_us(self.kernel_us(widths)) / 1e3

    def whole_us(self, kernel_us: float) -> float:
        """Whole-model microseconds for a sum of kernel microseconds (the calibration)."""
        return self.scale * max(kernel_us, 0.0) ** self.exponent + self.offset_us

    def ratio(self, widths: Mapping[str, int] | None = None) -> float:
        """Predicted latency relative to the unpruned model."""
        return self.predict_ms(widths) / self.predict_ms()

    def by_group(self) -> dict[str, tuple[int, ...]]:
        """Group id -> indices of the kernels its width affects."""
        out: dict[str, list[int]] = {}
        for i, kernel in enumerate(self.kernels):
            for gid in kernel.groups:
                out.setdefault(gid, []).append(i)
        return {gid: tuple(idx) for gid, idx in sorted(out.items())}

    def group_table(self, ladders: Mapping[str, Sequence[int]]) -> dict[str, list[tuple[int, float]]]:
        """Per group: (width, predicted ms) at each width of its ladder, every other group at full width."""
        return {gid: [(int(w), round(self.predict_ms({gid: int(w)}), 4)) for w in ladder]
                for gid, ladder in sorted(ladders.items())}

    def errors(self) -> list[float]:
        """Relative prediction errors on the held-out variants."""
        return [float(e) for e in self.validation.get("errors", [])]

    def to_json(self) -> str:
        """The cache file's text."""
        doc = {"format": LATENCY_FORMAT, "key": dict(self.key), "full_widths": dict(self.full_widths),
               "scale": self.scale, "offset_us": self.offset_us, "exponent": self.exponent, "samples": [dict(s) for s in self.samples],
               "validation": dict(self.validation), "kernels": [asdict(k) for k in self.kernels]}
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LatencyModel:
        """Parse a cache file (its format is checked)."""
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != LATENCY_FORMAT:
            raise UserInputError("not a latency model file (format diprune.latency/1 expected)")

        def width(d: Mapping[str, Any]) -> Width:
            return Width(float(d["fixed"]), tuple((str(g), float(c)) for g, c in d["groups"]), float(d.get("full", 0)))

        kernels = tuple(KernelModel(k["id"], tuple(k["ops"]), k["kind"], width(k["w_in"]), width(k["w_out"]),
                                    tuple(k["full"]), int(k["block"]), tuple(k["coef"]),
                                    tuple((width(a), width(b), float(c)) for a, b, c in k.get("parts", ())))
                        for k in doc["kernels"])
        return cls(key=doc["key"], full_widths={g: int(w) for g, w in doc["full_widths"].items()}, kernels=kernels,
                   scale=float(doc["scale"]), offset_us=float(doc["offset_us"]), exponent=float(doc["exponent"]),
                   samples=tuple(doc["samples"]),
                   validation=doc["validation"])

    def summary(self) -> str:
        """One line: the target and the validation error."""
        errors = np.abs(self.errors())
        err = f", held-out error mean {errors.mean():.1%} max {errors.max():.1%}" if errors.size else ""
        return (f"latency model {self.key.get('backend')} batch {self.key.get('batch')} threads "
                f"{self.key.get('threads') or 'default'}: {len(self.kernels)} kernel groups, unpruned "
                f"{self.predict_ms():.3f} ms predicted{err}")


# ----------------------------------------------------------------------------------------------- kernel matching


# ----------------------------------------------------------------------------------------------- fitting


# ----------------------------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class LatencyTarget:
    """Where latency is measured (backend, batch, threads, precision) and how (variants, rounds, block)."""

    backend: str = "ort-cpu"
    batch: int = 1
    threads: int | None = None
    precision: str = "fp32"
    variants: int = 8
    rounds: int = 7
    round_seconds: float = 0.1
    block: int | None = None
    seed: int = 0


def block_size(target: LatencyTarget) -> int:
    """The channel block of the target's layout: ``target.block``, else for onnxruntime CPU the NCHWc block of MLAS
    (16 with AVX-512, 8 with AVX2; measured here: a 3x3 conv at 120 or 104 output channels takes as long as at 128
    or 112), else 1 (no rounding; GPU layouts not measured)."""
    if target.block is not None:
        return target.block
    if target.backend != "ort-cpu":
        return 1
    cpuinfo = Path("/proc/cpuinfo")
    flags: set[str] = set()
    if cpuinfo.is_file():
        line = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    return 16 if "avx512f" in flags else 8 if "avx2" in flags else 1


