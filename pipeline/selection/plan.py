"""Pruning plans: the file contract and its validation (the allocation that makes one: :mod:`pipeline.selection.allocate`).

File (a contract)::

    {"format": "diprune.plan/1", "model_sha256": "<sha>", "groups": {"<group id>": {"keep": [sorted indices]}},
     "meta": {...optional...}}

Groups not named keep all their channels.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from graph_ops.groups import ChannelGroupIndex
from graph_ops.io import atomic_write_bytes, read_text
from pipeline.errors import PlanValidationError, UserInputError

logger = logging.getLogger(__name__)

PLAN_FORMAT = "diprune.plan/1"


@dataclass(frozen=True)
class PruningPlan:
    """Kept channel indices per group (groups not named keep all), for one model."""

    model_sha256: str
    keep: Mapping[str, tuple[int, ...]]
    meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        keep = {gid: tuple(sorted(int(c) for c in chans)) for gid, chans in sorted(self.keep.items())}
        object.__setattr__(self, "keep", MappingProxyType(keep))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def with_sha(self, model_sha256: str) -> PruningPlan:
        """The same plan for the model with this sha256."""
        return replace(self, model_sha256=model_sha256)

    def with_input_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> PruningPlan:
        """The same plan recording the input shapes its model was prepared with (``apply`` reuses them)."""
        if not shapes:
            return self
        return replace(self, meta={**self.meta, "input_shapes": {k: list(v) for k, v in sorted(shapes.items())}})

    def summary(self) -> str:
        """One line: groups pruned and predicted cost fractions."""
        macs, params = self.meta.get("macs_fraction"), self.meta.get("params_fraction")
        text = f"{len(self.keep)} groups pruned"
        if macs is not None and params is not None:
            targets = [f"{k} {self.meta[f'target_{k}']:g}" for k in ("macs", "params")
                       if self.meta.get(f"target_{k}") is not None]
            text += f", predicted MACs x{macs:.3f}, params x{params:.3f}"
            text += f" (target {', '.join(targets)})" if targets else ""
        if self.meta.get("reached") is False:
            text += " (target NOT reached)"
        return text

    def to_json(self) -> str:
        """The plan file text (deterministic: sorted keys)."""
        doc = {"format": PLAN_FORMAT, "model_sha256": self.model_sha256,
               "groups": {gid: {"keep": list(chans)} for gid, chans in self.keep.items()}}
        if self.meta:
            doc["meta"] = dict(self.meta)
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the plan file atomically."""
        atomic_write_bytes(path, self.to_json().encode())
        return Path(path)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> PruningPlan:
        """Parse plan-file text; malformed content raises UserInputError naming the problem."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserInputError(f"{source} is not JSON ({err}); give a file written by 'diprune plan'") from err
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise UserInputError(f"{source} is not a plan file: format {found!r}, expected {PLAN_FORMAT!r}")
        sha, groups, meta = doc.get("model_sha256"), doc.get("groups"), doc.get("meta", {})
        if not isinstance(sha, str) or not isinstance(groups, dict) or not isinstance(meta, dict):
            raise UserInputError(f"{source}: 'model_sha256' must be a string, 'groups' and 'meta' objects")
        keep = {}
        for gid, entry in groups.items():
            chans = entry.get("keep") if isinstance(entry, dict) else None
            if not isinstance(chans, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in chans):
                raise UserInputError(f"{source}: group {gid!r} needs {{\"keep\": [integer channel indices]}}")
            keep[gid] = chans
        return cls(model_sha256=sha, keep=keep, meta=meta)

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        """Read a plan file."""
        return cls.from_json(read_text(path, "plan file"), source=str(path))

    def validate(self, index: ChannelGroupIndex, model_sha256: str) -> None:
        """Check the plan fits this model: same sha, known prunable groups, in-range non-empty unique keeps."""
        if self.model_sha256 != model_sha256:
            raise PlanValidationError(f"plan was made for model {self.model_sha256[:12]}, this model is "
                                      f"{model_sha256[:12]}; make a new plan for this model")
        index.validate_keep(self.keep)


