"""Stage-level errors; re-exports the hierarchy defined in :mod:`graph_ops.errors`."""

from __future__ import annotations

from graph_ops.errors import (
    PassError,
    PlanValidationError,
    PreconditionError,
    PruneError,
    UnsupportedModelError,
    UserInputError,
    VerificationError,
)

__all__ = [
    "CalibrationError",
    "PassError",
    "PlanValidationError",
    "PreconditionError",
    "PruneError",
    "UnsupportedModelError",
    "UserInputError",
    "VerificationError",
]


class CalibrationError(PruneError):
    """Calibration data does not fit the model or its statistics are unusable (NaN, one class, ...)."""
