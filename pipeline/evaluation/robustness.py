"""Robustness of a pruned model next to its original: Gaussian noise and adversarial examples (Tian et al. §4.3).

For held-out labelled data ``x`` (the model's input, already normalised), ``s`` = the standard deviation of the
inputs over the evaluation set:

* **noise**: ``x + σ s ε`` with ``ε ~ N(0, 1)`` (seeded) for each ``σ`` in ``noise`` (relative strengths);
* **FGSM**: ``x + ε s · sign(∇_x CE(original(x), y))``, crafted on the ORIGINAL model;
* **PGD**: ``steps`` iterations of ``x_{t+1} = Π_{||x' - x||_∞ <= ε s}(x_t + α sign(∇ CE))`` from ``x`` with
  ``α = 2.5 ε s / steps`` (Madry et al.), also on the original model (no random start: runs are deterministic).

Both models are then evaluated with onnxruntime on the same perturbed inputs: top-1 of each and their agreement.
The pruned model never contributes gradients: an attack crafted on the original transfers to it, which is how the
paper compares pruned and unpruned models (it transferred attacks from a separate ResNet-50). Gradients need torch:
the original ONNX model is converted with onnx2torch (the ``[torch]`` extra); without it, or when the converter does
not cover the model's ops, the adversarial part is reported as not done with the reason, and the noise part still
runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from pipeline.errors import UnsupportedModelError, UserInputError
from pipeline.model.runtime import feed_batches, model_input_specs, open_session, run

logger = logging.getLogger(__name__)

NOISE = (0.1, 0.25, 0.5)
EPSILONS = (0.05, 0.1, 0.2)
PGD_STEPS = 5


def _batches(model: onnx.ModelProto, dataset: Any, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    specs = model_input_specs(model)
    if len(specs) != 1:
        raise UserInputError(f"robustness needs a model with one input, this one has {sorted(specs)}")
    out = []
    for feeds, labels in feed_batches(dataset, specs, batch_size):
        if labels is None:
            raise UserInputError("robustness needs labelled evaluation data (top-1 under perturbation)")
        out.append((next(iter(feeds.values())), np.asarray(labels, np.int64)))
    return out


def _scores(sessions: Sequence[Any], name: str, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    hits = [0] * len(sessions)
    agree = total = 0
    for x, y in batches:
        preds = [run(s, None, {name: x}, stage="robustness")[0].argmax(axis=1) for s in sessions]
        hits = [h + int((p == y).sum()) for h, p in zip(hits, preds, strict=True)]
        agree += int((preds[0] == preds[-1]).sum())
        total += len(y)
    return {"top1_original": hits[0] / total, "top1_pruned": hits[-1] / total, "agreement": agree / total}


def _torch_model(model: onnx.ModelProto) -> Any:
    """The model as a torch module (:func:`pipeline.model.torch_bridge.to_torch`), or a reason string when that is not
    possible."""
    from pipeline.model.torch_bridge import to_torch

    try:
        module = to_torch(model).module.eval()
    except UserInputError:
        return "needs the [torch] extra with onnx2torch (not installed)"
    except UnsupportedModelError as err:
        return str(err)
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def _attack(module: Any, x: np.ndarray, y: np.ndarray, eps: float, steps: int) -> np.ndarray:
    import torch

    base = torch.from_numpy(x)
    target = torch.from_numpy(y)
    adv = base.clone()
    step = eps if steps == 1 else 2.5 * eps / steps  # Madry et al.: the ball's edge is reachable
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(module(adv), target)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = base + (adv + step * grad.sign() - base).clamp(-eps, eps)
    return adv.detach().numpy().astype(x.dtype)


def robustness(original: onnx.ModelProto, pruned: onnx.ModelProto, dataset: Any, *,
               noise: Sequence[float] = NOISE, epsilons: Sequence[float] = EPSILONS, pgd_steps: int = PGD_STEPS,
               batch_size: int = 256, seed: int = 0, backend: str = "auto",
               intra_op_threads: int | None = None) -> dict[str, Any]:
    """Top-1 of both models and their agreement, clean, under noise and under attacks (module docstring)."""
    batches = _batches(original, dataset, batch_size)
    name = original.graph.input[0].name
    scale = float(np.std(np.concatenate([x.reshape(len(x), -1) for x, _ in batches])))
    sessions = [open_session(m.SerializeToString(), backend, intra_op_threads) for m in (original, pruned)]
    result: dict[str, Any] = {"samples": sum(len(y) for _, y in batches), "input_std": scale,
                              "clean": _scores(sessions, name, batches), "noise": {}, "fgsm": {}, "pgd": {}}
    rng = np.random.default_rng(seed)
    for sigma in noise:
        noisy = [((x + sigma * scale * rng.standard_normal(x.shape)).astype(x.dtype), y) for x, y in batches]
        result["noise"][str(sigma)] = _scores(sessions, name, noisy)
    module = _torch_model(original)
    if isinstance(module, str):
        result["adversarial"] = f"not done: {module}"
        logger.warning("robustness: adversarial examples %s", result["adversarial"])
        return result
    for eps in epsilons:
        for kind, steps in (("fgsm", 1), ("pgd", pgd_steps)):
            adv = [(_attack(module, x, y, eps * scale, steps), y) for x, y in batches]
            result[kind][str(eps)] = _scores(sessions, name, adv)
    result["pgd_steps"] = pgd_steps
    return result
