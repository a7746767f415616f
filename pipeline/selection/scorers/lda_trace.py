"""``lda-trace``: LDA utility of the pre-decision layer traced back through the network (Tian, Arbel & Clark §3.2).

The paper ranks the neurons of the last hidden ("pre-decision") layer by their Fisher ratio ``v_j = σ_b²(j) /
σ_w²(j)`` (methods.md §2.2; :func:`pipeline.selection.scorers.lda.fisher_ratios`, with a small ridge) and traces that task
utility back to every earlier channel by a deconvolution of the selected activations (§2.3: transposed convolutions
with the forward filters, per image, max over positions). Here the tracing is done at the channel level, in
expectation over the calibration data **[INFERRED approximation, not the per-image deconvnet]**: a layer ``L`` with
weights ``W`` reads input channel ``c`` (mean absolute activation ``m_c``, from the calibration statistics) to make
output channel ``o``; the share of ``o`` that ``c`` accounts for is

    ``s_{o,c} = m_c Σ_taps |W[o, c, taps]| / Σ_{c'} m_{c'} Σ_taps |W[o, c', taps]|``

(Flatten -> Gemm: the ``H*W`` columns of a channel are its taps), and ``u_in[c] += Σ_o s_{o,c} u_out[o]``, which
conserves the total utility through each layer. Layers are visited from the output to the input (reverse
topological order), so a channel's utility is complete when its producer distributes it. A group made by several
producers (a residual stream) gives each of them an equal part of its utility; depthwise convolutions keep the
group, so utility passes them unchanged; concatenations lay their inputs' channels side by side (the analysis's
segments). Channels of groups the trace does not reach score 0. The pre-decision layer is the input of the last
Gemm/MatMul of the cost model (the classifier); when statistics of it are missing, its channels start with equal
utility.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from graph_ops.groups import ChannelGroupIndex
from pipeline.calibration.stats import CalibrationStats
from pipeline.selection.scorers.base import ChannelScores, ScoringContext, group_views, require_stats
from pipeline.selection.scorers.lda import DEFAULT_EPS, fisher_ratios


def _segments_values(index: ChannelGroupIndex, tensor: str, utility: Mapping[str, np.ndarray],
                     share: Mapping[str, float]) -> np.ndarray:
    """The utility of every channel of ``tensor`` (its segments' group channels, divided by the group's share)."""
    parts = [utility[s.group_id][s.start:s.start + s.length] * share.get(s.group_id, 1.0)
             for s in index.by_tensor.get(tensor, ())]
    return np.concatenate(parts) if parts else np.zeros(0)


def _add_to_segments(index: ChannelGroupIndex, tensor: str, values: np.ndarray,
                     utility: dict[str, np.ndarray]) -> None:
    for seg in index.by_tensor.get(tensor, ()):
        utility[seg.group_id][seg.start:seg.start + seg.length] += values[seg.offset:seg.offset + seg.length]


def _mean_activation(stats: CalibrationStats, tensor: str, channels: int) -> np.ndarray:
    """Mean |activation| per channel of a probed tensor (pooled means, averaged over cells); ones when unprobed."""
    probe = stats.probes.get(tensor)
    if probe is None or probe.n == 0 or probe.channels != channels:
        return np.ones(channels)
    return np.abs(probe.mean().reshape(channels, -1)).mean(axis=1)


def _contributions(weight: np.ndarray, axis: int, block: int, channels: int) -> np.ndarray:
    """``(C_in, O)``: Σ over taps (and the ``block`` columns of a flattened channel) of ``|W[o, c, taps]|``."""
    out_axis = 0 if axis != 0 else 1
    moved = np.moveaxis(np.abs(np.asarray(weight, np.float64)), (axis, out_axis), (0, 1))
    return moved.reshape(channels, block, moved.shape[1], -1).sum(axis=(1, 3))


def trace_utility(ctx: ScoringContext, eps: float) -> dict[str, np.ndarray]:
    """Per group, the traced utility of every channel (module docstring)."""
    stats = require_stats(ctx, "lda-trace")
    index = ctx.index
    utility = {g.id: np.zeros(g.size) for g in index.groups}
    classifier = [t for t in index.cost if t.op_type in ("Gemm", "MatMul")]
    for gid in classifier[-1].in_groups if classifier else ():
        group = index.by_id[gid]
        try:
            per_probe = [fisher_ratios(v.stats, eps)[v.blocks].mean(axis=1) for v in group_views(group, index, stats)]
        except Exception:  # the pre-decision features were not calibrated: equal utility
            per_probe = []
        utility[gid] += np.mean(per_probe, axis=0) if per_probe else np.ones(group.size)
    makers: dict[str, int] = {}
    for layer in ctx.layers:
        for seg in index.by_tensor.get(layer.output, ()):
            makers[seg.group_id] = makers.get(seg.group_id, 0) + 1
    share = {gid: 1.0 / n for gid, n in makers.items()}
    for layer in reversed(ctx.layers):
        u_out = _segments_values(index, layer.output, utility, share)
        if u_out.size == 0 or not np.any(u_out) or layer.weight not in ctx.weights:
            continue
        channels = sum(s.length for s in index.by_tensor.get(layer.input, ()))
        if not channels:
            continue
        contrib = _contributions(ctx.weights[layer.weight], layer.axis, layer.block, channels)
        contrib = contrib * _mean_activation(stats, layer.input, channels)[:, None]
        totals = contrib.sum(axis=0)
        shares = np.divide(contrib, totals, out=np.zeros_like(contrib), where=totals > 0)
        _add_to_segments(index, layer.input, shares @ u_out, utility)
    return utility


@dataclass(frozen=True)
class LDATraceScorer:
    """Pre-decision Fisher ratios traced back to every channel (module docstring)."""

    name: str = "lda-trace"
    requires_stats: bool = True
    requires_labels: bool = True

    def __call__(self, ctx: ScoringContext) -> ChannelScores:
        """Score every prunable group; see the module docstring."""
        eps = ctx.param("eps", DEFAULT_EPS)
        utility = trace_utility(ctx, eps)
        scores = {g.id: utility[g.id] for g in ctx.prunable()}
        return ChannelScores(method=self.name, params={"eps": eps}, scores=scores, model_sha256=ctx.model_sha256)
