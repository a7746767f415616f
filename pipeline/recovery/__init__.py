"""Training-free recovery after channel removal: the registry and the entry point (methods.md 6.2).

The registry :data:`RECOVERY` (it feeds the CLI's ``--recover``) holds:

* ``none``: plain removal (R0).
* ``bias`` (R1) and ``regress`` (R2): a channel map ``a ≈ F z + f`` of every exit consumer's full input from its
  kept channels, folded into the consumer (:mod:`pipeline.recovery.maps`, algebra in :mod:`graph_ops.channel_fill`).
* ``lstsq`` (R3, the default): every affected Conv (per group: depthwise and grouped layers too), Gemm and MatMul
  refit by least squares on im2col patches of its pruned input against the original model's output
  (:mod:`pipeline.recovery.refit`, algebra in :mod:`graph_ops.least_squares`).

Every method plans its work level by level (:class:`pipeline.recovery.sweep.LevelPlan`) and reads its data through
one sweep (:mod:`pipeline.recovery.sweep`): the original and the pruned model advance level by level over the
calibration data, each node running once (not both whole models once per level). The data is cut into fixed shards
whose moments are merged in shard order at every level (:mod:`pipeline.recovery.worker`), in this process or on Ray
workers (``cluster``), with the same result. Recovery only rewrites weights and biases: the graph's structure and
interface never change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import onnx

from graph_ops.groups import ChannelGroupIndex
from graph_ops.io import verify_model
from pipeline.data.shards import SHARD_BATCHES, shard_layout
from pipeline.errors import UserInputError
from pipeline.model.runtime import fixed_batch, model_input_specs
from pipeline.recovery.augment import DEFAULT_KINDS, augmented
from pipeline.recovery.levels import LevelPlan
from pipeline.recovery.maps import (
    ConsumerRecovery,
    bias_solver,
    consumer_targets,
    map_recovery,
    regress_solver,
)
from pipeline.recovery.refit import LayerRefit, lstsq_recovery, refit_targets
from pipeline.recovery.sweep import SPILL_BYTES, layer_levels
from pipeline.recovery.worker import sweep_levels

__all__ = ["DEFAULT_RECOVERY", "RECOVERY", "ConsumerRecovery", "LayerRefit", "RecoveryOptions", "RecoveryReport",
           "consumer_targets", "layer_levels", "recover", "refit_targets"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    """Summary of one recovery run: per rewritten layer a :class:`ConsumerRecovery` (R1 / R2) or a
    :class:`pipeline.recovery.refit.LayerRefit` (R3), the layers skipped with a reason, and how the sweep went
    (``sweep``: levels, shards, workers, seconds the driver spent solving, bytes of moments it received, the largest
    size of the frontier's spill files, and seconds spent in onnxruntime per model, folding batches into moments and
    writing the spill file)."""

    method: str
    samples: int
    consumers: tuple[Any, ...]
    skipped: tuple[tuple[str, str], ...]
    notes: tuple[str, ...] = ()
    sweep: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"method": self.method, "samples": self.samples, "consumers": [asdict(c) for c in self.consumers],
                "skipped": [list(s) for s in self.skipped], "notes": list(self.notes), "sweep": dict(self.sweep)}


@dataclass(frozen=True)
class RecoveryOptions:
    """Settings shared by the recovery methods (see :func:`recover`)."""

    ridge: float | None = None
    batch_size: int = 64
    max_positions: int | None = 1024
    refit_positions: int | None = 64
    refit_max_dim: int = 5000
    seed: int = 0
    sequential: bool = True
    backend: str = "auto"
    intra_op_threads: int | None = None
    progress: bool = False
    spill_dir: str | None = None
    spill_bytes: int = SPILL_BYTES
    shard_batches: int = SHARD_BATCHES
    cluster: Any | None = None
    samples: int | None = None  # calibration samples (set by :func:`recover`; R3 raises its positions for few)
    augment: int = 0  # perturbed copies of every calibration sample (:mod:`pipeline.recovery.augment`)
    augment_kinds: tuple[str, ...] = DEFAULT_KINDS

    def session(self) -> dict[str, Any]:
        """Options of :class:`pipeline.recovery.sweep.Sweep`."""
        return {"batch_size": self.batch_size, "backend": self.backend, "intra_op_threads": self.intra_op_threads,
                "spill_dir": self.spill_dir, "spill_bytes": self.spill_bytes}


Recovery = Callable[[onnx.ModelProto, onnx.ModelProto, ChannelGroupIndex, Mapping[str, Sequence[int]],
                     RecoveryOptions], LevelPlan]
"""``(original, pruned, index, keep, options) -> LevelPlan``: the jobs of every level (they rewrite ``pruned``)."""

RECOVERY: dict[str, Recovery | None] = {
    "none": None,
    "bias": partial(map_recovery, bias_solver),
    "regress": partial(map_recovery, regress_solver),
    "lstsq": lstsq_recovery,
}
DEFAULT_RECOVERY = "lstsq"


def recover(original: onnx.ModelProto, pruned: onnx.ModelProto, index: ChannelGroupIndex,
            keep: Mapping[str, Sequence[int]], dataset: Any, *, method: str = DEFAULT_RECOVERY,
            sequential: bool = True, **options: Any) -> tuple[onnx.ModelProto, RecoveryReport]:
    """Rewrite a pruned model's weights so that it compensates for the removed channels.

    Args:
        original: the (canonical) model ``index`` and the plan refer to; statistics are taken on it.
        pruned: ``apply_plan(original, index, keep)`` (not mutated).
        index: ``analyze(original)``.
        keep: the plan's kept channels per group.
        dataset: calibration :class:`pipeline.data.datasets.Dataset` (training split; labels are not needed).
        method: a key of :data:`RECOVERY`: ``none``, ``bias`` (R1), ``regress`` (R2) or ``lstsq`` (R3).
        sequential: error-accumulation correction: layers are recovered level by level (input to output), each
            fitted on inputs of the partly recovered pruned model against the original model (one sweep over the
            data advances both models a level at a time); False: one pass (R1 / R2: statistics of the original
            model only).
        options: fields of :class:`RecoveryOptions`: ``ridge`` (fixed ridge factor α; default: chosen on
            held-out batches), ``batch_size``, ``max_positions`` (pixels sampled per image for R1 / R2; None: all),
            ``refit_positions`` (output positions sampled per image for R3, raised for a wide layer when the data
            has few images: :func:`pipeline.recovery.refit.refit_positions`; None: all), ``refit_max_dim`` (R3:
            layers with more unknowns per output, whose Gram matrix would not fit in memory comfortably, get R2
            instead), ``seed``, ``backend``,
            ``intra_op_threads`` (see :func:`pipeline.calibration.calibrate.open_session`), ``progress`` (a tqdm bar over the
            levels on stderr), ``augment`` (perturbed copies of every sample as extra rows, kinds
            ``augment_kinds``: :mod:`pipeline.recovery.augment`).

    Returns:
        The recovered model (verified with the full ONNX checker) and a :class:`RecoveryReport`.

    Raises:
        UserInputError: unknown method or option, or no data for a data-driven method.
        PlanValidationError: the plan or index does not fit ``original``.
        CalibrationError: data that does not fit the model, or NaN/Inf activations.
    """
    if method not in RECOVERY:
        raise UserInputError(f"unknown recovery method '{method}'; choose one of {', '.join(RECOVERY)}")
    try:
        opts = RecoveryOptions(sequential=sequential, **options)
    except TypeError as err:
        raise UserInputError(f"recover(): {err}") from err
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    notes = ("sequential: inputs from the partly recovered pruned model, targets from the original",) if sequential \
        else ("one pass: no error-accumulation correction",)
    run = RECOVERY[method]
    if run is None:
        return out, RecoveryReport(method, 0, (), (), notes)
    if dataset is None:
        raise UserInputError(f"recovery '{method}' needs calibration data (the training split); give a dataset")
    opts = replace(opts, batch_size=fixed_batch(model_input_specs(original), opts.batch_size))
    dataset = augmented(dataset, opts.augment, opts.augment_kinds, opts.seed, opts.batch_size)
    opts = replace(opts, samples=getattr(dataset, "num_samples", None))
    plan = run(original, out, index, keep, opts)
    shards = shard_layout(getattr(dataset, "num_samples", 0), opts.batch_size, opts.shard_batches)
    session = {**opts.session(), "sizes": dict(index.shapes)}  # sizes: for memory slicing of dynamic input sizes
    executor = None
    if opts.cluster is not None:
        from pipeline.cluster import recovery_on_ray

        executor = recovery_on_ray(opts.cluster, partial(run, index=index, keep=keep, opts=replace(opts, cluster=None)),
                                   original, out, dataset, shards, session)
    done, missed, sweep = sweep_levels(original, out, plan, dataset, shards, progress=opts.progress,
                                       session=session, executor=executor)
    skipped = [*plan.skipped, *missed]
    verify_model(out)
    samples = getattr(dataset, "num_samples", None)
    logger.info("recovery '%s': %d layers rewritten, %d skipped", method, len(done), len(skipped))
    return out, RecoveryReport(method, samples or 0, tuple(done), tuple(skipped), notes, sweep)
