"""Data that channel analysis produces and every later stage reads.

A *channel space* is what axis 1 of an activation tensor carries. Analysis describes each tensor's channel axis as a
run of :class:`Segment` s, each a contiguous slice of one :class:`ChannelGroup` (a concat output holds several
segments, a residual stream one). Channels of one group must be removed together, everywhere the group appears.

The index is also *the analysis* every later stage takes instead of analysing again: it records the :class:`Edit` s a
plan implies (which initializer, along which axis, driven by which tensor's kept channels), the channel-major
flattened inputs of dense heads, the static shapes analysis saw, and a fingerprint of the graph it was computed from
(:func:`graph_ops.proto.fingerprint`), which surgery, the mask oracle and recovery check before using it.

The cost model (:class:`CostTerm`) writes the MACs and the parameter count of every costed node as
``coeff * (in_fixed + sum of in-group widths) * (out_fixed + sum of out-group widths) / divisor``, which is exact for
Conv, ConvTranspose, Gemm and MatMul (depthwise: ``in_fixed = 1``; Gemm after Flatten: ``coeff`` holds ``H*W``;
grouped Conv with ``G`` conv groups: ``divisor = G``, exact because a valid plan keeps widths that are multiples of
``G`` on both sides, so the product is an integer multiple of ``G`` and the float division is exact). The
planner uses it to predict the cost of a plan without rewriting the graph; tests check the prediction against the
counter run on the pruned graph.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from graph_ops.errors import PlanValidationError


@dataclass(frozen=True)
class Segment:
    """``length`` channels of group ``group_id`` starting at its channel ``start``, laid at ``offset`` of a tensor."""

    group_id: str
    offset: int
    start: int
    length: int


@dataclass(frozen=True)
class Edit:
    """One change a plan implies, driven by the kept channels of ``tensor`` (expanded by ``block``).

    Attributes:
        kind: ``"take"`` (slice input ``pos`` of node ``node`` along ``axis``), ``"group"`` (depthwise ``group``
            attribute), ``"split"`` (Split sizes), ``"slice"`` (Slice starts/ends on axis 1), ``"vector"`` (entry
            ``axis`` of the integer vector at input ``pos``: Reshape shape, Resize sizes).
        node: index of the node in ``graph.node``.
        tensor: the tensor whose channel layout gives the kept indices.
        role: ``"consumer"`` for exit weights that read the channels (what the mask zeroes), else ``"producer"``.
        pos: input position of the constant edited.
        axis: axis of the constant (or entry index for ``"vector"``).
        block: each channel stands for ``block`` consecutive entries (Flatten -> Gemm: ``H*W``).
    """

    kind: str
    node: int
    tensor: str
    role: str = "producer"
    pos: int = 0
    axis: int = 0
    block: int = 1


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together.

    Attributes:
        id: stable id: the first producer output tensor name in topological order.
        size: number of channels.
        producers: names of the nodes whose outputs create these channels (Conv, Gemm, ...).
        consumers: names of the nodes whose weights read these channels (their input slices shrink).
        probes: tensors the exit consumers read (post-BN, post-activation): what calibration measures.
        frozen: ``None`` when prunable, else a readable reason (``"unsupported consumer Transpose at node_12"``).
        blocks: the channels come in ``blocks`` equal consecutive blocks (the conv groups of a grouped
            convolution that reads or writes them) and a plan must keep the same number in every block, so that
            the pruned convolution is again a valid grouped convolution; 1 for no constraint.
    """

    id: str
    size: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    probes: tuple[str, ...]
    frozen: str | None = None
    blocks: int = 1

    @property
    def prunable(self) -> bool:
        """True when the group may lose channels."""
        return self.frozen is None


@dataclass(frozen=True)
class CostTerm:
    """One node's MACs and params as bilinear functions of group widths (see the module docstring)."""

    node: str
    op_type: str
    macs_coeff: float
    params_coeff: float
    in_fixed: int
    in_groups: tuple[str, ...]
    out_fixed: int
    out_groups: tuple[str, ...]
    bias_params: float = 0.0  # params that scale with the output width only (bias): bias_params * out_width
    divisor: int = 1  # conv groups of a grouped convolution: MACs and weights are divided by it (exactly)
    macs_known: bool = True  # False when a spatial size was not static (the MACs are then unknown, not 0)

    def widths(self, width: Mapping[str, int]) -> tuple[int, int]:
        """Input and output widths of the node under the given group widths."""
        w_in = self.in_fixed + sum(width[g] for g in self.in_groups)
        w_out = self.out_fixed + sum(width[g] for g in self.out_groups)
        return w_in, w_out

    def macs(self, width: Mapping[str, int]) -> float:
        """MACs of the node under the given group widths."""
        w_in, w_out = self.widths(width)
        return self.macs_coeff * w_in * w_out / self.divisor

    def params(self, width: Mapping[str, int]) -> float:
        """Parameters of the node under the given group widths."""
        w_in, w_out = self.widths(width)
        return self.params_coeff * w_in * w_out / self.divisor + self.bias_params * w_out


@dataclass(frozen=True)
class ChannelGroupIndex:
    """The result of channel analysis: groups in topological order, each tensor's channel layout, the cost model,
    and what surgery needs to apply a plan without analysing again (see the module docstring).

    Attributes:
        groups: the channel groups, topological order.
        by_tensor: each activation tensor's channel axis as segments of groups.
        cost: the bilinear cost model of every Conv / ConvTranspose / Gemm / MatMul.
        edits: the edits a plan implies (empty for a hand-built index).
        flattened: ``Flatten`` / ``Reshape`` output -> (4-D input, ``H*W``) for channel-major dense heads.
        shapes: static shapes analysis saw (``None`` for unknown dims).
        fingerprint: :func:`graph_ops.proto.fingerprint` of the analysed graph ("" for a hand-built index).
        last_axis: tensors (rank >= 3) whose channels lie on their last axis, not axis 1: the hidden features of a
            Linear applied to tokens or channels-last maps (``MatMul`` by a constant ``[K, N]``), e.g. a
            transformer's or a ConvNeXt block's MLP; calibration pools them over every other axis.
        branched: tensors whose channels lie on another axis than 1 (not as :attr:`last_axis` features) ->
            that axis: the stacked paths of selective-kernel / split attention (``[N, K, C, ...]``, ``K`` branches of
            the same layout), a map transposed to channels-last; never a probe.
    """

    groups: tuple[ChannelGroup, ...]
    by_tensor: Mapping[str, tuple[Segment, ...]] = field(default_factory=lambda: MappingProxyType({}))
    cost: tuple[CostTerm, ...] = ()
    other_macs: float = 0.0
    other_params: float = 0.0
    edits: tuple[Edit, ...] = ()
    flattened: Mapping[str, tuple[str, int]] = field(default_factory=lambda: MappingProxyType({}))
    shapes: Mapping[str, tuple[int | None, ...]] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    fingerprint: str = ""
    last_axis: frozenset[str] = frozenset()
    branched: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for name in ("by_tensor", "flattened", "shapes", "branched"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def check_model(self, fingerprint: str) -> None:
        """Raise PlanValidationError unless this index was computed from a graph with this fingerprint."""
        if not self.fingerprint or self.fingerprint != fingerprint:
            raise PlanValidationError("the channel-group index does not belong to this model (its graph differs "
                                      "from the analysed one); analyse the model the plan is applied to "
                                      "(graph_ops.channels.analyze or pipeline.model.prepare.prepare)")

    def group(self, group_id: str) -> ChannelGroup:
        """The group with this id; KeyError names the id."""
        for item in self.groups:
            if item.id == group_id:
                return item
        raise KeyError(group_id)

    @property
    def by_id(self) -> Mapping[str, ChannelGroup]:
        """Groups keyed by id."""
        return MappingProxyType({g.id: g for g in self.groups})

    @property
    def unknown_macs(self) -> tuple[str, ...]:
        """Nodes whose MACs the cost model cannot state (a dynamic spatial size): a MACs budget is meaningless."""
        return tuple(t.node for t in self.cost if not t.macs_known)

    def channel_axis(self, tensor: str, rank: int) -> int:
        """The axis of a tensor's channels (of rank ``rank``): last for :attr:`last_axis`, the recorded one for
        :attr:`branched`, else 1."""
        if tensor in self.branched:
            return self.branched[tensor]
        return rank - 1 if tensor in self.last_axis else 1

    def full_widths(self) -> dict[str, int]:
        """Every group at its full size."""
        return {g.id: g.size for g in self.groups}

    def predict(self, width: Mapping[str, int] | None = None) -> tuple[float, float]:
        """Predicted (MACs, params) of the model with these group widths (default: unpruned)."""
        full = self.full_widths()
        if width:
            full.update(width)
        macs = self.other_macs + sum(t.macs(full) for t in self.cost)
        params = self.other_params + sum(t.params(full) for t in self.cost)
        return macs, params

    def validate_keep(self, keep: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
        """Check kept-channel lists against this index; return the sorted kept indices of groups that shrink.

        The one validation of a plan's content, used by ``apply_plan``, the mask oracle and ``PruningPlan.validate``.

        Raises:
            PlanValidationError: unknown group, frozen group not kept whole, empty / out-of-range / duplicated indices.
        """
        groups = self.by_id
        result: dict[str, np.ndarray] = {}
        for gid in sorted(keep):
            if gid not in groups:
                raise PlanValidationError(f"plan names unknown group '{gid}'; run 'diprune inspect' for the group ids")
            group = groups[gid]
            try:
                idx = np.sort(np.asarray(list(keep[gid]), dtype=np.int64))
            except (TypeError, ValueError) as err:
                raise PlanValidationError(f"group '{gid}': kept channels must be integers ({err})") from err
            if idx.size == 0:
                raise PlanValidationError(f"group '{gid}' keeps no channel; keep at least one (or leave it out)")
            if idx[0] < 0 or idx[-1] >= group.size:
                raise PlanValidationError(f"group '{gid}' has {group.size} channels; kept index out of range "
                                          f"[{idx[0]}, {idx[-1]}]")
            if np.any(np.diff(idx) == 0):
                raise PlanValidationError(f"group '{gid}' lists a kept channel twice (duplicate index)")
            if idx.size == group.size:
                continue
            if group.frozen:
                raise PlanValidationError(f"group '{gid}' is frozen ({group.frozen}); it cannot lose channels")
            if group.blocks > 1:
                counts = np.bincount(idx // (group.size // group.blocks), minlength=group.blocks)
                if np.any(counts != counts[0]):
                    raise PlanValidationError(f"group '{gid}' comes in {group.blocks} equal blocks (grouped "
                                              f"convolution); keep the same number of channels in each block, "
                                              f"got {counts.tolist()}")
            idx.setflags(write=False)
            result[gid] = idx
        return result

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (groups only; used by ``diprune inspect --json`` and golden files)."""
        return {"groups": [asdict(g) for g in self.groups]}

    def to_json(self) -> str:
        """The summary as a JSON string."""
        return json.dumps(self.to_dict(), indent=1)
