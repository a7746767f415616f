"""``diprune run CONFIG``: the whole deployment job on one :class:`pipeline.prune.orchestrate.PruneRun`.

Stages, each once per need: (export the model when the config names a torch spec) -> prepare (load, canonicalize,
analyse) -> calibrate once for every candidate (cached by content hash) -> per method and budget: score, plan,
apply, recover (each finished candidate cached) -> evaluate the original and every candidate on the held-out data
(cached) -> benchmark the original and every candidate in the same interleaved rounds -> gates, Pareto fronts and
the best candidate (:mod:`pipeline.job.report`) -> ``OUTPUT/candidates/<name>.onnx`` (+ plan, report),
``OUTPUT/best.onnx`` (+ plan, report), plots, ``OUTPUT/report.json`` and ``report.md`` -> MLflow (optional).

The cache (:mod:`pipeline.job.cache`) lives in ``OUTPUT/cache``: a rerun with one more budget reuses the calibration
and every candidate already made. Inputs are never modified: an input (model, data, task map, config) lying where the
job writes or deletes (``OUTPUT/best.onnx``, ``report.*``, ``candidates/``, ``cache/``, ``plots/``) is refused before
any work (:func:`check_run_paths`). Every file is written atomically; a stale ``best.onnx`` of an earlier run is
removed when no candidate passes now. One job at a time writes an output folder: the job holds an exclusive lock
(``OUTPUT/.diprune.lock``, :mod:`pipeline.locks`) from start to end, and a second job on the same folder is refused.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from graph_ops.io import atomic_write_files, sha256_file
from pipeline.deployment.engines import default_round_to
from pipeline.errors import UserInputError
from pipeline.evaluation.dense_eval import METRIC_NAMES
from pipeline.evaluation.evaluate import score
from pipeline.job.cache import RunCache, content_key, data_identity, model_digest
from pipeline.job.config import DataSpec, RunConfig
from pipeline.job.gates import ACCURACY_GATES, DENSE_GATES, check_gates_fit_model
from pipeline.job.output import _prepare_output, _write_best, check_run_paths, output_lock
from pipeline.job.plots import write_plots
from pipeline.job.report import BatchLatency, CandidateResult, RunReport, judge
from pipeline.prune.one_shot import ray_started, smallest_within, write_candidate
from pipeline.prune.orchestrate import Candidate, PruneRun, needs_labels, needs_stats, needs_summaries
from pipeline.selection.progressive import progressive

logger = logging.getLogger(__name__)

Echo = Callable[[str], None]


@dataclass
class _Job:
    """Mutable state of one job (local to :func:`run_job`)."""

    config: RunConfig
    cache: RunCache
    echo: Echo
    progress: bool
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=lambda: {"calibration": "not needed", "candidates_computed": 0,
                                                            "candidates_reused": 0, "evaluations_reused": 0})

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


def _open(spec: DataSpec, *, evaluation: bool) -> Any:
    from pipeline.data.named import default_eval_split, open_dataset

    split = spec.split or (default_eval_split(spec.source) if evaluation else None)
    dense = {"label_format": spec.label_format, "labels_path": spec.labels_path}
    return open_dataset(spec.source, split=split, limit=spec.limit, scale=spec.scale, mean=spec.mean, std=spec.std,
                        size=spec.size, crop=spec.crop, input_keys=spec.input_key, label_key=spec.label_key,
                        channel_order=spec.channel_order, **dense)


def _model_path(job: _Job) -> Path:
    """The model file: the config's path, or the export of its spec (cached)."""
    spec = job.config.model
    if spec.path is not None:
        return spec.path
    from pipeline.model.export_spec import export_spec, require_torch, spec_identity

    torch = require_torch()
    key = content_key("export", spec=spec_identity(spec.export or ""), shape=spec.input_shape,
                      name=spec.input_name, opset=spec.opset, dynamic=spec.dynamic_batch, exporter=spec.exporter,
                      torch=torch.__version__)
    path = job.cache.path("export", key, ".onnx")
    record = job.cache.load_json("export", key, required=("parity",))
    if record is not None and path.is_file():
        job.echo(f"export {spec.export}: reused from the cache ({record['parity']})")
        return path
    job.cache.root.mkdir(parents=True, exist_ok=True)
    with job.timed("export"):
        result = export_spec(spec.export or "", path, input_shape=spec.input_shape, input_name=spec.input_name,
                             opset=spec.opset, dynamic_batch=spec.dynamic_batch, exporter=spec.exporter)
    job.echo(f"export {spec.export}: {result.parity.summary()}")
    job.cache.save_json("export", key, {"spec": spec.export, "parity": result.parity.summary()})
    return path


def _use_cached_stats(job: _Job, run: PruneRun, calib_id: dict[str, Any] | None) -> None:
    """Calibrate once for every candidate: statistics from the cache, else computed now and cached."""
    methods = job.config.prune.methods
    if not any(needs_stats(m) for m in methods) or job.counts["calibration"] != "not needed":
        return
    summaries = any(needs_summaries(m) for m in methods)
    labelled = any(needs_labels(m) for m in methods)
    key = content_key("calibration", model=run.prepared.sha256, data=calib_id, pooling=run.pooling,
                      batch_size=run.batch_size, summaries=summaries, shard_batches=run.shard_batches,
                      **({"labels": _label_identity(job.config.prune), "seed": run.seed} if labelled else {}))
    stats = job.cache.load_stats(key)
    if stats is not None and stats.model_sha256 == run.prepared.sha256 and stats.pooling == run.pooling:
        run.use_stats(stats, summaries=summaries)
        job.counts["calibration"] = "reused"
        job.echo("calibration: reused from the cache")
        return
    job.echo(f"calibration: {run.data.num_samples} samples")
    stats = run.stats(summaries=summaries, labels=labelled)
    if stats.targets and stats.targets.get("reason"):
        from pipeline.data.targets import describe_record

        job.echo(f"calibration: {describe_record(stats.targets)}")
    job.cache.save_stats(key, stats)
    job.counts["calibration"] = "computed"


def _label_identity(prune: Any) -> dict[str, Any]:
    """What labelled statistics depend on besides the data: the label keys of the prune section."""
    return {key: getattr(prune, key) for key in ("labels", "output_kind", "blank", "map_threshold", "conf_threshold",
                                                 "iou_threshold", "locations_per_class", "background_ratio")}


def _candidates(job: _Job, run: PruneRun, calib_id: dict[str, Any] | None, evaluation: Any,
                searches: dict[str, tuple[dict[str, Any], ...]]) -> list[tuple[str, Candidate, bool]]:
    """Every method at every budget, and with ``prune.max_drop`` the smallest model within it per method (its tried
    budgets go to ``searches``): (name, candidate, reused from the cache)."""
    prune, bench = job.config.prune, job.config.bench
    round_to = prune.round_to or default_round_to(bench.backend, bench.precision)
    jobs: list[tuple[str, str, float]] = [(m, kind, t) for m in prune.methods for kind, t in prune.targets]
    if prune.max_drop is not None:
        jobs += [(m, "within", prune.max_drop) for m in prune.methods]
    out = []
    for i, (method, kind, target) in enumerate(jobs, 1):
        name = f"{method}-{kind}{target:g}" + ("pt" if kind == "within" else "")
        settings = {"method": method, "kind": kind, "target": target, "round_to": round_to,
                    "min_channels": prune.min_channels, "protect": sorted(prune.protect), "ends": prune.prune_ends,
                    "allocation": prune.allocation, "steps": prune.steps,
                    "recover": prune.recover, "mode": prune.recover_mode, "pooling": prune.pooling,
                    "batch_size": prune.batch_size, "seed": prune.seed,
                    **({"finetune_epochs": prune.finetune_epochs} if prune.finetune_epochs else {}),
                    **({"labels": _label_identity(prune)} if needs_labels(method) else {})}
        latency = _latency_budget(job, target) if kind == "latency" else None
        if latency is not None:  # a latency candidate depends on where latency is measured
            settings["latency_target"] = vars(latency.on)
            if latency.model_file is not None:  # or on the latency model it was planned against
                settings["latency_model"] = hashlib.sha256(latency.model_file.read_bytes()).hexdigest() \
                    if latency.model_file.is_file() else str(latency.model_file)
        key = content_key("candidate", model=run.prepared.sha256, data=calib_id, **settings)
        candidate = job.cache.load_candidate(key)
        search = job.cache.load_json("search", key, required=("tried",)) if kind == "within" else None
        if candidate is not None and (kind != "within" or search is not None):
            if search is not None:
                searches[name] = tuple(search["tried"])
            job.counts["candidates_reused"] += 1
            job.echo(f"candidate {i}/{len(jobs)} {name}: reused from the cache")
            out.append((name, candidate, True))
            continue
        if needs_stats(method):
            _use_cached_stats(job, run, calib_id)
        options = {"round_to": round_to, "min_channels": prune.min_channels, "protect": prune.protect,
                   "keep_first_and_last": not prune.prune_ends, "recover": prune.recover,
                   "recover_mode": prune.recover_mode, "allocation": prune.allocation}
        if kind == "within":
            job.echo(f"candidate {i}/{len(jobs)} {name}: the smallest model within {target:g} points (search)")
            candidate, _, tried = smallest_within(run, method, evaluation, target, **options)
            searches[name] = tried
            job.cache.save_json("search", key, {"tried": list(tried)})
        else:
            job.echo(f"candidate {i}/{len(jobs)} {name}: score, plan, apply, recover {prune.recover}")
            candidate = progressive(run, method, prune.steps, **options, latency=latency,
                                    **({} if latency else {f"target_{kind}": target}))
        if prune.finetune_epochs:
            from pipeline.training.finetune import FinetuneOptions

            job.echo(f"candidate {i}/{len(jobs)} {name}: finetune {prune.finetune_epochs} epoch(s)")
            candidate = run.finetune(candidate, FinetuneOptions(epochs=prune.finetune_epochs, seed=prune.seed))
        job.cache.save_candidate(key, candidate)
        job.counts["candidates_computed"] += 1
        out.append((name, candidate, False))
    return out


def _latency_budget(job: _Job, target: float) -> Any:
    """A latency budget measured as the bench section says (its backend, first batch, threads); latency models are
    cached in ``OUTPUT/cache/latency``."""
    from pipeline.deployment.latency_model import LatencyTarget
    from pipeline.deployment.latency_plan import LatencyBudget

    bench = job.config.bench
    cache = job.cache.root / "latency" if job.cache.enabled else None
    return LatencyBudget(target, LatencyTarget(backend=bench.backend, batch=bench.batch[0], threads=bench.threads,
                                               precision=bench.precision), cache_dir=cache,
                         model_file=job.config.prune.latency_model, progress=job.progress)


def _int8_twins(job: _Job, run: PruneRun, made: list[tuple[str, Candidate, bool]],
                calibration: Any) -> list[tuple[str, Candidate, bool]]:
    """With ``prune.quantize: int8``: the original and every candidate quantized (``<name>-int8``, calibrated on the
    calibration data; :mod:`pipeline.deployment.quantize`)."""
    if job.config.prune.quantize is None:
        return []
    from pipeline.deployment.quantize import Int8Quantizer, recipe_for
    from pipeline.selection.plan import PruningPlan

    sources = [("original", Candidate("original", PruningPlan(run.prepared.sha256, {}), run.prepared.model,
                                      {"method": "none"}, {}), False), *made]
    out = []
    for name, candidate, _ in sources:
        job.echo(f"int8: quantizing {name}")
        quantizer = Int8Quantizer(candidate.model, calibration, workdir=job.cache.root if job.cache.enabled else None,
                                  recipe=recipe_for(job.config.bench.backend).name)
        with job.timed("int8"):
            try:
                model = quantizer.quantize()
            finally:
                quantizer.close()
        out.append((f"{name}-int8", replace(candidate, model=model, budget={**candidate.budget, "quantize": "int8"}),
                    False))
    return out


def _evaluate(job: _Job, run: PruneRun, model: Any, data: Any, eval_id: dict[str, Any], *,
              reference: bool) -> dict[str, Any]:
    """Held-out metrics of a model (cached by the model's bytes, the reference and the data)."""
    key = content_key("eval", model=model_digest(model), reference=run.prepared.sha256 if reference else None,
                      data=eval_id, kind=run.labels.output_kind, decode=vars(run.labels.decode), dense_metrics=1)
    cached = job.cache.load_json("eval", key, required=EVAL_KEYS)
    if cached is not None and all(cached[k] is None or isinstance(cached[k], (int, float)) for k in EVAL_KEYS):
        job.counts["evaluations_reused"] += 1
        return cached
    metrics = run.evaluate(model, data, reference=reference)
    job.cache.save_json("eval", key, metrics)
    return metrics


def _latencies(bench: Any, path: str, batches: tuple[int, ...], baseline: str) -> tuple[BatchLatency, ...]:
    comparisons = {(c.model, c.batch): c for c in bench.comparisons}
    out = []
    for batch in batches:
        stats = bench.result(path, batch).latency
        speedup = 1.0 if path == baseline else comparisons[(path, batch)].speedup
        out.append(BatchLatency(batch=batch, median_ms=stats.median_s * 1e3, p90_ms=stats.p90_s * 1e3,
                                mean_ms=stats.mean_s * 1e3, speedup=speedup))
    return tuple(out)


def _result(run: PruneRun, name: str, candidate: Candidate, reused: bool, path: Path, evaluation: dict[str, Any],
            original: dict[str, Any], latency: tuple[BatchLatency, ...], output: Path) -> CandidateResult:
    cost, full = run.cost(candidate.model), run.prepared.cost
    pruned = evaluation["pruned"]
    drop = None if pruned["top1"] is None or original["top1"] is None else original["top1"] - pruned["top1"]
    groups = {g.id: {"size": g.size, "kept": len(candidate.plan.keep.get(g.id, range(g.size)))}
              for g in run.prepared.index.groups}
    kind = next((k for k in ("macs", "params", "latency") if candidate.budget.get(f"target_{k}") is not None), None)
    return CandidateResult(
        name=name, method=candidate.method, target_kind=kind or "none",
        target=float(candidate.budget[f"target_{kind}"]) if kind else 1.0,
        recover=str(candidate.recovery.get("method", "none")), path=str(path.relative_to(output)),
        sha256=sha256_file(path), macs=int(cost.macs), params=int(cost.params),
        macs_fraction=cost.macs / full.macs, params_fraction=cost.params / full.params,
        budget_reached=bool(candidate.plan.meta.get("reached", True)),
        notes=tuple(str(n) for n in candidate.plan.meta.get("notes", ())), top1=pruned["top1"], top5=pruned["top5"],
        top1_drop=drop, agreement=pruned["agreement"], relative_logit_error=pruned["relative_logit_error"],
        latency=latency, groups=groups, reused=reused, timings_s=dict(candidate.timings_s),
        metrics=pruned.get("metrics"), metric_changes=_metric_changes(original, pruned))


def _metric_changes(original: dict[str, Any], pruned: dict[str, Any]) -> dict[str, float] | None:
    """Candidate minus original of every dense metric both have (fractions), or None."""
    mine, theirs = pruned.get("metrics") or {}, original.get("metrics") or {}
    if not mine or not theirs:
        return None
    return {name: mine[name] - theirs[name] for name in METRIC_NAMES[mine["output_kind"]]
            if mine.get(name) is not None and theirs.get(name) is not None}


EVAL_KEYS = ("n", "top1", "top5", "agreement", "relative_logit_error")
"""What a cached evaluation must hold to be reused (:meth:`pipeline.evaluation.evaluate.EvalReport.to_dict`)."""


def _check_gates_fit_model(job: _Job, run: PruneRun) -> None:
    """Dense gates need a model whose first output is of their kind (:func:`pipeline.job.gates.check_gates_fit_model`)."""
    if any(name in DENSE_GATES for name in job.config.gates):
        check_gates_fit_model(job.config.gates, run.dense_kind())


def _check_gates_fit_data(job: _Job, evaluation: Any) -> None:
    needs = [g for g in ACCURACY_GATES if g in job.config.gates]
    if needs and evaluation.labels is None:
        raise UserInputError(f"gates {', '.join(needs)} need labelled evaluation data, but {evaluation.name} has no "
                             "labels; name the labels array (data.evaluation.label_key) or gate on min_agreement")


def _bench(job: _Job, paths: list[str]) -> Any:
    from pipeline.deployment.bench import measure

    bench = job.config.bench
    job.echo(f"benchmark: {len(paths)} models x batch {','.join(map(str, bench.batch))} on {bench.backend}, "
             f"{bench.rounds} interleaved rounds")
    with job.timed("bench"):
        return measure(paths, backend=bench.backend, batches=bench.batch, warmup_s=bench.warmup,
                       min_duration_s=bench.duration, min_iters=bench.iterations, rounds=bench.rounds,
                       threads=bench.threads, precision=bench.precision, progress=job.progress,
                       round_to=job.config.prune.round_to or default_round_to(bench.backend, bench.precision),
                       workdir=job.cache.root if bench.backend == "tensorrt" else None)


def run_job(config: RunConfig, *, progress: bool = True, echo: Echo | None = None, use_cache: bool = True,
            tracker: Any = None) -> RunReport:
    """Run a whole job (module docstring) and return its report (``report.exit_code``: 0 or 3).

    Args:
        config: the validated job (:func:`pipeline.job.config.load_config`).
        progress: tqdm bars for the long stages.
        echo: where to say what happens (one line per step; default: nowhere).
        use_cache: reuse and fill ``OUTPUT/cache`` (False: compute everything, write no cache).
        tracker: an open :class:`pipeline.job.tracking.MlflowTracker`, or None.
    """
    output = config.output
    if config.prune.finetune_epochs:
        from pipeline.model.torch_bridge import require_torch

        require_torch("prune.finetune_epochs")
    check_run_paths(config)
    _prepare_output(output)
    with output_lock(output):
        return _run_locked(config, progress=progress, echo=echo, use_cache=use_cache, tracker=tracker)


def _run_locked(config: RunConfig, *, progress: bool, echo: Echo | None, use_cache: bool, tracker: Any) -> RunReport:
    """:func:`run_job` once the output folder is locked."""
    output = config.output
    job = _Job(config, RunCache(output / "cache", enabled=use_cache), echo or (lambda _: None), progress)
    if use_cache:  # also where recovery may spill activations
        job.cache.root.mkdir(parents=True, exist_ok=True)
    calibration = None if config.calibration is None else _open(config.calibration, evaluation=False)
    evaluation = _open(config.evaluation, evaluation=True)
    _check_gates_fit_data(job, evaluation)
    prune = config.prune
    cluster = None
    if prune.workers is not None or prune.ray is not None:
        from pipeline.cluster import ray_options

        cluster = ray_options(workers=prune.workers, address=prune.ray)
    with ray_started(cluster, calibration):
        return _run_stages(job, config, calibration, evaluation, cluster, progress, use_cache, tracker)


def _run_stages(job: _Job, config: RunConfig, calibration: Any, evaluation: Any, cluster: Any, progress: bool,
                use_cache: bool, tracker: Any) -> RunReport:
    """:func:`run_job` once the data is open (and Ray started when the config asks for it)."""
    output = config.output
    model_path = _model_path(job)
    prune = config.prune
    run = PruneRun(model_path, calibration, pooling=prune.pooling, batch_size=prune.batch_size, seed=prune.seed,
                   progress=progress, work_dir=job.cache.root if use_cache else None, task=config.task,
                   cluster=cluster, shard_batches=prune.shard_batches, labels=prune.label_options())
    evaluation = run.check_data(run.task_data(evaluation, "evaluation"), "evaluation", labels=True)
    _check_gates_fit_model(job, run)
    groups = run.prepared.index.groups
    job.echo(f"model {model_path.name}: {len(groups)} channel groups, {sum(g.prunable for g in groups)} prunable")
    if config.task is not None:
        job.echo(f"task {config.task.describe()}: " + ", ".join(f"{n} {role} samples of other classes dropped"
                                                                for role, n in run.dropped.items()))
    task = None if config.task is None else config.task.to_dict()
    calib_id = None if calibration is None else {**data_identity(config.calibration, calibration.name), "task": task}
    eval_id = {**data_identity(config.evaluation, evaluation.name), "task": task}
    searches: dict[str, tuple[dict[str, Any], ...]] = {}
    made = _candidates(job, run, calib_id, evaluation, searches)
    made += _int8_twins(job, run, made, calibration)
    if job.counts["calibration"] == "not needed" and any(needs_stats(m) for m in prune.methods):
        job.counts["calibration"] = "not needed (every candidate reused)"
    job.echo(f"evaluate: the original and {len(made)} candidate(s) on {evaluation.num_samples} samples")
    original = _evaluate(job, run, run.prepared.model, evaluation, eval_id, reference=False)
    paths = []
    for name, candidate, _ in made:
        metrics = {"original": original, "pruned": _evaluate(job, run, candidate.model, evaluation, eval_id,
                                                             reference=True)}
        path = output / "candidates" / f"{name}.onnx"
        with job.timed("write"):
            write_candidate(run, candidate, path, evaluation=metrics, search=searches.get(name, ()))
        paths.append((name, candidate, path, metrics))
    bench = _bench(job, [str(model_path), *(str(p[2]) for p in paths)])
    return _finish(job, run, model_path, calibration, evaluation, original, paths, made, bench, tracker)


def _finish(job: _Job, run: PruneRun, model_path: Path, calibration: Any, evaluation: Any, original: dict[str, Any],
            paths: list[tuple[str, Candidate, Path, dict[str, Any]]], made: list[tuple[str, Candidate, bool]],
            bench: Any, tracker: Any) -> RunReport:
    """Judge, write best.onnx, plots, report.json and report.md; log to MLflow."""
    config, output = job.config, job.config.output
    batches = config.bench.batch
    reused = {name: flag for name, _, flag in made}
    results = [_result(run, name, cand, reused[name], path, metrics, original,
                       _latencies(bench, str(path), batches, str(model_path)), output)
               for name, cand, path, metrics in paths]
    orig_latency = _latencies(bench, str(model_path), batches, str(model_path))
    accuracy = score(original)[1] if score(original)[1] is not None else 1.0
    judged, best = judge(results, config.gates, (1.0, orig_latency[0].median_ms, accuracy))
    original_entry = {"path": str(model_path), "sha256": run.prepared.sha256, "macs": int(run.prepared.cost.macs),
                      "params": int(run.prepared.cost.params), **original,
                      "latency": [vars(b) for b in orig_latency]}
    data: dict[str, Any] = {"evaluation": {"name": evaluation.name, "n": evaluation.num_samples}}
    if run.data is not None:
        data["calibration"] = {"name": run.data.name, "n": run.data.num_samples}
    for role, dropped in run.dropped.items():  # with a task: samples of other classes
        data[role]["dropped_other_classes"] = dropped
    if run.task is not None:
        data["task"] = run.task_record()
    bench_doc = {"backend": bench.backend, "settings": {**dict(bench.settings), "batches": list(batches)},
                 "machine": dict(bench.machine), "warnings": list(bench.warnings),
                 "noise": bench.to_dict()["noise"]}
    timings = {**{("prepare" if k == "analyze" else k): v for k, v in run.timings.items()}, **job.timings}
    report = RunReport(config=config.to_dict(), original=original_entry, data=data, candidates=tuple(judged),
                       gates=dict(config.gates), best=best, bench=bench_doc, cache=dict(job.counts), timings_s=timings,
                       mlflow=None if tracker is None else tracker.describe())
    _write_best(output, None if best is None else report.candidate(best))
    with job.timed("plots"):
        report = replace(report, plots=write_plots(report.to_dict(), output / "plots", output))
    if "skipped" in report.plots:
        job.echo(f"plots skipped: {report.plots['skipped']}")
    report = replace(report, timings_s={**report.timings_s, **job.timings})
    atomic_write_files({output / "report.json": report.to_json().encode(),
                        output / "report.md": report.to_markdown().encode()})
    if tracker is not None:
        job.echo(f"mlflow: logging the run and {len(report.candidates)} child run(s) to {tracker.uri}")
        tracker.log_run(report, output)
    return report


def run_config(config: RunConfig, *, mlflow_uri: str | None = None, mlflow: bool = False, progress: bool = True,
               echo: Echo | None = None, use_cache: bool = True) -> RunReport:
    """:func:`run_job` with MLflow when asked (``mlflow`` or the config's ``mlflow:`` section; ``mlflow_uri`` None:
    the config's URI, else a sqlite store in the output folder). The parent run is opened before the work and marked
    FAILED when the job fails."""
    spec = config.mlflow
    if not (mlflow or spec is not None):
        return run_job(config, progress=progress, echo=echo, use_cache=use_cache)
    from pipeline.job.tracking import MlflowTracker, default_uri

    check_run_paths(config)
    _prepare_output(config.output)
    with output_lock(config.output):
        uri = mlflow_uri or (spec.uri if spec is not None else None) or default_uri(config.output)
        name = config.source.stem if config.source is not None else config.output.name
        tracker = MlflowTracker(uri, spec.experiment if spec is not None else "diprune", name, config.output)
        try:
            return _run_locked(config, progress=progress, echo=echo, use_cache=use_cache, tracker=tracker)
        except BaseException:
            tracker.fail()
            raise
