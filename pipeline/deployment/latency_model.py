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

import hashlib
import json
import logging
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graph_ops.groups import ChannelGroupIndex
from graph_ops.io import atomic_write_bytes, check_writable_dir
from graph_ops.prune import apply_plan
from pipeline.deployment.bench import machine_info
from pipeline.deployment.timing import (
    CONV_LIKE,
    KernelProfile,
    KernelTime,
    interleaved_ratios,
    profile_kernels,
)
from pipeline.errors import UserInputError
from pipeline.model.prepare import PreparedModel
from pipeline.selection.widths import _ladder

logger = logging.getLogger(__name__)

LATENCY_FORMAT = "diprune.latency/1"
VALIDATION_FRACTIONS = (0.75, 0.5, 0.3)
UNMATCHED = "~unmatched"
_SEPARATORS = re.compile(r"[_/ ]")


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


def _match(kernel: str, names: Mapping[str, int]) -> str | None:
    """The longest original node or tensor name that prefixes the kernel name at a separator."""
    name = kernel[len("fused "):] if kernel.startswith("fused ") else kernel
    cuts = [len(name), *[m.start() for m in _SEPARATORS.finditer(name)][::-1]]
    return next((name[:cut] for cut in cuts if name[:cut] in names), None)


def _tensor_width(index: ChannelGroupIndex, tensor: str) -> Width:
    sizes = {g.id: g.size for g in index.groups}
    segments = index.by_tensor.get(tensor)
    if segments:
        return Width(0.0, tuple((s.group_id, s.length / sizes[s.group_id]) for s in segments))
    shape = index.shapes.get(tensor)
    dim = shape[1] if shape and len(shape) > 1 and shape[1] else 1
    return Width(float(dim))


@dataclass(frozen=True)
class _Graph:
    """What kernel matching reads of the canonical model (built once per latency model)."""

    model: onnx.ModelProto
    index: ChannelGroupIndex
    names: Mapping[str, int]
    producer: Mapping[str, int]
    terms: Mapping[str, Any]
    weights: Mapping[str, tuple[int, ...]]

    @classmethod
    def of(cls, prepared: PreparedModel) -> _Graph:
        names: dict[str, int] = {}
        producer: dict[str, int] = {}
        for i, node in enumerate(prepared.model.graph.node):
            for tensor in node.output:
                producer[tensor] = i
                names.setdefault(tensor, i)
            if node.name:
                names[node.name] = i
        return cls(prepared.model, prepared.index, names, producer, {t.node: t for t in prepared.index.cost},
                   {init.name: tuple(init.dims) for init in prepared.model.graph.initializer})

    def anchor(self, start: int, weight: tuple[int, ...] | None) -> str | None:
        """The costed node a convolution-like kernel computes (module docstring)."""
        found, frontier, seen = [], [start], {start}
        for _ in range(4):
            nxt = []
            for i in frontier:
                node = self.model.graph.node[i]
                if node.name in self.terms:
                    found.append(node)
                    continue
                for tensor in node.input:
                    j = self.producer.get(tensor)
                    if j is not None and j not in seen:
                        seen.add(j)
                        nxt.append(j)
            frontier = nxt
        exact = [n for n in found if len(n.input) > 1 and self.weights.get(n.input[1]) == weight]
        pick = (exact or found or [None])[0]
        return None if pick is None else pick.name

    def term_widths(self, term: str) -> tuple[Width, Width]:
        """Input and output widths of a cost term (Conv / Gemm / MatMul node)."""
        t = self.terms[term]
        return (Width(float(t.in_fixed), tuple((g, 1.0) for g in t.in_groups)),
                Width(float(t.out_fixed), tuple((g, 1.0) for g in t.out_groups)))

    def identify(self, kernel: KernelTime) -> Identity:
        """What one profiled onnxruntime kernel computes."""
        matched = _match(kernel.name, self.names)
        if matched is None:
            return Identity(UNMATCHED, "fixed", Width(1.0), Width(1.0))
        node = self.model.graph.node[self.names[matched]]
        term = self.anchor(self.names[matched], kernel.weight_shape) if kernel.op in CONV_LIKE else None
        if term is not None:
            return Identity(term, "term", *self.term_widths(term))
        width = _tensor_width(self.index, matched if matched in self.producer else node.output[0])
        return Identity(node.name or f"{node.op_type}@{self.names[matched]}", "channel", width, width)

    def identify_nodes(self, nodes: Sequence[str], prefix: str = "") -> Identity:
        """What a layer computing these original nodes (names; unknown ones ignored) computes: the one cost term
        among them (``term``), several (``terms``, widths weighted by their MACs share in the full model), else the
        channel width of the first node's output (``channel``), else a fixed cost. ``prefix`` names a kind of layer
        apart from the nodes' own (``reformat:``: a copy into the layer's input layout)."""
        known = [n for n in dict.fromkeys(nodes) if n in self.names]
        if not known:
            return Identity(UNMATCHED, "fixed", Width(1.0), Width(1.0))
        terms = [n for n in known if n in self.terms]
        if len(terms) == 1:
            return Identity(prefix + terms[0], "term", *self.term_widths(terms[0]))
        if terms:
            full = self.index.full_widths()
            macs = np.array([max(self.terms[t].macs(full), 1e-30) for t in terms])
            parts = []
            for t, share in zip(terms, macs / macs.sum(), strict=True):
                w_in, w_out = self.term_widths(t)
                parts.append((replace(w_in, full=w_in.at(full)), replace(w_out, full=w_out.at(full)), float(share)))
            big = terms[int(np.argmax(macs))]
            return Identity(prefix + "+".join(terms), "terms", *self.term_widths(big), tuple(parts))
        node = self.model.graph.node[self.names[known[0]]]
        width = _tensor_width(self.index, known[0] if known[0] in self.producer else node.output[0])
        return Identity(prefix + (node.name or known[0]), "channel", width, width)

    def kernel_times(self, profile: KernelProfile) -> dict[str, tuple[float, tuple[str, ...], Identity]]:
        """Profiled microseconds summed per id, with the ops and the identity of the id."""
        return sum_times((self.identify(kernel), kernel.op, kernel.median_us) for kernel in profile.kernels)


@dataclass(frozen=True)
class Identity:
    """What a profiled kernel or layer computes: its id (a cost term, an original node, ``~unmatched``), kind
    (``term``, ``terms``, ``channel``, ``fixed``), input and output widths, and the parts of a ``terms`` layer."""

    id: str
    kind: str
    w_in: Width
    w_out: Width
    parts: tuple[tuple[Width, Width, float], ...] = ()


def sum_times(items: Iterable[tuple[Identity, str, float]]) -> dict[str, tuple[float, tuple[str, ...], Identity]]:
    """``(identity, op, microseconds)`` summed per id (a node run as several kernels counts once)."""
    out: dict[str, tuple[float, tuple[str, ...], Identity]] = {}
    for ident, op, us in items:
        if ident.id in out:
            total, ops, first = out[ident.id]
            out[ident.id] = (total + us, tuple(dict.fromkeys((*ops, op))), first)
        else:
            out[ident.id] = (us, (op,), ident)
    return out


# ----------------------------------------------------------------------------------------------- fitting


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a few columns: the best of the least-squares fits on every column subset whose
    coefficients are all >= 0 (exact for the 4 features used here)."""
    best, best_err = np.zeros(x.shape[1]), float(np.sum(y ** 2))
    for size in range(1, x.shape[1] + 1):
        for cols in combinations(range(x.shape[1]), size):
            coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if np.any(coef < 0):
                continue
            err = float(np.sum((x[:, cols] @ coef - y) ** 2))
            if err < best_err - 1e-12:
                best = np.zeros(x.shape[1])
                best[list(cols)] = coef
                best_err = err
    return best


def _fit(graph: _Graph, observations: list[tuple[dict[str, int], KernelProfile]], block: int) -> list[KernelModel]:
    """One kernel model per id of the full model's profile, fitted over every profiled variant."""
    return fit_kernels([graph.kernel_times(profile) for _, profile in observations], [w for w, _ in observations],
                       graph.index.full_widths(), block)


def fit_kernels(times: Sequence[Mapping[str, tuple[float, tuple[str, ...], Identity]]],
                widths: Sequence[Mapping[str, int]], full: Mapping[str, int], block: int) -> list[KernelModel]:
    """One kernel model per id of the first (full) model's times (:meth:`_Graph.kernel_times`), fitted by
    non-negative least squares over every variant whose times have that id."""
    out = []
    for kid, (_, ops, ident) in times[0].items():
        shell = KernelModel(kid, ops, ident.kind, ident.w_in, ident.w_out,
                            (effective(ident.w_in.at(full), block), effective(ident.w_out.at(full), block)), block,
                            (0.0,) * 4, ident.parts)
        seen = [(w, by_id[kid][0]) for w, by_id in zip(widths, times, strict=True) if kid in by_id]
        y = np.array([t for _, t in seen])
        if ident.kind == "fixed":
            coef = np.array([float(np.median(y)), 0.0, 0.0, 0.0])
        else:
            coef = nnls(np.array([shell.features(w) for w, _ in seen]), y)
        out.append(replace(shell, coef=tuple(float(c) for c in coef)))
    return out


def _calibrate(kernel_us: np.ndarray, whole_us: np.ndarray) -> tuple[float, float, float]:
    """``(a, b, g)`` of ``whole = a * kernel**g + b``: the better (in squared log error) of the linear least-squares
    fit (``g = 1``; ``b`` may be negative: the profiler adds a fixed cost to every kernel) and the power law
    (``b = 0``, ``log whole = log a + g log kernel``: on a loaded machine a long run is preempted more often than a
    short one, so whole-model time grows faster than the kernels' medians)."""
    fits = []
    x = np.stack([kernel_us, np.ones_like(kernel_us)], axis=1)
    (a, b), *_ = np.linalg.lstsq(x, whole_us, rcond=None)
    if a > 0 and a * kernel_us.min() + b > 0.1 * whole_us.min():
        fits.append((float(a), float(b), 1.0))
    fits.append((float(np.median(whole_us / kernel_us)), 0.0, 1.0))
    if len(kernel_us) > 2 and np.ptp(np.log(kernel_us)) > 0:
        g, log_a = np.polyfit(np.log(kernel_us), np.log(whole_us), 1)
        if g > 0:
            fits.append((float(np.exp(log_a)), 0.0, float(g)))
    return min(fits, key=lambda f: float(np.sum(np.log((f[0] * kernel_us ** f[2] + f[1]) / whole_us) ** 2)))


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


def table_key(prepared: PreparedModel, target: LatencyTarget, round_to: int, min_channels: int) -> dict[str, Any]:
    """What a latency model depends on (module docstring, "Cache")."""
    from graph_ops.proto import fingerprint

    machine = machine_info()
    device = machine["cpu"] if target.backend == "ort-cpu" else ",".join(machine["ort_available_providers"])
    return {"backend": target.backend, "device": device, "versions": machine["versions"],
            "threads": target.threads, "batch": target.batch, "precision": target.precision,
            "round_to": round_to, "min_channels": min_channels, "variants": target.variants,
            "block": block_size(target), "fingerprint": fingerprint(prepared.model)}


def key_digest(key: Mapping[str, Any]) -> str:
    """Short stable digest of a key (the cache file's name)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def model_ladders(index: ChannelGroupIndex, round_to: int, min_channels: int) -> dict[str, list[int]]:
    """The width ladder of every prunable group that has more than one width."""
    ladders = {g.id: _ladder(g.size, round_to, min_channels) for g in index.groups if g.prunable}
    return {gid: ladder for gid, ladder in ladders.items() if len(ladder) > 1}


def _variant_widths(ladders: Mapping[str, list[int]], target: LatencyTarget) -> list[dict[str, int]]:
    """The full model, ``target.variants`` random width assignments, then the validation fractions."""
    rng = np.random.default_rng(target.seed)
    random = [{gid: int(ladder[rng.integers(len(ladder))]) for gid, ladder in ladders.items()}
              for _ in range(target.variants)]
    uniform = [{gid: min(ladder, key=lambda w, f=f, size=ladder[0]: abs(w - f * size))
                for gid, ladder in ladders.items()} for f in VALIDATION_FRACTIONS]
    return [{}, *random, *uniform]


def variant_model(prepared: PreparedModel, widths: Mapping[str, int]) -> bytes:
    """The serialized model with each group cut to its first ``widths[group]`` channels."""
    keep = {gid: tuple(range(w)) for gid, w in widths.items() if w < prepared.index.by_id[gid].size}
    return prepared.at_sizes(apply_plan(prepared.model, prepared.index, keep, verify=False))


def _whole_ratios(prepared: PreparedModel, all_widths: list[dict[str, int]], target: LatencyTarget,
                  chunk: int = 4, bar: Any = None) -> tuple[list[float], float]:
    """Whole-model latency of every variant relative to the first (full) model, in chunks of interleaved rounds that
    each include the full model (models are made per chunk: bounded memory for large models), and the full model's
    median microseconds (over the chunks)."""
    full = variant_model(prepared, all_widths[0])
    ratios, full_us = [1.0], []
    for start in range(1, len(all_widths), chunk - 1):
        part = [variant_model(prepared, w) for w in all_widths[start:start + chunk - 1]]
        measured = interleaved_ratios([full, *part], backend=target.backend, batch=target.batch,
                                      threads=target.threads, rounds=target.rounds,
                                      round_seconds=target.round_seconds, seed=target.seed)
        ratios += list(measured.ratios[1:])
        full_us.append(measured.median_s[0] * 1e6)
        if bar is not None:
            bar.update(len(part))
    return ratios, float(np.median(full_us))


def _macs_fraction(index: ChannelGroupIndex, widths: Mapping[str, int]) -> float:
    return index.predict(widths)[0] / index.predict()[0]


def build_latency_model(prepared: PreparedModel, target: LatencyTarget | None = None, *, round_to: int = 8,
                        min_channels: int = 8, progress: bool = False) -> LatencyModel:
    """Measure and fit the latency model of a prepared model on ``target`` (module docstring); ``progress``: a tqdm
    bar on stderr over the variants profiled and timed (the build takes tens of seconds to minutes).

    Raises:
        UserInputError: a precision other than fp32, a backend that is not onnxruntime or not active here, or a
            model without a prunable group.
    """
    target = target or LatencyTarget()
    if target.precision != "fp32":
        raise UserInputError(f"the latency model measures fp32 models, not {target.precision}; the INT8 latency of a "
                             "pruned model is measured after quantization (--quantize int8)")
    index = prepared.index
    ladders = model_ladders(index, round_to, min_channels)
    if not ladders:
        raise UserInputError("the model has no group that can be pruned at these widths; nothing to model")
    all_widths = _variant_widths(ladders, target)
    fit_count = 1 + target.variants
    observations = []
    from tqdm import tqdm

    with tqdm(total=fit_count + len(all_widths) - 1, desc="latency model", unit="variant", file=sys.stderr,
              disable=not progress) as bar:
        for i, widths in enumerate(all_widths[:fit_count]):
            profile = profile_kernels(variant_model(prepared, widths), backend=target.backend, batch=target.batch,
                                      threads=target.threads, seed=target.seed)
            observations.append((index.full_widths() | widths, profile))
            logger.info("latency model: variant %d/%d profiled (%.3f ms)", i + 1, fit_count, profile.run_us / 1e3)
            bar.update(1)
        ratios, full_us = _whole_ratios(prepared, all_widths, target, bar=bar)
    kernels = tuple(_fit(_Graph.of(prepared), observations, block_size(target)))
    provisional = LatencyModel({}, index.full_widths(), kernels, 1.0, 0.0)
    kernel_sums = np.array([provisional.kernel_us(w) for w, _ in observations])
    scale, offset, exponent = _calibrate(kernel_sums, np.array(ratios[:fit_count]) * full_us)
    model = LatencyModel(table_key(prepared, target, round_to, min_channels), index.full_widths(), kernels, scale,
                         offset, exponent)
    samples = tuple({"macs_fraction": round(_macs_fraction(index, w), 4), "kernel_us": round(float(s), 1),
                     "measured_ratio": round(float(r), 4), "predicted_ratio": round(model.ratio(w), 4)}
                    for (w, _), s, r in zip(observations, kernel_sums, ratios, strict=False))
    predicted = [model.ratio(w) for w in all_widths[fit_count:]]
    measured = ratios[fit_count:]
    validation = {"fractions": list(VALIDATION_FRACTIONS),
                  "macs_fraction": [round(_macs_fraction(index, w), 4) for w in all_widths[fit_count:]],
                  "predicted_ratio": [round(p, 4) for p in predicted], "measured_ratio": [round(m, 4) for m in measured],
                  "errors": [round(p / m - 1, 4) for p, m in zip(predicted, measured, strict=True)]}
    model = replace(model, samples=samples, validation=validation)
    logger.info(model.summary())
    return model


def latency_model_for(prepared: PreparedModel, target: LatencyTarget, cache_dir: str | Path | None, *,
                      round_to: int = 8, min_channels: int = 8, progress: bool = False) -> LatencyModel:
    """The cached latency model of this model on this target, or a new measurement (written to ``cache_dir``).

    One process builds an entry at a time: the entry's lock (``<entry>.lock``, :mod:`pipeline.locks`) is held
    while it is looked up, built and written; a second process asking for the same entry waits for it and then
    reuses it instead of measuring it again (and both measuring at once would also disturb each other's timings).
    """
    key = json.loads(json.dumps(table_key(prepared, target, round_to, min_channels), default=str))
    if cache_dir is None:
        return build_latency_model(prepared, target, round_to=round_to, min_channels=min_channels, progress=progress)
    from pipeline.locks import exclusive_lock

    path = check_writable_dir(cache_dir, "latency model cache") / f"latency-{key_digest(key)}.json"
    with exclusive_lock(path.with_name(f"{path.name}.lock"), f"latency model cache entry {path}", wait=True,
                        on_wait=f"another diprune is building the latency model {path.name}; waiting to reuse it"):
        return _cached_latency_model(prepared, target, path, key, round_to=round_to, min_channels=min_channels,
                                     progress=progress)


def _cached_latency_model(prepared: PreparedModel, target: LatencyTarget, path: Path, key: Any, *, round_to: int,
                          min_channels: int, progress: bool) -> LatencyModel:
    """:func:`latency_model_for` with the entry locked."""
    if path.is_file():
        try:
            model = LatencyModel.from_json(path.read_text())
        except (ValueError, KeyError, TypeError, UserInputError) as err:
            logger.warning("ignoring unreadable latency model cache %s (%s); measuring again", path, err)
        else:
            if dict(model.key) == key:
                logger.info("latency model reused from %s", path)
                return model
    model = build_latency_model(prepared, target, round_to=round_to, min_channels=min_channels, progress=progress)
    atomic_write_bytes(path, model.to_json().encode())
    return model
