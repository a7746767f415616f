"""Which pooling each calibration probe gets: features that match what the probe's consumers read (``auto``).

DI, LDA and PLS score channels on pooled features of a probe (``pipeline.calibration.calibrate``); the pooling decides which
information about a channel the criteria can see. A consumer that reads every spatial position separately (a
``Flatten -> Gemm`` head) distinguishes what global average pooling mixes up, while a consumer that pools globally
anyway (``GlobalAveragePool``) sees only the average. So, per probe ``(N, C, H, W)``:

* **read by a dense head after a channel-major Flatten/Reshape** (the analysis records it): the grid the head sees,
  ``K = min(H, W)`` bins per axis (exactly the head's positions when ``H == W``), reduced while ``C * K^2`` exceeds
  ``MAX_FEATURES``;
* **read only by global pooling** (``GlobalAveragePool``/``GlobalMaxPool``, or a ``ReduceMean``/``ReduceMax`` over
  all spatial axes): global average (``K = 1``);
* **otherwise** (convolutions and other local consumers): a small grid, ``K = 2``, when ``4 C <= MAX_FEATURES``,
  the probe is at least 2x2 and the calibration set holds at least ``MIN_SAMPLES_PER_FEATURE x 4 C`` samples; else
  global average. Such a consumer reads every position through its kernel, so neither pooling matches it exactly:
  the grid only adds where its ``4x`` features are estimated well. Below ``10`` samples per feature the scatter
  matrices are dominated by their ridge and the grid's extra features add noise to the ranking (measured on the
  MNIST MobileNetV2 family at 1/8 of the MACs, 2,000 images: ``K = 2`` on 14 probes lost 0.7 points to global
  average; ``benchmarks/results/quality.md``). The dense-head grid above is kept whatever the sample count: it is
  exactly what the head reads.

Probes of rank 2 have one feature per channel. ``MAX_FEATURES`` bounds the feature dimension ``d = C K^2``: DI
inverts and downdates ``d x d`` scatter matrices (``O(d^3)``) and calibration keeps a ``d x d`` Gram per probe.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from graph_ops.groups import ChannelGroupIndex
from graph_ops.proto import attr, constants

MAX_FEATURES = 1024
MIN_SAMPLES_PER_FEATURE = 10  # samples per pooled feature for a stable scatter matrix (methods.md §6.2)
GLOBAL_POOLS = ("GlobalAveragePool", "GlobalMaxPool")
SPATIAL_REDUCTIONS = ("ReduceMean", "ReduceMax")


def _global(node: onnx.NodeProto, rank: int, consts: dict[str, onnx.TensorProto]) -> bool:
    """True for a node that pools every spatial position of a rank-``rank`` input into one value per channel."""
    if node.op_type in GLOBAL_POOLS:
        return True
    if node.op_type not in SPATIAL_REDUCTIONS:
        return False
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1] in consts:
        axes = onnx.numpy_helper.to_array(consts[node.input[1]]).ravel().tolist()
    return axes is not None and sorted(int(a) % rank for a in axes) == list(range(2, rank))  # type: ignore[union-attr]


def consumer_bins(model: onnx.ModelProto, index: ChannelGroupIndex, probes: Sequence[str],
                  samples: int | None = None) -> dict[str, int]:
    """``K`` of the ``K x K`` pooling of every probe (module docstring); ``samples``: the calibration set's size
    (None: as many as the small grids want, e.g. for the sample advice)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    heads = {source for source, _ in index.flattened.values()}
    consts = constants(model)
    bins = {}
    for probe in probes:
        shape = index.shapes.get(probe)
        if (not shape or len(shape) != 4 or shape[2] is None or shape[3] is None or shape[1] is None
                or probe in index.last_axis):  # channels last: pooled over every other axis
            bins[probe] = 1
            continue
        channels, height, width = shape[1], shape[2], shape[3]
        if probe in heads:
            k = min(height, width)
            while k > 1 and channels * k * k > MAX_FEATURES:
                k -= 1
        elif readers.get(probe) and all(_global(node, 4, consts) for node in readers[probe]):
            k = 1
        else:
            enough = samples is None or samples >= MIN_SAMPLES_PER_FEATURE * 4 * channels
            k = 2 if min(height, width) >= 2 and 4 * channels <= MAX_FEATURES and enough else 1
        bins[probe] = k
    return bins
