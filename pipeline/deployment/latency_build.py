"""Measuring a latency model (:func:`build_latency_model`): the variants timed and profiled on the target, the model
fitted and validated, and the cache of measured models (:func:`latency_model_for`); the method is in the
:mod:`pipeline.deployment.latency_model` docstring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from graph_ops.groups import ChannelGroupIndex
from graph_ops.io import atomic_write_bytes, check_writable_dir
from graph_ops.prune import apply_plan
from pipeline.deployment.bench import machine_info
from pipeline.deployment.latency_fit import _calibrate, _fit, _Graph
from pipeline.deployment.latency_model import LatencyModel, LatencyTarget, block_size
from pipeline.deployment.timing import (
    interleaved_ratios,
    profile_kernels,
)
from pipeline.errors import UserInputError
from pipeline.model.prepare import PreparedModel
from pipeline.selection.widths import _ladder

logger = logging.getLogger(__name__)


VALIDATION_FRACTIONS = (0.75, 0.5, 0.3)


def table_key(prepared: PreparedModel, target: LatencyTarget, round_to: int, min_channels: int) -> dict[str, Any]:
    """What a latency model depends on (module docstring, "Cache")."""
    from graph_ops.proto import fingerprint

    machine = machine_info()
    device = machine["cpu"] if target.backend == "ort-cpu" else ",".join(machine["ort_available_providers"])
    return {"backend": target.backend, "device": device, "versions": machine["versions"],
            "threads": target.threads, "batch": target.batch, "precision": target.precision,
            "round_to": round_to, "min_channels": min_channels, "variants": target.variants,
            "block": block_size(target), "fingerprint": fingerprint(prepared.model)}


def key_digest(key: Mapping[str, Any]) -> str:
    """Short stable digest of a key (the cache file's name)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def model_ladders(index: ChannelGroupIndex, round_to: int, min_channels: int) -> dict[str, list[int]]:
    """The width ladder of every prunable group that has more than one width."""
    ladders = {g.id: _ladder(g.size, round_to, min_channels) for g in index.groups if g.prunable}
    return {gid: ladder for gid, ladder in ladders.items() if len(ladder) > 1}


def _variant_widths(ladders: Mapping[str, list[int]], target: LatencyTarget) -> list[dict[str, int]]:
    """The full model, ``target.variants`` random width assignments, then the validation fractions."""
    rng = np.random.default_rng(target.seed)
    random = [{gid: int(ladder[rng.integers(len(ladder))]) for gid, ladder in ladders.items()}
              for _ in range(target.variants)]
    uniform = [{gid: min(ladder, key=lambda w, f=f, size=ladder[0]: abs(w - f * size))
                for gid, ladder in ladders.items()} for f in VALIDATION_FRACTIONS]
    return [{}, *random, *uniform]


def variant_model(prepared: PreparedModel, widths: Mapping[str, int]) -> bytes:
    """The serialized model with each group cut to its first ``widths[group]`` channels."""
    keep = {gid: tuple(range(w)) for gid, w in widths.items() if w < prepared.index.by_id[gid].size}
    return prepared.at_sizes(apply_plan(prepared.model, prepared.index, keep, verify=False))


def _whole_ratios(prepared: PreparedModel, all_widths: list[dict[str, int]], target: LatencyTarget,
                  chunk: int = 4, bar: Any = None) -> tuple[list[float], float]:
    """Whole-model latency of every variant relative to the first (full) model, in chunks of interleaved rounds that
    each include the full model (models are made per chunk: bounded memory for large models), and the full model's
    median microseconds (over the chunks)."""
    full = variant_model(prepared, all_widths[0])
    ratios, full_us = [1.0], []
    for start in range(1, len(all_widths), chunk - 1):
        part = [variant_model(prepared, w) for w in all_widths[start:start + chunk - 1]]
        measured = interleaved_ratios([full, *part], backend=target.backend, batch=target.batch,
                                      threads=target.threads, rounds=target.rounds,
                                      round_seconds=target.round_seconds, seed=target.seed)
        ratios += list(measured.ratios[1:])
        full_us.append(measured.median_s[0] * 1e6)
        if bar is not None:
            bar.update(len(part))
    return ratios, float(np.median(full_us))


def _macs_fraction(index: ChannelGroupIndex, widths: Mapping[str, int]) -> float:
    return index.predict(widths)[0] / index.predict()[0]


def build_latency_model(prepared: PreparedModel, target: LatencyTarget | None = None, *, round_to: int = 8,
                        min_channels: int = 8, progress: bool = False) -> LatencyModel:
    """Measure and fit the latency model of a prepared model on ``target`` (module docstring); ``progress``: a tqdm
    bar on stderr over the variants profiled and timed (the build takes tens of seconds to minutes).

    Raises:
        UserInputError: a precision other than fp32, a backend that is not onnxruntime or not active here, or a
            model without a prunable group.
    """
    target = target or LatencyTarget()
    if target.precision != "fp32":
        raise UserInputError(f"the latency model measures fp32 models, not {target.precision}; the INT8 latency of a "
                             "pruned model is measured after quantization (--quantize int8)")
    index = prepared.index
    ladders = model_ladders(index, round_to, min_channels)
    if not ladders:
        raise UserInputError("the model has no group that can be pruned at these widths; nothing to model")
    all_widths = _variant_widths(ladders, target)
    fit_count = 1 + target.variants
    observations = []
    from tqdm import tqdm

    with tqdm(total=fit_count + len(all_widths) - 1, desc="latency model", unit="variant", file=sys.stderr,
              disable=not progress) as bar:
        for i, widths in enumerate(all_widths[:fit_count]):
            profile = profile_kernels(variant_model(prepared, widths), backend=target.backend, batch=target.batch,
                                      threads=target.threads, seed=target.seed)
            observations.append((index.full_widths() | widths, profile))
            logger.info("latency model: variant %d/%d profiled (%.3f ms)", i + 1, fit_count, profile.run_us / 1e3)
            bar.update(1)
        ratios, full_us = _whole_ratios(prepared, all_widths, target, bar=bar)
    kernels = tuple(_fit(_Graph.of(prepared), observations, block_size(target)))
    provisional = LatencyModel({}, index.full_widths(), kernels, 1.0, 0.0)
    kernel_sums = np.array([provisional.kernel_us(w) for w, _ in observations])
    scale, offset, exponent = _calibrate(kernel_sums, np.array(ratios[:fit_count]) * full_us)
    model = LatencyModel(table_key(prepared, target, round_to, min_channels), index.full_widths(), kernels, scale,
                         offset, exponent)
    samples = tuple({"macs_fraction": round(_macs_fraction(index, w), 4), "kernel_us": round(float(s), 1),
                     "measured_ratio": round(float(r), 4), "predicted_ratio": round(model.ratio(w), 4)}
                    for (w, _), s, r in zip(observations, kernel_sums, ratios, strict=False))
    predicted = [model.ratio(w) for w in all_widths[fit_count:]]
    measured = ratios[fit_count:]
    validation = {"fractions": list(VALIDATION_FRACTIONS),
                  "macs_fraction": [round(_macs_fraction(index, w), 4) for w in all_widths[fit_count:]],
                  "predicted_ratio": [round(p, 4) for p in predicted], "measured_ratio": [round(m, 4) for m in measured],
                  "errors": [round(p / m - 1, 4) for p, m in zip(predicted, measured, strict=True)]}
    model = replace(model, samples=samples, validation=validation)
    logger.info(model.summary())
    return model


def latency_model_for(prepared: PreparedModel, target: LatencyTarget, cache_dir: str | Path | None, *,
                      round_to: int = 8, min_channels: int = 8, progress: bool = False) -> LatencyModel:
    """The cached latency model of this model on this target, or a new measurement (written to ``cache_dir``).

    One process builds an entry at a time: the entry's lock (``<entry>.lock``, :mod:`pipeline.locks`) is held
    while it is looked up, built and written; a second process asking for the same entry waits for it and then
    reuses it instead of measuring it again (and both measuring at once would also disturb each other's timings).
    """
    key = json.loads(json.dumps(table_key(prepared, target, round_to, min_channels), default=str))
    if cache_dir is None:
        return build_latency_model(prepared, target, round_to=round_to, min_channels=min_channels, progress=progress)
    from pipeline.locks import exclusive_lock

    path = check_writable_dir(cache_dir, "latency model cache") / f"latency-{key_digest(key)}.json"
    with exclusive_lock(path.with_name(f"{path.name}.lock"), f"latency model cache entry {path}", wait=True,
                        on_wait=f"another diprune is building the latency model {path.name}; waiting to reuse it"):
        return _cached_latency_model(prepared, target, path, key, round_to=round_to, min_channels=min_channels,
                                     progress=progress)


def _cached_latency_model(prepared: PreparedModel, target: LatencyTarget, path: Path, key: Any, *, round_to: int,
                          min_channels: int, progress: bool) -> LatencyModel:
    """:func:`latency_model_for` with the entry locked."""
    if path.is_file():
        try:
            model = LatencyModel.from_json(path.read_text())
        except (ValueError, KeyError, TypeError, UserInputError) as err:
            logger.warning("ignoring unreadable latency model cache %s (%s); measuring again", path, err)
        else:
            if dict(model.key) == key:
                logger.info("latency model reused from %s", path)
                return model
    model = build_latency_model(prepared, target, round_to=round_to, min_channels=min_channels, progress=progress)
    atomic_write_bytes(path, model.to_json().encode())
    return model
