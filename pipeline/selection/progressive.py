"""Progressive pruning: reach a budget in ``K`` rounds of calibrate -> score -> plan -> apply -> recover.

Round ``i`` (``1..K``) asks for ``f_i = f^(i/K)`` of the *original* model's MACs (and/or params; geometric
interpolation of the budget ``f``), i.e. ``f_i * C_0 / C_{i-1}`` of the model it starts from (``C`` the counted
cost), and runs the whole chain on the recovered model of round ``i - 1``: its own analysis, calibration on the same
data, scores, sensitivity and recovery (whose targets are that model's outputs, so each round refits against the
round before). Channel indices compose back to the original model: a group's keep list after round ``i`` is
``K_{i-1}[k]`` for the ``k`` in round ``i``'s keep list (groups keep their ids through surgery: tensor names are
stable), so the final plan applies to the original model and ``diprune apply`` reproduces the structure (not the
refit weights). ``meta["rounds"]`` records each round's target, achieved fractions, seconds and, with evaluation
data, its held-out metrics.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import onnx

from graph_ops.canonicalize import canonicalize
from graph_ops.channels import analyze
from graph_ops.proto import declared_shapes
from pipeline.errors import UserInputError
from pipeline.model.prepare import PreparedModel
from pipeline.selection.plan import PruningPlan

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 1
"""Rounds of ``--steps`` by default (chosen by ``benchmarks/allocation.py``: see the README)."""


def round_targets(target: float | None, steps: int) -> list[float | None]:
    """The budget of every round as a fraction of the original: ``target^(i/steps)``, the last one ``target``."""
    if target is None:
        return [None] * steps
    return [target if i == steps else target ** (i / steps) for i in range(1, steps + 1)]


def compose(previous: Mapping[str, tuple[int, ...]], sizes: Mapping[str, int],
            current: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Keep lists of the original model after one more round: ``previous[g][k]`` for ``k`` in ``current[g]``.

    Raises:
        UserInputError: a group of the round is not a group of the original model, or has another width.
    """
    out = dict(previous)
    for gid, keep in current.items():
        if gid not in sizes:
            raise UserInputError(f"progressive pruning: group {gid} of the pruned model is not a group of the "
                                 f"original; use --steps 1")
        kept = previous.get(gid, tuple(range(sizes[gid])))
        if keep and max(keep) >= len(kept):
            raise UserInputError(f"progressive pruning: group {gid} has {len(kept)} channels after the previous "
                                 f"round, the round's plan names channel {max(keep)}; use --steps 1")
        out[gid] = tuple(kept[k] for k in keep)
    return out


def prepared_from(model: onnx.ModelProto, like: PreparedModel) -> PreparedModel:
    """A recovered model as the start of the next round (canonicalized and analysed; its task head is already in)."""
    data = model.SerializeToString()
    canonical = canonicalize(model)
    return PreparedModel(path=like.path, sha256=hashlib.sha256(data).hexdigest(), model=canonical,
                         index=analyze(canonical, declared_shapes(canonical)), input_shapes=dict(like.input_shapes))


def progressive(run: Any, method: str, steps: int, *, target_macs: float | None = None,
                target_params: float | None = None,
                evaluate: Callable[[onnx.ModelProto], Mapping[str, Any]] | None = None,
                **options: Any) -> Any:
    """The :class:`pipeline.prune.orchestrate.Candidate` after ``steps`` rounds (module docstring) of a
    :class:`pipeline.prune.orchestrate.PruneRun` (``run``; not imported here: the orchestrator imports this module);
    ``options`` as for :meth:`PruneRun.candidate`; ``evaluate`` (optional) measures each round's recovered model.

    Raises:
        UserInputError: ``steps`` below 1, a latency budget, or groups that do not carry through the rounds.
    """
    if steps < 1:
        raise UserInputError(f"--steps is a number of rounds >= 1, got {steps}")
    if steps == 1:
        return run.candidate(method, target_macs=target_macs, target_params=target_params, **options)
    if options.get("latency") is not None or options.get("target_latency") is not None:
        raise UserInputError("--steps with --target-latency is not supported; give --target-macs/--target-params")
    original = run.prepared
    full = original.cost
    sizes = {g.id: g.size for g in original.index.groups}
    keep: dict[str, tuple[int, ...]] = {}
    rounds, current, candidate, timings = [], run, None, {}
    for i, (macs, params) in enumerate(zip(round_targets(target_macs, steps), round_targets(target_params, steps),
                                           strict=True), 1):
        start = time.perf_counter()
        now = current.prepared.cost
        relative = {"target_macs": None if macs is None else min(1.0, macs * full.macs / now.macs),
                    "target_params": None if params is None else min(1.0, params * full.params / now.params)}
        candidate = current.candidate(method, **relative, **options)
        keep = compose(keep, sizes, candidate.plan.keep)
        after = current.cost(candidate.model)
        record = {"round": i, "target_macs": macs, "target_params": params,
                  "macs_fraction": None if after.unresolved else after.macs / full.macs,
                  "params_fraction": after.params / full.params, "seconds": round(time.perf_counter() - start, 3)}
        if evaluate is not None:
            record["evaluation"] = dict(evaluate(candidate.model))
        rounds.append(record)
        logger.info("progressive round %d/%d: %s", i, steps, record)
        for stage, seconds in candidate.timings_s.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
            if current is not run:  # the first run's own timings (the report's) get the later rounds too
                run.timings[stage] = run.timings.get(stage, 0.0) + seconds
        if i < steps:
            with run.timed("analyze"):
                prepared = prepared_from(candidate.model, original)
            current = type(run)(prepared, current.data, pooling=run.pooling,
                               batch_size=run.batch_size, backend=run.backend, intra_op_threads=run.threads,
                               seed=run.seed, progress=run.progress, work_dir=run.work_dir, cluster=run.cluster,
                               shard_batches=run.shard_batches)
    assert candidate is not None
    original.index.validate_keep(keep)
    achieved = (rounds[-1]["macs_fraction"], rounds[-1]["params_fraction"])
    meta = {**candidate.plan.meta, "target_macs": target_macs, "target_params": target_params,
            "macs_fraction": achieved[0], "params_fraction": achieved[1], "steps": steps, "rounds": rounds}
    plan = PruningPlan(model_sha256=original.sha256, keep=keep, meta=meta).with_input_shapes(original.input_shapes)
    if original.task is not None:
        plan = replace(plan, meta={**plan.meta, "task": original.task.to_dict()})
    budget = {**candidate.budget, "target_macs": target_macs, "target_params": target_params, "steps": steps}
    return replace(candidate, plan=plan, budget=budget, timings_s=timings,
                   recovery={**candidate.recovery, "rounds": rounds})
