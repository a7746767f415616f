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
kept per batch since they were computed (in memory up to ``spill_bytes``, then in one file under ``spill_dir``
whose extents are reused after their last reader, :mod:`pipeline.recovery.frontier`). So every node of each model
runs once over the data (one inference of each model in total, plus the frontier traffic), and the values equal
those of whole-model runs up to floating-point rounding (onnxruntime may fuse differently across a cut). One-pass
recovery (``sequential=False``) is a single step.

Batches keep the dataset's order; batch ``i`` is held out (for choosing ridge factors) when
``i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1``. Batches are grouped into the fixed shards of :mod:`pipeline.data.shards`:
a step can run any subset of batches (:meth:`Sweep.run`), each batch's frontier entries are dropped after their last
reader, and every random draw depends only on ``(seed, level, batch)`` (:func:`batch_rng`), so a
:class:`pipeline.recovery.worker.SweepWorker` holding some shards (in this process, or as a Ray actor) computes for
them exactly what one process computes for all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graph_ops.probes import PositionGather, add_position_gathers
from graph_ops.proto import declared_shapes
from pipeline.data.datasets import validate_batch
from pipeline.data.shards import batch_range
from pipeline.errors import CalibrationError
from pipeline.model.runtime import model_input_specs, open_session, run, samples_for, static_batch
from pipeline.recovery.frontier import FrontierStore

HOLD_OUT_EVERY = 5  # batch i is held out when i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
MIN_ROWS_PER_DIM = 10  # methods.md 6.2: at least 10x more samples than a regression's dimension (else a warning)
SPILL_BYTES = 256 << 20  # frontier kept in memory up to this many bytes, the rest in files


def held_out(batch: int) -> bool:
    """Whether R3 holds batch ``batch`` out of its fit (to choose the ridge and let the current weights compete):
    every :data:`HOLD_OUT_EVERY`-th batch."""
    return batch % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1


def batch_rng(seed: int, level: int, batch: int, *more: int) -> np.random.Generator:
    """The generator of the random draws of one level for one (global) batch (``more``: e.g. a layer's node
    index): the same whoever computes the batch, in whatever order."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, level, batch, *more])


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


def request_key(request: Request) -> str:
    """The name a request's value is yielded under: the tensor, or the gather's output."""
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
            last_use[request_key(r)] = max(last_use.get(request_key(r), -1), level)
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
                               "(pipeline.model.prepare) so that its shapes are declared")
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


def _sized(declared: Mapping[str, tuple], sizes: Mapping[str, tuple] | None) -> Mapping[str, tuple]:
    """Declared shapes with their unknown dims (and unknown shapes) taken from ``sizes`` (a memory estimate: a
    pruned tensor's declared channel count is kept, the unpruned one of ``sizes`` only bounds it)."""
    if not sizes:
        return declared
    filled = dict(sizes)
    for name, shape in declared.items():
        hint = sizes.get(name)
        filled[name] = shape if hint is None or len(hint) != len(shape) else tuple(
            d if d is not None else h for d, h in zip(shape, hint, strict=True))
    return filled


class Sweep:
    """Both models advanced level by level (see the module docstring): :meth:`run` computes one step for some
    batches (every batch must have gone through the steps before), refitting the current model in place between
    steps; :meth:`level` runs one step for every batch.

    Args:
        original: the unpruned (canonical) model; its inputs define how the dataset is bound.
        current: the pruned model that recovery rewrites in place (same nodes in the same order), or None.
        levels: node index -> level of every listed layer.
        requests: level -> (requests to ``original``, requests to ``current``) that a step yields per batch:
            tensor names (whole tensors) or :class:`graph_ops.probes.PositionGather` (a tensor gathered at
            positions inside the graph; the indices come from the ``indices`` callback).
        dataset: a :class:`pipeline.data.datasets.Dataset` (labels are ignored); batch ``i`` is its samples
            ``[i * batch_size, (i + 1) * batch_size)``.
        sequential: False: a single step (one pass; the current model is not refit in between).
        session: ``batch_size``, ``backend``, ``intra_op_threads``, ``spill_dir``, ``spill_bytes``.
    """

    def __init__(self, original: onnx.ModelProto, current: onnx.ModelProto | None, levels: Mapping[int, int],
                 requests: Mapping[int, tuple[Sequence[Request], Sequence[Request]]], dataset: Any, *,
                 sequential: bool, batch_size: int = 64, backend: str = "auto", intra_op_threads: int | None = None,
                 spill_dir: str | Path | None = None, spill_bytes: int = SPILL_BYTES,
                 original_ahead: bool | None = None, sizes: Mapping[str, tuple] | None = None) -> None:
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
        if batch_size < 1:
            raise CalibrationError(f"batch size must be positive, got {batch_size}")
        self.specs = model_input_specs(original)
        self.dataset = dataset.bind(list(self.specs))
        self.batch_size, self.backend, self.threads = batch_size, backend, intra_op_threads
        # every step runs in onnxruntime calls of fewer samples when what its sub-graph computes and reads is large
        # (same values; the memory of a slice): on ResNet-50 at batch 64 the original's whole pass (step 0) runs in
        # slices of 10, the pruned model's first 20 of 48 steps in slices of 10-32, the other 28 whole (recovery peak
        # 1.8 instead of 2.2 GiB at the same speed, measured; slicing every step by the whole model's widest tensor
        # was 6-12 % slower)
        # (``sizes``: the shapes analysis used, for the dims a model with dynamic input sizes leaves unknown)
        self.shapes = {key: None if static_batch(side.model) else _sized(declared_shapes(side.model), sizes)
                       for key, side in self.sides.items()}
        self.store = {key: FrontierStore(spill_bytes // 2, spill_dir) for key in self.sides}
        self.seconds = {"original": 0.0, "current": 0.0, "fold": 0.0}  # onnxruntime per side; the jobs' folding
        self.last = {key: {} for key in self.sides}  # step -> names whose last reader runs at that step
        for key, side in self.sides.items():
            for name, step in side.last_use.items():
                self.last[key].setdefault(step, []).append(name)
        self.cached: tuple[int, dict[str, tuple[Any, list[str], list[str], int | None]]] | None = None

    @property
    def num_batches(self) -> int:
        """Batches of the dataset."""
        return -(-self.dataset.num_samples // self.batch_size)

    def invalidate(self) -> None:
        """Forget the sessions built so far (the current model's weights changed)."""
        self.cached = None

    def _runners(self, step: int) -> dict[str, tuple[Any, list[str], list[str], int | None]]:
        if self.cached is not None and self.cached[0] == step:
            return self.cached[1]
        runners = {}
        for key, side in self.sides.items():
            sub, ins, outs = _segment(side, step)
            session = None if sub is None else open_session(sub.SerializeToString(), self.backend, self.threads,
                                                            short_lived=True)
            per_run = None
            shapes = self.shapes[key]
            if sub is not None and shapes is not None:
                tensors = {*ins, *(o for node in sub.graph.node for o in node.output)}
                per_run = samples_for((shapes[t] for t in tensors if t in shapes), self.batch_size)
            runners[key] = (session, ins, outs, per_run)
        self.cached = (step, runners)
        return runners

    def _feeds(self, batch: int) -> dict[str, np.ndarray]:
        start, stop = batch_range(batch, self.batch_size, self.dataset.num_samples)
        if start >= stop:
            raise CalibrationError(f"recovery sweep: batch {batch} lies past the {self.dataset.num_samples} samples")
        feeds = dict(self.dataset.take(start, stop)[0])
        validate_batch(feeds, self.specs, f"dataset '{self.dataset.name}'")
        return feeds

    def _side_batch(self, key: str, step: int, batch: int, feeds: dict[str, np.ndarray] | None,
                    indices: Callable[[Iterable[int], int, int], Mapping[str, np.ndarray]],
                    runner: tuple[Any, list[str], list[str], int | None], n: int) -> list[np.ndarray]:
        side, store = self.sides[key], self.store[key]
        session, ins, outs, per_run = runner
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
            picks = indices(levels, batch, n) if levels else {}
            start = time.perf_counter()
            values = run(session, outs, {n: picks[n] if n in picks else value(n) for n in ins}, stage="recovery",
                         finite=True, per_run=per_run)
            self.seconds[key] += time.perf_counter() - start
            got = dict(zip(outs, values, strict=True))
            for name, array in got.items():
                if side.last_use.get(name, -1) > step:
                    store.put(name, batch, array)
        keys = [request_key(r) for r in side.yields.get(step, ())]
        return [got[key] if key in got else value(key) for key in keys]

    def run(self, step: int, batches: Iterable[int],
            indices: Callable[[Iterable[int], int, int], Mapping[str, np.ndarray]] | None = None,
            ) -> Iterator[tuple[int, bool, list[np.ndarray], list[np.ndarray]]]:
        """Yield ``(batch, held_out, original values, current values)`` for the requests of level ``step``, for
        each of ``batches`` (global indices, in the order given; each must have run every earlier step). A gather
        yields ``(N, C, M)``. The values may be memory maps of the spill file: read them before asking for the
        next batch (their extents are written again after that). ``indices(levels, batch, n)`` gives the position
        indices (by index input name) of the gathers of those levels for batch ``batch`` of ``n`` samples; it is
        called before every run that computes them, possibly more than once per batch and level (the original
        model computes every level's gathers at step 0), so it must return the same positions each time.

        Raises:
            CalibrationError: no samples, data that does not fit the model, NaN/Inf activations.
        """
        runners = self._runners(step)
        picks = indices if indices is not None else _no_indices
        for batch in batches:
            for store in self.store.values():  # the consumer is done with what the last batch yielded
                store.release()
            start, stop = batch_range(batch, self.batch_size, self.dataset.num_samples)
            feeds = self._feeds(batch) if step == 0 else None
            values = {key: self._side_batch(key, step, batch, feeds, picks, runners[key], stop - start)
                      for key in self.sides}
            for key in self.sides:
                for name in self.last[key].get(step, ()):
                    self.store[key].discard(name, batch)
            yield (batch, held_out(batch), values.get("original", []),
                   values.get("current", []))

    def level(self, step: int, indices: Callable[[Iterable[int], int, int], Mapping[str, np.ndarray]] | None = None,
              ) -> Iterator[tuple[bool, list[np.ndarray], list[np.ndarray]]]:
        """:meth:`run` over every batch of the dataset, yielding ``(held_out, original values, current values)``."""
        if self.dataset.num_samples == 0:
            raise CalibrationError("the recovery dataset yielded no samples")
        for _, held, outs, curs in self.run(step, range(self.num_batches), indices):
            yield held, outs, curs

    def close(self) -> None:
        """Remove whatever the sweep still keeps (files included)."""
        for store in self.store.values():
            store.close()
