"""Per-batch activations a recovery sweep keeps between its steps: in memory up to a byte budget, then in files.

The sweep (:mod:`pipeline.recovery.sweep`) stores every tensor that a later step reads, batch by batch, and drops it
after its last reader. Arrays are kept by reference while the budget lasts; beyond it each tensor's batches are
appended to one file in a temporary folder under ``spill_dir`` and read back as memory maps (no copy: onnxruntime
and numpy read the page cache). The folder is removed by :meth:`FrontierStore.close`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np


class FrontierStore:
    """Per-batch arrays kept between steps: in memory up to a byte budget, then appended to one file per tensor."""

    def __init__(self, budget: int, spill_dir: str | Path | None) -> None:
        """Keep up to ``budget`` bytes in memory; spill the rest under ``spill_dir`` (default: the temp folder)."""
        self.budget, self.used, self.spill_dir = budget, 0, spill_dir
        self.memory: dict[tuple[str, int], np.ndarray] = {}
        self.files: dict[str, Path] = {}
        self.where: dict[tuple[str, int], tuple[int, tuple[int, ...], np.dtype]] = {}
        self.spilled: dict[str, int] = {}  # spilled batches per tensor
        self.folder: Path | None = None
        self.created = 0

    def put(self, name: str, batch: int, array: np.ndarray) -> None:
        """Keep batch ``batch`` of tensor ``name``."""
        if self.used + array.nbytes <= self.budget:
            self.memory[(name, batch)] = array
            self.used += array.nbytes
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix=".diprune-sweep-", dir=self.spill_dir))
        if name not in self.files:
            self.files[name] = self.folder / f"t{self.created}.bin"
            self.created += 1
        path = self.files[name]
        with open(path, "ab") as handle:
            offset = handle.tell()
            np.ascontiguousarray(array).tofile(handle)
        self.where[(name, batch)] = (offset, array.shape, array.dtype)
        self.spilled[name] = self.spilled.get(name, 0) + 1

    def get(self, name: str, batch: int) -> np.ndarray:
        """Batch ``batch`` of tensor ``name`` (a read-only memory map when spilled)."""
        if (name, batch) in self.memory:
            return self.memory[(name, batch)]
        offset, shape, dtype = self.where[(name, batch)]
        if not int(np.prod(shape, dtype=np.int64)):
            return np.zeros(shape, dtype)
        # mapped, not copied: onnxruntime and numpy read the page cache directly
        return np.memmap(self.files[name], dtype=dtype, mode="r", offset=offset, shape=shape)

    def discard(self, name: str, batch: int) -> None:
        """Forget batch ``batch`` of ``name`` (if kept); a tensor's file is deleted with its last batch."""
        array = self.memory.pop((name, batch), None)
        if array is not None:
            self.used -= array.nbytes
        if self.where.pop((name, batch), None) is not None:
            self.spilled[name] -= 1
            if not self.spilled[name]:
                del self.spilled[name]
                path = self.files.pop(name, None)
                if path is not None:
                    path.unlink(missing_ok=True)

    def drop(self, name: str) -> None:
        """Forget every batch of ``name`` (its file is deleted)."""
        for key in [k for k in self.memory if k[0] == name]:
            self.used -= self.memory.pop(key).nbytes
        for key in [k for k in self.where if k[0] == name]:
            del self.where[key]
        self.spilled.pop(name, None)
        path = self.files.pop(name, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Forget everything and remove the spill folder."""
        self.memory.clear()
        self.where.clear()
        self.spilled.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
