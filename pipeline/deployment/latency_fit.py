"""Kernels tied to the graph and fitted: each profiled kernel matched to the original node or tensor it computes, its
widths read from the cost model, and ``t_k(w) = c0 + c1 u v + c2 u + c3 v`` fitted by non-negative least squares
(the method is in the :mod:`pipeline.deployment.latency_model` docstring).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any

import numpy as np
import onnx

from graph_ops.groups import ChannelGroupIndex
from pipeline.deployment.latency_model import KernelModel, Width, effective
from pipeline.deployment.timing import (
    CONV_LIKE,
    KernelProfile,
    KernelTime,
)
from pipeline.model.prepare import PreparedModel

UNMATCHED = "~unmatched"


_SEPARATORS = re.compile(r"[_/ ]")


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
