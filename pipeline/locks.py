"""Exclusive locks between diprune processes: one writer per output folder, one builder per latency-model entry.

A lock is ``fcntl.flock(LOCK_EX)`` on a small lock file (``.diprune.lock`` in a run's output folder, ``<entry>.lock``
beside a latency-model cache entry). The kernel releases it when the holder's file descriptor closes, which it does
when the process ends in any way (exit, exception, SIGKILL, a crash), so a lock is never stale: the lock file may
stay behind, but it holds no lock. The lock file records the holder's pid and command for the message a second
process gets. ``wait=False`` refuses a second process at once (:class:`LockedError`); ``wait=True`` waits for the
holder (a latency model being built: the waiter then reuses it). Where ``fcntl`` does not exist (Windows), locking is
skipped with a debug log.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from graph_ops.errors import UserInputError

logger = logging.getLogger(__name__)

LOCK_NAME = ".diprune.lock"
"""The lock file of a ``diprune run`` output folder."""


class LockedError(UserInputError):
    """Another diprune process holds the lock."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "another diprune process"
    return text or "another diprune process"


@contextmanager
def exclusive_lock(path: str | os.PathLike[str], what: str, *, wait: bool = False,
                   on_wait: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created when missing) for the block.

    Args:
        path: the lock file.
        what: what it protects, for the message (``output folder runs/exp1``).
        wait: wait for a holder instead of refusing.
        on_wait: logged (warning) once when the lock is held by another process and ``wait`` is true.

    Raises:
        LockedError: ``wait`` is false and another process holds the lock.
        UserInputError: the lock file cannot be created.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        logger.debug("no fcntl here: %s is not locked", what)
        yield
        return
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserInputError(f"cannot create the lock file {path} of {what}: {err.strerror or err}") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise LockedError(f"{what} is in use by {_holder(path)} (lock {path}); wait for it to finish or "
                                  "choose another output") from None
            logger.warning("%s", on_wait or f"waiting for {_holder(path)} to release {what}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"diprune pid {os.getpid()} ({' '.join(sys.argv[:3])[:120]})\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock
