"""How many calibration samples a model needs, from its analysis alone (before any data is read).

Two rules of thumb, the same ones the calibration and the recovery check after the fact:

* **Scoring** (DI, LDA, PLS-VIP): each probe's statistics hold a ``d x d`` scatter matrix of its pooled features,
  ``d = channels x K^2`` (``K`` the pooling grid, :mod:`pipeline.calibration.pooling`); a stable inverse wants about
  ``MIN_SAMPLES_PER_DIM = 10`` samples per feature, so ``10 d`` images for the widest probe.
* **Least-squares recovery** (R3): each refit layer solves for ``u = (inputs per group) x kernel taps + 1`` unknowns
  per output from rows drawn at up to ``positions`` output positions per image (64 by default; one row per image for
  a dense layer), and wants ``MIN_ROWS_PER_DIM = 10`` rows per unknown: ``ceil(10 u / rows per image)`` images for the
  most demanding layer. ``u`` is counted at the unpruned width (an upper bound: pruning shrinks it). Layers above
  ``max_dim`` unknowns get R2 instead and are listed apart.

Below the advice the ridge (chosen on held-out batches) and the keep-if-better guard of the recovery bound the harm;
the advice is where more data stops paying, not a hard floor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.calibration.calibrate import DEFAULT_POOLING, MIN_SAMPLES_PER_DIM, POOLINGS
from pipeline.calibration.pooling import consumer_bins
from pipeline.model.prepare import PreparedModel
from pipeline.recovery import RecoveryOptions
from pipeline.recovery.sweep import MIN_ROWS_PER_DIM
from pipeline.selection.widths import default_protected


@dataclass(frozen=True)
class SampleAdvice:
    """Advised calibration images for scoring and for recovery, and the probe / layer that sets each."""

    scoring_images: int
    widest_probe: str | None
    probe_features: int
    recovery_images: int
    hardest_layer: str | None
    layer_unknowns: int
    rows_per_image: int
    r2_layers: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"scoring_images": self.scoring_images, "widest_probe": self.widest_probe,
                "probe_features": self.probe_features, "recovery_images": self.recovery_images,
                "hardest_layer": self.hardest_layer, "layer_unknowns": self.layer_unknowns,
                "rows_per_image": self.rows_per_image, "r2_layers": list(self.r2_layers),
                "samples_per_feature": MIN_SAMPLES_PER_DIM, "rows_per_unknown": MIN_ROWS_PER_DIM}

    def summary(self) -> str:
        """One line for the command line."""
        if self.widest_probe is None:
            return ("calibration advice: no group can lose channels (every prunable group is protected), so no "
                    "calibration is needed")
        text = (f"calibration advice: about {self.scoring_images} images for scoring (probe {self.widest_probe}: "
                f"{self.probe_features} features x {MIN_SAMPLES_PER_DIM})")
        if self.hardest_layer is not None:
            text += (f", {self.recovery_images} for lstsq recovery (layer {self.hardest_layer}: {self.layer_unknowns} "
                     f"unknowns x {MIN_ROWS_PER_DIM} / {self.rows_per_image} rows per image)")
        if self.r2_layers:
            text += f"; {len(self.r2_layers)} layer(s) too wide for R3 get R2"
        return text


def sample_advice(prepared: PreparedModel, *, pooling: str = DEFAULT_POOLING, positions: int | None = None,
                  max_dim: int | None = None, protected: Iterable[str] | None = None) -> SampleAdvice:
    """The advice of the module docstring for a prepared model (``positions`` / ``max_dim``: the recovery's
    ``refit_positions`` / ``refit_max_dim``, its defaults when None). Only groups that can lose channels count:
    prunable and not ``protected`` (default: the groups protected by default, first layer and classifier input)."""
    defaults = RecoveryOptions()
    positions = defaults.refit_positions if positions is None else positions
    max_dim = defaults.refit_max_dim if max_dim is None else max_dim
    index = prepared.index
    kept = set(default_protected(index) if protected is None else protected)
    prunable = {g.id for g in index.groups if g.prunable and g.id not in kept}
    probes = tuple(dict.fromkeys(p for g in index.groups if g.id in prunable for p in g.probes))
    bins = consumer_bins(prepared.model, index, probes) if pooling == "auto" else dict.fromkeys(probes,
                                                                                              POOLINGS[pooling])
    features = {}
    for probe in probes:
        shape = index.shapes.get(probe) or ()
        channels = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else 0
        features[probe] = channels * bins[probe] ** 2
    widest = max(features, key=lambda p: features[p], default=None)
    full = index.full_widths()
    hardest, unknowns, rows, images, wide = None, 0, 1, 0, []
    for term in index.cost:
        if not set(term.in_groups) & prunable or term.params_coeff <= 0:
            continue
        w_in, _ = term.widths(full)
        dim = round(term.params_coeff * w_in) + 1
        per_image = max(1, round(term.macs_coeff / term.params_coeff))
        per_image = per_image if positions is None else min(per_image, positions)
        if dim > max_dim:
            wide.append(term.node)
            continue
        need = math.ceil(MIN_ROWS_PER_DIM * dim / per_image)
        if need > images:
            hardest, unknowns, rows, images = term.node, dim, per_image, need
    return SampleAdvice(scoring_images=MIN_SAMPLES_PER_DIM * features.get(widest, 0) if widest else 0,
                        widest_probe=widest, probe_features=features.get(widest, 0) if widest else 0,
                        recovery_images=images, hardest_layer=hardest, layer_unknowns=unknowns, rows_per_image=rows,
                        r2_layers=tuple(wide))
