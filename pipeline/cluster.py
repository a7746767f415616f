"""Calibration and recovery on Ray (the optional extra ``[ray]``: ``pip install 'diprune[ray]'``).

Ray is imported here only, and only when asked for (``--workers N``: a local Ray with N worker processes;
``--ray ADDRESS``: an existing cluster; a Ray already started in this process is used as it is). The work is cut
into the fixed shards of :mod:`pipeline.data.shards` whatever the number of workers, so the results are those of a run
without Ray, to the last bit:

* calibration (:func:`calibrate_on_ray`): one task per shard. A task receives the shard job (the serialized model
  with its pooled probes) and the dataset's :class:`pipeline.data.datasets.DataSpec` (path, options, steps), opens the data
  itself, runs onnxruntime over its shard and returns the shard's statistics; the driver merges them in shard
  order as they arrive (a tqdm bar counts samples across tasks). A task whose worker dies is retried by Ray
  (``max_retries``); a shard's statistics depend only on the shard, so a retry returns the same values.
* recovery (:func:`recovery_on_ray`): one actor per worker, holding a :class:`pipeline.recovery.worker.SweepWorker`
  over its shards (dealt round robin) and its own frontier. Per level, each actor folds each of its shards and
  returns the moments; the driver merges them in shard order, solves, and sends the level's new weights (one object
  in Ray's store) with the next level's calls. An actor whose process dies is restarted (``max_restarts``) and the
  call retried (``max_task_retries``); the new actor replays the missing steps with the final weights of the levels
  before (see :mod:`pipeline.recovery.worker`), so the moments, and the recovered model, do not change.

Data must be readable by every worker at the same path (``.npz`` files and image folders; in-memory datasets are
refused rather than pickled and shipped from the driver). Each worker runs onnxruntime with ``cpus_per_worker``
intra-op threads unless ``intra_op_threads`` is given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import onnx

from pipeline.calibration.stats import merge_probes
from pipeline.data.shards import OrderedMerge, Shard, assign
from pipeline.errors import CalibrationError, PruneError, UserInputError
from pipeline.recovery.worker import LayerUpdate, Planner, SweepWorker

logger = logging.getLogger(__name__)

RAY_EXTRA = "pip install 'diprune[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """Where and how to run shards on Ray.

    Attributes:
        workers: local Ray with this many worker processes (no ``address``), or at most this many concurrent
            tasks / actors on an existing cluster (None: as many as the cluster's CPUs allow).
        address: an existing cluster (``auto``, ``HOST:6379`` or ``ray://HOST:10001``); None: start a local Ray.
        cpus_per_worker: CPUs each task or actor asks Ray for (and its onnxruntime intra-op threads).
        gpus_per_worker: GPUs each task or actor asks Ray for (``--backend auto`` then uses CUDA when active).
        max_retries: retries of a task whose worker died, restarts of an actor, retries of an actor call.
        fault: test hook ``(marker file, index)``: the first task of shard ``index`` (calibration) or the first
            call of level ``index`` (recovery) that finds no marker file creates it and kills its own process.
    """

    workers: int | None = None
    address: str | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    max_retries: int = 3
    fault: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise UserInputError(f"--workers must be at least 1, got {self.workers}")
        if self.workers is None and self.address is None:
            raise UserInputError("Ray needs --workers N (a local Ray) or --ray ADDRESS (an existing cluster)")
        if self.cpus_per_worker < 1 or self.max_retries < 0:
            raise UserInputError(f"cpus per worker must be >= 1 and retries >= 0, got {self.cpus_per_worker} and "
                                 f"{self.max_retries}")


def ray_options(workers: int | None = None, address: str | None = None, **options: Any) -> RayOptions | None:
    """The options of ``--workers`` / ``--ray`` (and of a run config's ``workers`` / ``ray`` keys), checked; None
    when neither is given (everything runs in this process). Fails at once when Ray is not installed."""
    if workers is None and address is None:
        return None
    chosen = RayOptions(workers=workers, address=address, **options)
    _ray()
    return chosen


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise UserInputError(f"--workers / --ray run on Ray, which is not installed: {RAY_EXTRA}") from err
    return ray


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """Ray, started (local) or connected (``address``) for the block and shut down after it; a Ray already running
    in this process is used as it is and left running."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if options.address is not None:
            ray.init(address=options.address, **common)
        else:
            ray.init(num_cpus=(options.workers or 1) * options.cpus_per_worker,
                     num_gpus=int((options.workers or 1) * options.gpus_per_worker) or None, **common)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserInputError(f"cannot start or reach Ray ({options.address or 'local'}): {err}") from err
    try:
        yield ray
    finally:
        ray.shutdown()


def _workers(ray: Any, options: RayOptions) -> int:
    """How many tasks / actors to run at once."""
    if options.workers is not None:
        return options.workers
    return max(1, int(ray.cluster_resources().get("CPU", 1) // options.cpus_per_worker))


def data_spec(dataset: Any) -> Any:
    """The dataset's :class:`pipeline.data.datasets.DataSpec` (what workers open), or a UserInputError for in-memory data."""
    spec = getattr(dataset, "spec", None)
    if spec is None:
        raise UserInputError(f"--workers / --ray need data the workers can open themselves (an .npz file or an "
                             f"image folder, by path); dataset '{getattr(dataset, 'name', dataset)}' lives in this "
                             f"process only")
    return spec


def _fail_once(fault: tuple[str, int] | None, index: int) -> None:
    """The test hook of :class:`RayOptions`: kill this process once (a real worker death)."""
    if fault is None or fault[1] != index:
        return
    try:
        os.close(os.open(fault[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _get(ray: Any, ref: Any, options: RayOptions, what: str) -> Any:
    """``ray.get`` with the workers' errors as DIPrune errors (one line, no Ray traceback)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, PruneError):
            raise cause from None
        raise CalibrationError(f"{what} failed on a Ray worker: {str(cause or err).strip().splitlines()[-1]}") \
            from None
    except ray.exceptions.RayError as err:
        raise CalibrationError(f"{what}: a Ray worker died and {options.max_retries} retries did not help "
                               f"({type(err).__name__}); see the Ray logs") from None


def _calibrate_shard(job: Any, spec: Any, shard: Shard, fault: tuple[str, int] | None) -> Any:
    """One calibration task: open the data, run the shard."""
    _fail_once(fault, shard.index)
    return job.shard(spec.open(), shard)


def calibrate_on_ray(options: RayOptions, job: Any, dataset: Any, shards: Sequence[Shard], *,
                     progress: bool) -> dict[str, Any]:
    """Every shard of a calibration (:class:`pipeline.calibration.calibrate.ShardJob`) as a Ray task; the statistics merged in
    shard order."""
    from tqdm import tqdm

    spec = data_spec(dataset)
    with ray_session(options) as ray:
        task = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker,
                          max_retries=options.max_retries)(_calibrate_shard)
        job_ref = ray.put(replace(job, intra_op_threads=job.intra_op_threads or options.cpus_per_worker))
        limit, todo = _workers(ray, options), list(shards)
        merged: OrderedMerge[dict[str, Any]] = OrderedMerge(merge_probes)
        pending: dict[Any, Shard] = {}
        with tqdm(total=dataset.num_samples, desc=f"calibrate ({limit} Ray workers)", unit="sample",
                  file=sys.stderr, disable=not progress) as bar:
            while todo or pending:
                while todo and len(pending) < limit:
                    shard = todo.pop(0)
                    pending[task.remote(job_ref, spec, shard, options.fault)] = shard
                ready, _ = ray.wait(list(pending), num_returns=1)
                shard = pending.pop(ready[0])
                merged.add(shard.index, _get(ray, ready[0], options, f"calibration of shard {shard.index}"))
                bar.update(shard.stop - shard.start)
        return merged.result(len(shards))


class RecoveryActor:
    """The body of a recovery actor: a :class:`SweepWorker` over some shards (see the module docstring)."""

    def __init__(self, planner: Planner, original: onnx.ModelProto, current: onnx.ModelProto, spec: Any,
                 shards: Sequence[Shard], session: dict[str, Any], fault: tuple[str, int] | None) -> None:
        """Open the data, plan the jobs on this actor's copy of the pruned model."""
        self.worker = SweepWorker(original, current, planner(original, current), spec.open(), shards, session)
        self.fault = fault

    def fold(self, level: int, shard: int, updates: Sequence[Any]) -> list[Any]:
        """The jobs' moments of one shard at ``level``; ``updates``: object refs of every earlier level's
        :class:`LayerUpdate` (only those not applied yet are fetched)."""
        import ray

        _fail_once(self.fault, level)
        applied = self.worker.applied
        fresh = ray.get(list(updates[applied:])) if len(updates) > applied else []
        return self.worker.fold(level, shard, [None] * applied + fresh)

    def close(self) -> None:
        """Remove the frontier files."""
        self.worker.close()


class RayShards:
    """The shards of a recovery on Ray actors (the executor of :func:`pipeline.recovery.worker.sweep_levels`)."""

    def __init__(self, options: RayOptions, planner: Planner, original: onnx.ModelProto, out: onnx.ModelProto,
                 dataset: Any, shards: Sequence[Shard], session: dict[str, Any]) -> None:
        """Start Ray (unless running) and one actor per worker."""
        spec = data_spec(dataset)
        self.options, self.shards = options, list(shards)
        self.stack = contextlib.ExitStack()
        self.ray = ray = self.stack.enter_context(ray_session(options))
        try:
            groups = assign(shards, _workers(ray, options))
            self.workers = len(groups)
            actor = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker,
                               max_restarts=options.max_retries, max_task_retries=options.max_retries)(RecoveryActor)
            session = {**session, "intra_op_threads": session.get("intra_op_threads") or options.cpus_per_worker}
            if options.address is not None:
                session["spill_dir"] = None  # the driver's folder may not exist on the cluster's nodes
            self.refs = ray.put(original), ray.put(out)  # kept in scope: a restarted actor reads them again
            self.actors = [actor.remote(planner, *self.refs, spec, group, session, options.fault) for group in groups]
            self.owner = {shard.index: a for a, group in zip(self.actors, groups, strict=True) for shard in group}
        except BaseException:
            self.stack.close()
            raise
        logger.info("recovery on %d Ray actors, %d shards", len(self.actors), len(self.shards))

    def fold(self, level: int, updates: Sequence[Any]) -> Iterator[tuple[int, list[Any]]]:
        """Every shard's moments of ``level``, as the actors return them."""
        pending = {self.owner[s.index].fold.remote(level, s.index, list(updates)): s for s in self.shards}
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            shard = pending.pop(ready[0])
            yield shard.index, _get(self.ray, ready[0], self.options, f"recovery of shard {shard.index}, level {level}")

    def update(self, model: onnx.ModelProto, plan: Any, level: int) -> Any:
        """The level's new weights, put once in Ray's object store."""
        return self.ray.put(LayerUpdate.of(model, plan, level))

    def close(self) -> None:
        """Let the actors remove their frontier files, stop them, and stop Ray if this started it."""
        try:
            self.ray.get([a.close.remote() for a in self.actors], timeout=60)
        except Exception as err:  # a dead actor cannot clean up; the run's result does not depend on it
            logger.warning("Ray actors did not clean up: %s", err)
        finally:
            for a in self.actors:
                self.ray.kill(a)
            self.stack.close()


def recovery_on_ray(options: RayOptions, planner: Planner, original: onnx.ModelProto, out: onnx.ModelProto,
                    dataset: Any, shards: Sequence[Shard], session: dict[str, Any]) -> RayShards:
    """An executor running a recovery's shards on Ray actors; ``out`` is the pruned model before recovery."""
    return RayShards(options, planner, original, out, dataset, shards, session)

