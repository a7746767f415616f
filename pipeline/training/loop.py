"""The training loop the optional torch stages share (:mod:`pipeline.training.finetune`, :mod:`pipeline.training.push`).

* :func:`converted`: the ONNX model as a :class:`pipeline.model.torch_bridge.TorchGraph` in eval mode, the data bound to
  its inputs, and the round-trip check: torch must reproduce onnxruntime on the first 16 samples (relative error
  <= ``ROUND_TRIP_TOLERANCE``) before anything is trained;
* :func:`teacher_logits`: the teacher's first output on every sample, computed once with onnxruntime (a teacher
  that runs only for its logits costs one inference per sample, not one per sample and epoch);
* :func:`prepare_student`: both of these for a model distilled from a teacher (:class:`Student`), and
  :func:`written`: its trained weights written back into the ONNX graph and checked (``WRITE_BACK_TOLERANCE``);
* :func:`distillation`: the distillation term ``w * T^2 * KL(softmax(t / T) || softmax(s / T))`` (Hinton et al.
  2015; ``T^2`` keeps the soft-target gradients on the scale of the hard-label ones);
* :func:`train`: Adam on the linked parameters, a linear warm-up over the first ``WARMUP`` of the steps (Adam's
  first steps are large relative to the weights of a refit model), then cosine decay to 0 or a constant rate
  (``SCHEDULES``), a seeded shuffle per epoch, a tqdm bar, a callback after every epoch; the loss is the caller's.

Models stay in eval mode while they are trained: BatchNorm keeps its running statistics (initializers the ONNX graph
reads as they are) and dropout is off, so what is trained is exactly what the ONNX graph computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from pipeline.data.datasets import validate_batch
from pipeline.errors import UserInputError, VerificationError
from pipeline.model.runtime import model_input_specs, open_session, stream
from pipeline.model.torch_bridge import TorchGraph, parity, to_torch, write_back

ROUND_TRIP_TOLERANCE = 1e-5
WRITE_BACK_TOLERANCE = 1e-4
WARMUP = 0.1  # share of the steps with a linear learning-rate warm-up
CHECK_SAMPLES = 16

Batch = tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]
LossFn = Callable[[np.ndarray, Mapping[str, Any], np.ndarray | None], Any]


def batches(data: Any, size: int, rng: np.random.Generator | None = None,
            indices: np.ndarray | None = None) -> Iterator[Batch]:
    """``(indices, feeds, labels)`` of a bound dataset (``indices``: only these samples), in a seeded random order
    (``rng`` None: in order)."""
    pool = np.arange(data.num_samples) if indices is None else np.asarray(indices)
    order = pool[rng.permutation(len(pool))] if rng is not None else pool
    n = len(order)
    for start in range(0, n, size):
        idx = order[start:start + size]
        feeds = data.loader(idx)
        if data.input_name is not None and len(data.keys) == 1:
            feeds = {data.input_name: feeds[data.keys[0]]}
        yield idx, feeds, (None if data.labels is None else data.labels[idx])


def as_tensors(torch: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Feeds as torch tensors (sharing memory where numpy allows)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


def converted(model: onnx.ModelProto, data: Any, what: str) -> tuple[TorchGraph, Any, dict[str, np.ndarray], float]:
    """The model in torch (eval mode), the data bound to its inputs, the check feeds and the round-trip error.

    Raises:
        UserInputError: no data, or data that does not fit the model.
        VerificationError: torch does not reproduce onnxruntime within ``ROUND_TRIP_TOLERANCE``.
    """
    if data is None or data.num_samples == 0:
        raise UserInputError(f"{what} needs data: pass --data (the calibration data, e.g. mnist or an .npz)")
    specs = model_input_specs(model)
    bound = data.bind(list(specs))
    graph = to_torch(model)
    graph.module.eval()
    _, feeds, _ = next(batches(bound, CHECK_SAMPLES))
    validate_batch(feeds, specs, f"dataset '{bound.name}'")
    error = parity(model, graph, feeds)
    if error > ROUND_TRIP_TOLERANCE:
        raise VerificationError(f"{what}: onnx2torch does not reproduce the model (relative error {error:.2e} > "
                                f"{ROUND_TRIP_TOLERANCE:g}); nothing was trained")
    return graph, bound, feeds, error


def check_write_back(model: onnx.ModelProto, graph: TorchGraph, feeds: Mapping[str, np.ndarray], what: str) -> float:
    """Relative error of the written model against the trained module (must be <= ``WRITE_BACK_TOLERANCE``)."""
    error = parity(model, graph, feeds)
    if error > WRITE_BACK_TOLERANCE:
        raise VerificationError(f"{what}: the written model differs from the trained one (relative error "
                                f"{error:.2e}); the parameters were not mapped back correctly")
    return error


def teacher_logits(model: onnx.ModelProto, data: Any, *, batch_size: int = 256, threads: int = 1) -> np.ndarray:
    """The model's first output on every sample of ``data`` (in order), float32, computed with onnxruntime."""
    specs = model_input_specs(model)
    session = open_session(model.SerializeToString(), "ort-cpu", threads)
    name = model.graph.output[0].name
    parts = [batch.outputs[0] for batch in stream(session, data, [name], specs, batch_size=batch_size,
                                                  stage="teacher")]
    return np.concatenate(parts).astype(np.float32)


@dataclass(frozen=True)
class Student:
    """A model ready to be distilled: in torch (eval mode), the data bound to its inputs, the feeds the round trip
    was checked on and its error, the teacher's logits per sample and the name of the model's logits output."""

    graph: TorchGraph
    data: Any
    check: dict[str, np.ndarray]
    round_trip: float
    targets: np.ndarray
    logits: str


def prepare_student(model: onnx.ModelProto, teacher: onnx.ModelProto, data: Any, what: str, *,
                    threads: int = 1) -> Student:
    """``model`` converted (:func:`converted`) and ``teacher``'s logits on the bound data (:func:`teacher_logits`).

    Raises:
        UserInputError, VerificationError: as :func:`converted`.
    """
    graph, bound, check, error = converted(model, data, what)
    targets = teacher_logits(teacher, bound, threads=threads)
    return Student(graph, bound, check, error, targets, model.graph.output[0].name)


def written(model: onnx.ModelProto, graph: TorchGraph, check: Mapping[str, np.ndarray],
            what: str) -> tuple[onnx.ModelProto, float]:
    """``model`` with the trained parameters of ``graph`` written back, and its error (:func:`check_write_back`)."""
    trained = write_back(model, graph)
    return trained, check_write_back(trained, graph, check, what)


def distillation(torch: Any, student_logits: Any, teacher_logits: Any, temperature: float, weight: float) -> Any:
    """``weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    functional = torch.nn.functional
    return weight * temperature * temperature * functional.kl_div(
        functional.log_softmax(student_logits / temperature, dim=1),
        functional.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean", log_target=True)


SCHEDULES = ("cosine", "constant")


def learning_rate_factor(step: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up over the first ``WARMUP`` of the steps, then cosine decay to 0 (``cosine``) or the peak rate
    to the end (``constant``)."""
    warm = max(1, round(WARMUP * total))
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train(torch: Any, params: Sequence[Any], data: Any, loss_fn: LossFn, *, epochs: int, batch_size: int,
          lr: float, seed: int, progress: bool, desc: str, indices: np.ndarray | None = None,
          on_epoch: Callable[[int], None] | None = None, schedule: str = "cosine") -> tuple[list[float], int]:
    """Minimise ``loss_fn(indices, tensors, labels)`` over ``epochs`` passes over the samples ``indices`` (default
    all); ``on_epoch(epoch)`` runs after every epoch (1-based). Returns the mean loss per epoch and the number of
    steps (module docstring)."""
    from tqdm import tqdm

    if not params:
        raise UserInputError(f"{desc}: no parameter of the model could be linked to an initializer; nothing to train")
    per_epoch = math.ceil((data.num_samples if indices is None else len(indices)) / batch_size)
    total = epochs * per_epoch
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda step: learning_rate_factor(step, total, schedule))
    rng = np.random.default_rng(seed)
    losses = []
    with tqdm(total=total, desc=desc, unit="step", disable=not progress) as bar:
        for epoch in range(epochs):
            running = 0.0
            for idx, feeds, labels in batches(data, batch_size, rng, indices):
                loss = loss_fn(idx, as_tensors(torch, feeds), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                running += float(loss.detach())
                bar.update(1)
            losses.append(running / per_epoch)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_epoch is not None:
                on_epoch(epoch + 1)
    return losses, total
