"""Grow-Push-Prune's *push* step before DI pruning (Tian, Arbel, Clark, arXiv 2009.13716): an optional torch stage.

The paper alternates a push step, "a training objective that simultaneously maximises class separation, penalises
covariances, and pushes the deep discriminants into alignment with a compact set of neurons", with a prune step
that drops the neurons left with little utility. Only its abstract (and a cross-reference in the authors' CVIU
paper, §5) could be read, so the loss below is our reconstruction (``methods.md`` §4, [INFERRED]); the weights are
ours, chosen on the MNIST families (``benchmarks/finetune.py``). The grow step (appending Inception modules when a
net lacks capacity) is not built: DIPrune prunes the architecture it is given.

The model (ONNX, or a PyTorch model exported first) is converted to torch (:mod:`pipeline.model.torch_bridge`) and trained
for ``epochs`` on labelled calibration data with, per batch of ``B`` samples::

    L = w_ce * CE(s, y) + w_kd * T^2 * KL(softmax(t / T) || softmax(s / T))              # keep the task
      + mean over probes p of [ w_sep * L_sep(h_p) + w_cov * L_cov(h_p) + w_align * L_align(h_p) ]

``s`` / ``t`` are the model's and the original's logits; ``h_p`` (B x C) the globally average-pooled activations at
probe ``p`` (what DI scores: the tensors the exit consumers of each prunable channel group read). With the batch's
per-channel between-class variance ``b_j = sum_k (n_k / B) (mu_kj - mu_j)^2``, within-class variance ``w_j`` and
within-class covariance ``S_w``:

* ``L_sep = 1 - sum_j b_j / sum_j (b_j + w_j)``: one minus the share of the features' variance that separates the
  classes (the trace-ratio form of Fisher's criterion, bounded in [0, 1]). *Maximise class separation*: the more of
  a layer's variance is between-class, the more each kept channel carries for the task.
* ``L_cov = sum_{i != j} R_ij^2 / (C (C - 1))`` with ``R`` the within-class correlation matrix (``S_w`` scaled to
  a unit diagonal). *Penalise covariances*: the paper's pruning reads per-neuron Fisher ratios, which are the
  discriminant directions only when the within-class scatter is diagonal (CVIU paper Eq. 8); decorrelated channels
  also make DI's per-channel drops (``methods.md`` §1.4) closer to independent, so removing one costs what it says.
* ``L_align = H(q) / log C`` with ``q_j = b_j / sum_j b_j``: the normalised entropy of how the between-class variance
  is spread over the channels. *Align the discriminants with a compact set of neurons*: low entropy means few
  channels hold the class separation, so the DI planner can drop the rest at little cost.

Defaults (:class:`PushOptions`): ``w_ce = 1`` (labels are required: separation needs classes), ``w_kd = 1`` at
``T = 4`` (the pushed model must keep doing what the original did), ``w_sep = w_cov = w_align = 1`` (each term lies
in [0, 1], as do CE and KD near convergence, so equal weights give the three push terms the task's order of
magnitude; in a spot check on the ResNet family, 3 epochs on 2,000 digits moved them from 0.30 / 0.16 / 0.92 to
0.28 / 0.15 / 0.89 with the unpruned held-out top-1 unchanged within noise, while at 0.1 they hardly moved and a
5x stronger alignment term cost 0.8 points after pruning to 8 % of the MACs), 3 epochs, batch 128 (about 13
samples per class for the batch statistics of ten classes), Adam at ``1e-3`` with warm-up and cosine decay
(:func:`pipeline.training.loop.train`). Whether the push helps DI pruning is measured, not assumed:
``benchmarks/results/finetune.md``.

:func:`push_and_prune` writes the pushed model (the same graph, new initializer values; the plan refers to this
file) and its record ``<pushed>.push.json``, then runs the usual prune (:func:`pipeline.prune.one_shot.prune`: DI,
plan, surgery, least-squares recovery, optional finetune) on it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.errors import UserInputError
from pipeline.model.prepare import PreparedModel, as_prepared
from pipeline.model.torch_bridge import torch_settings
from pipeline.training.loop import as_tensors, batches, distillation, prepare_student, train, written

logger = logging.getLogger(__name__)

MONITOR_SAMPLES = 1024
TERMS = ("sep", "cov", "align")


@dataclass(frozen=True)
class PushOptions:
    """Settings of the push step (module docstring)."""

    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 4.0
    sep_weight: float = 1.0
    cov_weight: float = 1.0
    align_weight: float = 1.0
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.threads < 1:
            raise UserInputError("push: epochs and threads must be at least 1, the batch size at least 2")
        if not (self.lr > 0 and self.temperature > 0):
            raise UserInputError("push: the learning rate and the temperature must be positive")
        weights = (self.ce_weight, self.kd_weight, self.sep_weight, self.cov_weight, self.align_weight)
        if min(weights) < 0:
            raise UserInputError("push: loss weights must be >= 0")


@dataclass(frozen=True)
class PushRecord:
    """What a push did: data, steps, the loss terms before and after, the round-trip checks."""

    options: Mapping[str, Any]
    samples: int
    steps: int
    seconds: float
    probes: tuple[str, ...]
    epoch_losses: tuple[float, ...]
    terms_before: Mapping[str, float]
    terms_after: Mapping[str, float]
    round_trip_error: float
    write_back_error: float
    trained_initializers: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        doc = asdict(self)
        doc.update(probes=list(self.probes), epoch_losses=[round(v, 6) for v in self.epoch_losses],
                   seconds=round(self.seconds, 2), monitor_samples=min(self.samples, MONITOR_SAMPLES))
        return doc

    def summary(self) -> str:
        """One line for the CLI."""
        terms = ", ".join(f"{k} {self.terms_before[k]:.3f} -> {self.terms_after[k]:.3f}" for k in TERMS)
        return (f"push: {self.options['epochs']} epochs over {self.samples} samples ({self.steps} steps, "
                f"{self.seconds:.1f} s) at {len(self.probes)} probes; {terms}")


def push_terms(torch: Any, features: Any, labels: Any) -> dict[str, Any]:
    """``L_sep``, ``L_cov`` and ``L_align`` of one probe's pooled features (B x C) and labels (module docstring)."""
    eps = 1e-8
    classes = torch.unique(labels)
    onehot = (labels[:, None] == classes[None, :]).to(features.dtype)  # B x K
    counts = onehot.sum(0)
    means = (onehot.T @ features) / counts[:, None]  # K x C
    centred_w = features - onehot @ means  # within-class residuals
    mean = features.mean(0)
    between = ((counts[:, None] / len(labels)) * (means - mean) ** 2).sum(0)  # b_j
    within_cov = centred_w.T @ centred_w / len(labels)
    within = torch.diagonal(within_cov)
    sep = 1 - between.sum() / (between.sum() + within.sum() + eps)
    scale = torch.rsqrt(within + eps)
    corr = within_cov * scale[:, None] * scale[None, :]
    c = features.shape[1]
    cov = ((corr ** 2).sum() - (torch.diagonal(corr) ** 2).sum()) / max(c * (c - 1), 1)
    share = between / (between.sum() + eps)
    align = -(share * torch.log(share + eps)).sum() / math.log(max(c, 2))
    return {"sep": sep, "cov": cov, "align": align}


def _pooled(value: Any) -> Any:
    """Global average over the spatial axes (B x C x ... -> B x C)."""
    return value.flatten(2).mean(2) if value.dim() > 2 else value


def _terms(torch: Any, outputs: Mapping[str, Any], probes: Sequence[str], labels: Any) -> dict[str, Any]:
    per_probe = [push_terms(torch, _pooled(outputs[p]), labels) for p in probes]
    return {k: torch.stack([t[k] for t in per_probe]).mean() for k in TERMS}


def _monitor(torch: Any, graph: Any, data: Any, probes: Sequence[str], batch_size: int) -> dict[str, float]:
    """Mean push terms over the first ``MONITOR_SAMPLES`` samples (batches of ``batch_size``)."""
    sums = dict.fromkeys(TERMS, 0.0)
    seen = 0
    with torch.no_grad():
        for _, feeds, labels in batches(data, batch_size):
            out = graph.forward(as_tensors(torch, feeds), probes)
            for key, value in _terms(torch, out, probes, torch.from_numpy(labels)).items():
                sums[key] += float(value) * len(labels)
            seen += len(labels)
            if seen >= MONITOR_SAMPLES:
                break
    return {k: v / max(seen, 1) for k, v in sums.items()}


def push(model: PreparedModel | str | os.PathLike[str], data: Any, options: PushOptions | None = None, *,
         probes: Sequence[str] | None = None, progress: bool = False) -> tuple[onnx.ModelProto, PushRecord]:
    """Train the canonical model with the push objective; return the same graph with the pushed weights.

    Args:
        model: a prepared model or an ONNX file (prepared here: canonicalized and analysed).
        data: labelled calibration data (:class:`pipeline.data.datasets.Dataset`).
        options: the settings (default :class:`PushOptions`).
        probes: the tensors whose features are pushed (default: every prunable group's probes).
        progress: a tqdm bar on stderr.

    Raises:
        UserInputError: torch missing, no data or no labels, no prunable group.
        UnsupportedModelError, VerificationError: as in :func:`pipeline.training.finetune.finetune`.
    """
    options = options or PushOptions()
    prepared = as_prepared(model)
    probes = tuple(probes if probes is not None else prepared.probes)
    if not probes:
        raise UserInputError("push: the model has no prunable channel group, so there is nothing to push")
    if data is not None and data.labels is None:
        raise UserInputError("push needs labelled data: class separation is measured against the labels "
                             "(name the labels array with --label-key)")
    start = time.perf_counter()
    with torch_settings(options.seed, options.threads) as torch:
        trainee = prepare_student(prepared.model, prepared.model, data, "push", threads=options.threads)
        graph, bound, logits = trainee.graph, trainee.data, trainee.logits
        targets = torch.from_numpy(trainee.targets)
        before = _monitor(torch, graph, bound, probes, options.batch_size)

        def loss_fn(idx: np.ndarray, feeds: Mapping[str, Any], labels: np.ndarray | None) -> Any:
            return _loss(torch, graph, options, logits, probes, targets[torch.from_numpy(idx)], feeds,
                         torch.from_numpy(labels))

        losses, steps = train(torch, graph.parameters(), bound, loss_fn, epochs=options.epochs,
                              batch_size=options.batch_size, lr=options.lr, seed=options.seed, progress=progress,
                              desc="push")
        after = _monitor(torch, graph, bound, probes, options.batch_size)
        pushed, write_error = written(prepared.model, graph, trainee.check, "push")
    record = PushRecord(options=asdict(options), samples=bound.num_samples, steps=steps,
                        seconds=time.perf_counter() - start, probes=probes, epoch_losses=tuple(losses),
                        terms_before=before, terms_after=after, round_trip_error=trainee.round_trip, write_back_error=write_error,
                        trained_initializers=len(graph.links))
    logger.info("%s", record.summary())
    return pushed, record


def _loss(torch: Any, graph: Any, options: PushOptions, logits: str, probes: Sequence[str], target: Any,
          feeds: Mapping[str, Any], labels: Any) -> Any:
    out = graph.forward(feeds, [logits, *probes])
    loss = options.ce_weight * torch.nn.functional.cross_entropy(out[logits], labels)
    loss = loss + distillation(torch, out[logits], target, options.temperature, options.kd_weight)
    terms = _terms(torch, out, probes, labels)
    return (loss + options.sep_weight * terms["sep"] + options.cov_weight * terms["cov"]
            + options.align_weight * terms["align"])


def default_pushed_path(out_path: str | os.PathLike[str]) -> Path:
    """Where ``push_and_prune`` writes the pushed model by default: ``<out stem>.pushed.onnx`` beside the output."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.pushed.onnx")


