"""The data pass of recovery: both models advanced level by level over the calibration data, each node run once.

Recovery fits each rewritten layer on data seen by two models at once: the ORIGINAL model (targets: what the layer
should reproduce) and the CURRENT, partly recovered pruned model (inputs: what the layer really sees once the layers
before it were pruned and refit). Layers are processed level by level (:func:`layer_levels`: a layer's level is the
number of other listed layers on the longest path above its input), so every layer of level ``k`` is fitted on
inputs computed with every layer of level ``< k`` already rewritten (error-accumulation correction, He et al. 2017).

Running both whole models once per level would cost ``levels x`` two inferences. :class:`Sweep` instead gives every
node a *step*: in the current model, the largest ``level + 1`` of the listed layers at or above it (a layer of level
``k`` runs at step ``k + 1``, after its refit; its input is ready at step ``k``); in the original model, the largest
``level`` of the listed layers at or above it. Step ``k`` runs, for every batch, the sub-graph of each model made of
its step-``k`` nodes that some request needs, fed with the *frontier*: the tensors of earlier steps that it reads,
kept per batch since they were computed (in memory up to ``spill_bytes``, then in files under ``spill_dir``, removed
after their last reader). So every node of each model runs once over the data (one inference of each model in
total, plus the frontier traffic), and the values equal those of whole-model runs up to floating-point rounding
(onnxruntime may fuse differently across a cut). One-pass recovery (``sequential=False``) is a single step.

Batches keep the dataset's order; batch ``i`` is held out (for choosing ridge factors) when
``i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graph_ops.probes import PositionGather, add_position_gathers
from graph_ops.proto import declared_shapes
from pipeline.errors import CalibrationError
from pipeline.recovery.frontier import FrontierStore
from pipeline.runtime import feed_batches, model_input_specs, open_session, run

HOLD_OUT_EVERY = 5  # batch i is held out when i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
MIN_ROWS_PER_DIM = 10  # methods.md 6.2: at least 10x more samples than a regression's dimension (else a warning)
SPILL_BYTES = 512 << 20  # frontier kept in memory up to this many bytes, the rest in files


def layer_levels(model: onnx.ModelProto, indices: Sequence[int]) -> list[int]:
    """Per layer (node index in ``model``), how many other listed layers lie upstream of its input on the longest
    path (graph order is topological)."""
    wanted = set(indices)
    depth: dict[str, int] = {}
    level: dict[int, int] = {}
    for idx, node in enumerate(model.graph.node):
        here = max((depth.get(name, 0) for name in node.input if name), default=0)
        if idx in wanted:
            level[idx] = here
            here += 1
        for name in node.output:
            depth[name] = here
    return [level[i] for i in indices]


def level_progress(levels: Sequence[int], progress: bool) -> Iterator[int]:
    """The distinct levels in order, with a tqdm bar on stderr when ``progress`` (one sweep step per level)."""
    from tqdm import tqdm

    yield from tqdm(sorted(set(levels)), desc="recover", unit="level", file=sys.stderr, disable=not progress)


def node_steps(model: onnx.ModelProto, levels: Mapping[int, int], *, after: bool) -> list[int]:
    """The step of every node: the largest level (``+ 1`` with ``after``) of the listed layers (node index ->
    level) at or above it; 0 for nodes below no listed layer."""
    depth: dict[str, int] = {}
    steps = []
    for idx, node in enumerate(model.graph.node):
        here = max((depth.get(name, 0) for name in node.input if name), default=0)
        if idx in levels:
            here = max(here, levels[idx] + int(after))
        steps.append(here)
        for name in node.output:
            depth[name] = here
    return steps


Request = str | PositionGather
"""What a step yields per batch: a whole tensor by name, or a tensor gathered at sampled positions in the graph."""


def _tensor(request: Request) -> str:
    return request.tensor if isinstance(request, PositionGather) else request


def _key(request: Request) -> str:
    return request.output if isinstance(request, PositionGather) else request


@dataclass
class _Side:
    """One model's plan of steps: which nodes run when, what each step reads from and leaves for later steps."""

    model: onnx.ModelProto
    steps: list[int]
    requests: dict[int, tuple[Request, ...]]  # computed at step
    needed: set[int]
    produced_at: dict[str, int]
    last_use: dict[str, int]
    inputs: tuple[str, ...]
    yields: dict[int, tuple[Request, ...]]  # yielded at level (equals ``requests`` unless computed ahead)


def _plan_side(model: onnx.ModelProto, steps: list[int], requests: Mapping[int, Sequence[Request]], *,
               ahead: bool = False) -> _Side:
    """Plan one side; with ``ahead`` every request is computed at step 0 (one pass of the whole model) and kept
    until the level that yields it."""
    yields = {k: tuple(v) for k, v in requests.items()}
    if ahead:
        requests = {0: tuple(dict.fromkeys(r for k in sorted(yields) for r in yields[k]))}
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = tuple(v.name for v in graph.input if v.name not in inits)
    producer: dict[str, int] = {}
    for idx, node in enumerate(graph.node):
        for name in node.output:
            producer[name] = idx
    needed: set[int] = set()
    todo = [_tensor(r) for wanted in requests.values() for r in wanted]
    while todo:
        idx = producer.get(todo.pop())
        if idx is not None and idx not in needed:
            needed.add(idx)
            todo.extend(n for n in graph.node[idx].input if n and n not in inits)
    produced_at = dict.fromkeys(inputs, 0)
    produced_at.update((o, steps[i]) for i in sorted(needed) for o in graph.node[i].output if o)
    last_use: dict[str, int] = {}
    reads = [(steps[i], n) for i in needed for n in graph.node[i].input if n and n not in inits]
    reads += [(step, _tensor(r)) for step, wanted in requests.items() for r in wanted]
    for step, name in reads:
        if name not in produced_at or produced_at[name] > step:
            raise CalibrationError(f"recovery sweep: tensor '{name}' is read at step {step} before it exists")
        last_use[name] = max(last_use.get(name, -1), step)
    for level, wanted in yields.items():  # what is yielded later than computed is kept until then
        for r in wanted:
            last_use[_key(r)] = max(last_use.get(_key(r), -1), level)
    return _Side(model, steps, {k: tuple(v) for k, v in requests.items()}, needed, produced_at, last_use, inputs,
                 yields)


def _segment(side: _Side, step: int) -> tuple[onnx.ModelProto | None, list[str], list[str]]:
    """The step's sub-model of one side: its nodes, plus the gathers the step asks for; its inputs (frontier,
    graph inputs, gather indices) and outputs (tensors kept for later steps, whole requested tensors, gathers)."""
    graph = side.model.graph
    requests = side.requests.get(step, ())
    gathers = [r for r in requests if isinstance(r, PositionGather)]
    nodes = [i for i in sorted(side.needed) if side.steps[i] == step]
    if not nodes and not gathers:
        return None, [], []
    inits = {t.name: t for t in graph.initializer}
    made = {o for i in nodes for o in graph.node[i].output if o}
    reads = [n for i in nodes for n in graph.node[i].input if n and n not in inits and n not in made]
    reads += [g.tensor for g in gathers if g.tensor not in made]
    keep = [n for n in made if side.last_use.get(n, -1) > step]
    whole = [r for r in requests if isinstance(r, str) and r in made]
    outs = list(dict.fromkeys([*whole, *sorted(keep)]))
    infos = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
    ins = list(dict.fromkeys(reads))
    missing = [n for n in [*ins, *outs] if n not in infos]
    if missing:
        raise CalibrationError(f"recovery sweep: no declared type for tensors {missing[:3]}; prepare the model "
                               "(pipeline.prepare) so that its shapes are declared")
    used_inits = list(dict.fromkeys(n for i in nodes for n in graph.node[i].input if n in inits))
    sub = onnx.helper.make_graph([graph.node[i] for i in nodes], f"{graph.name}_step{step}",
                                 [infos[n] for n in ins], [infos[n] for n in outs], [inits[n] for n in used_inits])
    model = onnx.helper.make_model(sub, opset_imports=list(side.model.opset_import),
                                   ir_version=side.model.ir_version)
    model.functions.extend(side.model.functions)
    model = add_position_gathers(model, gathers)
    extra = [name for g in gathers for name in (g.index, g.mask) if name]
    return model, [*ins, *extra], [*outs, *(g.output for g in gathers)]


def _no_indices(levels: Iterable[int], batch: int, n: int) -> dict[str, np.ndarray]:
    raise CalibrationError("recovery sweep: gathers were requested without position indices")


class Sweep:
    """Both models advanced level by level (see the module docstring); call :meth:`level` for levels 0, 1, ... in
    order, refitting the current model in place between calls.

    Args:
        original: the unpruned (canonical) model; its inputs define how the dataset is bound.
        current: the pruned model that recovery rewrites in place (same nodes in the same order), or None.
        levels: node index -> level of every listed layer.
        requests: level -> (requests to ``original``, requests to ``current``) that :meth:`level` yields per batch:
            tensor names (whole tensors) or :class:`graph_ops.probes.PositionGather` (a tensor gathered at
            positions inside the graph; the indices come from :meth:`level`'s ``indices`` callback).
        dataset: a :class:`pipeline.data.Dataset` (labels are ignored).
        sequential: False: a single step (one pass; the current model is not refit in between).
        session: ``batch_size``, ``backend``, ``intra_op_threads``, ``spill_dir``, ``spill_bytes``.
    """

    def __init__(self, original: onnx.ModelProto, current: onnx.ModelProto | None, levels: Mapping[int, int],
                 requests: Mapping[int, tuple[Sequence[Request], Sequence[Request]]], dataset: Any, *,
                 sequential: bool, batch_size: int = 64, backend: str = "auto", intra_op_threads: int | None = None,
                 spill_dir: str | Path | None = None, spill_bytes: int = SPILL_BYTES,
                 original_ahead: bool | None = None) -> None:
        """Plan the steps of both models (no data is read yet). ``original_ahead`` (default: when every request to
        the original is a gather or a tensor of rank <= 2, i.e. small): the original model runs once, whole, at
        step 0, and its requested values are kept until their level (it does not change between levels)."""
        count = len(original.graph.node)
        self.sides: dict[str, _Side] = {}
        if original_ahead is None:
            shapes = declared_shapes(original)
            original_ahead = all(isinstance(r, PositionGather) or len(shapes.get(r, (0, 0, 0))) <= 2
                                 for wanted, _ in requests.values() for r in wanted)
        for key, model, after in (("original", original, False), ("current", current, True)):
            wanted = {k: tuple(r[key == "current"]) for k, r in requests.items()}
            if model is None or not any(wanted.values()):
                continue
            if len(model.graph.node) != count:
                raise CalibrationError("recovery sweep: the pruned model's nodes differ from the original's")
            ahead = key == "original" and original_ahead
            steps = node_steps(model, levels, after=after) if sequential and not ahead else [0] * count
            self.sides[key] = _plan_side(model, steps, wanted, ahead=ahead)
        self.dataset, self.batch_size = dataset, batch_size
        self.backend, self.threads = backend, intra_op_threads
        self.specs = model_input_specs(original)
        self.store = {key: FrontierStore(spill_bytes // 2, spill_dir) for key in self.sides}
        self.sizes: list[int] = []

    def _runners(self, step: int) -> dict[str, tuple[Any, list[str], list[str]]]:
        runners = {}
        for key, side in self.sides.items():
            sub, ins, outs = _segment(side, step)
            session = None if sub is None else open_session(sub.SerializeToString(), self.backend, self.threads,
                                                            short_lived=True)
            runners[key] = (session, ins, outs)
        return runners

    def _inputs(self, step: int) -> Iterator[tuple[int, int, dict[str, np.ndarray] | None]]:
        if step > 0:
            yield from ((b, n, None) for b, n in enumerate(self.sizes))
            return
        for b, (feeds, _) in enumerate(feed_batches(self.dataset, self.specs, self.batch_size)):
            self.sizes.append(next(iter(feeds.values())).shape[0])
            yield b, self.sizes[-1], feeds
        if not self.sizes:
            raise CalibrationError("the recovery dataset yielded no samples")

    def _side_batch(self, key: str, step: int, batch: int, feeds: dict[str, np.ndarray] | None,
                    indices: Callable[[Iterable[int], int, int], Mapping[str, np.ndarray]],
                    runner: tuple[Any, list[str], list[str]]) -> list[np.ndarray]:
        side, store = self.sides[key], self.store[key]
        session, ins, outs = runner
        if feeds is not None:
            for name in side.inputs:
                if side.last_use.get(name, -1) > 0:
                    store.put(name, batch, feeds[name])

        def value(name: str) -> np.ndarray:
            return feeds[name] if feeds is not None and name in side.inputs else store.get(name, batch)

        got: dict[str, np.ndarray] = {}
        if session is not None:
            levels = sorted(k for k, wanted in side.yields.items() if any(isinstance(r, PositionGather)
                                                                          and r in side.requests.get(step, ())
                                                                          for r in wanted))
            picks = indices(levels, batch, self.sizes[batch]) if levels else {}
            values = run(session, outs, {n: picks[n] if n in picks else value(n) for n in ins}, stage="recovery",
                         finite=True)
            got = dict(zip(outs, values, strict=True))
            for name, array in got.items():
                if side.last_use.get(name, -1) > step:
                    store.put(name, batch, array)
        return [got[_key(r)] if _key(r) in got else value(_key(r)) for r in side.yields.get(step, ())]

    def level(self, step: int, indices: Callable[[Iterable[int], int, int], Mapping[str, np.ndarray]] | None = None,
              ) -> Iterator[tuple[bool, list[np.ndarray], list[np.ndarray]]]:
        """Yield ``(held_out, original values, current values)`` per batch for the requests of level ``step``
        (in request order; a gather yields ``(N, C, M)``). ``indices(levels, batch, n)`` gives the position indices
        (by index input name) of the gathers of those levels for batch ``batch`` of ``n`` samples; it is called
        before every run that computes them, possibly more than once per batch and level (the original model
        computes every level's gathers at step 0), so it must return the same positions each time.

        Raises:
            CalibrationError: no samples, data that does not fit the model, NaN/Inf activations.
        """
        runners = self._runners(step)
        picks = indices if indices is not None else _no_indices
        for batch, _size, feeds in self._inputs(step):
            values = {key: self._side_batch(key, step, batch, feeds, picks, runners[key]) for key in self.sides}
            yield (batch % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1, values.get("original", []),
                   values.get("current", []))
        for key, side in self.sides.items():
            for name in [n for n, last in side.last_use.items() if last <= step]:
                self.store[key].drop(name)

    def close(self) -> None:
        """Remove whatever the sweep still keeps (files included)."""
        for store in self.store.values():
            store.close()


class LevelJob:
    """What one recovery method does with the layers of one level: what it reads per batch (``original`` /
    ``current`` requests), the gather positions it draws before a batch, how it folds a batch into its moments, and
    how it rewrites the layers at the end of the level (subclasses fill these in)."""

    original: tuple[Request, ...] = ()
    current: tuple[Request, ...] = ()

    def indices(self, batch: int, n: int) -> dict[str, np.ndarray]:
        """Index inputs of this job's gathers for batch ``batch`` of ``n`` samples (none by default); the same
        values every time it is asked for one batch."""
        return {}

    def add(self, held: bool, original: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> None:
        """Fold one batch (values by request key: the tensor name, or the gather's output name)."""
        raise NotImplementedError

    def finish(self) -> tuple[list[Any], list[tuple[str, str]]]:
        """Rewrite the level's layers; return what was done per layer and the layers skipped with a reason."""
        raise NotImplementedError


def sweep_levels(original: onnx.ModelProto, current: onnx.ModelProto, levels: Mapping[int, int],
                 jobs: Mapping[int, Sequence[LevelJob]], dataset: Any, *, sequential: bool, progress: bool,
                 **session: Any) -> tuple[list[Any], list[tuple[str, str]]]:
    """Run the jobs of every level in order over one :class:`Sweep`; each level's jobs rewrite ``current`` (in place)
    before the next level is computed. ``levels``: node index -> level of every layer the jobs rewrite."""
    requests = {k: (tuple(dict.fromkeys(r for j in js for r in j.original)),
                    tuple(dict.fromkeys(r for j in js for r in j.current))) for k, js in jobs.items()}
    sweep = Sweep(original, current, levels, requests, dataset, sequential=sequential, **session)

    def indices(wanted: Iterable[int], batch: int, n: int) -> dict[str, np.ndarray]:
        return {name: value for level in wanted for job in jobs[level] for name, value in job.indices(batch, n).items()}

    done: list[Any] = []
    skipped: list[tuple[str, str]] = []
    try:
        for level in level_progress(list(jobs), progress):
            keys_o, keys_c = ([_key(r) for r in side] for side in requests[level])
            for held, outs, curs in sweep.level(level, indices):
                by_o, by_c = dict(zip(keys_o, outs, strict=True)), dict(zip(keys_c, curs, strict=True))
                for job in jobs[level]:
                    job.add(held, by_o, by_c)
            for job in jobs[level]:
                got, missed = job.finish()
                done += got
                skipped += missed
    finally:
        sweep.close()
    return done, skipped
