"""The one error hierarchy of DIPrune.

It lives in ``graph_ops`` because ``graph_ops`` must not import ``pipeline``; ``pipeline.errors`` re-exports it and
adds the stage-level errors. Every error a user can cause derives from :class:`PruneError`; the CLI prints its
message on one line and exits non-zero, without a traceback.
"""

from __future__ import annotations


class PruneError(Exception):
    """Base class of every DIPrune error that a user can cause or act on."""

    exit_code = 1


class UserInputError(PruneError):
    """A file, path or argument given by the user is missing, unreadable or malformed."""


class UnsupportedModelError(PruneError):
    """The model uses a construct that DIPrune cannot handle (and cannot freeze around)."""


class PreconditionError(PruneError):
    """A pass was asked to run on a graph that breaks one of its stated preconditions."""


class PassError(PruneError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""

    def __init__(self, name: str, previous: tuple[str, ...], reason: str) -> None:
        """Build the message from the failing pass, the passes before it and the reason."""
        self.name = name
        self.previous = previous
        before = ", ".join(previous) if previous else "none"
        super().__init__(f"pass '{name}' failed (after: {before}): {reason}")


class PlanValidationError(PruneError):
    """A pruning plan does not fit the model it is applied to."""


class VerificationError(PruneError):
    """A produced model failed verification (checker, shape inference or numerical comparison)."""

    exit_code = 3
