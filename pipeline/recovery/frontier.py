"""Per-batch activations a recovery sweep keeps between its steps: in memory up to a byte budget, then in one file.

The sweep (:mod:`pipeline.recovery.sweep`) stores every tensor that a later step reads, batch by batch, and drops it
after its last reader. Arrays are kept by reference while the budget lasts; beyond it each array is written to an
extent of one spill file in a temporary folder under ``spill_dir`` and read back as a memory map (no copy:
onnxruntime and numpy read the page cache). The file is never shrunk while the sweep runs: an extent freed by
:meth:`FrontierStore.discard` is written again by later arrays (best fit, free neighbours merged), so a sweep rewrites
page-cache pages the kernel already holds instead of asking for fresh ones at every step. That is most of the
spill's cost on virtual machines that hand free memory back to their host (free page reporting): measured by
``benchmarks/fresh_memory.py`` on a 2-core VM, 147 MB written after every 3 s of compute went at 0.12 GB/s into
fresh files and 5.97 GB/s into reused extents.

A freed extent becomes writable only after :meth:`FrontierStore.release`, which the sweep calls once the consumer
of a batch's values has asked for the next batch: a memory map handed out by :meth:`FrontierStore.get` stays valid
until then. The folder is removed by :meth:`FrontierStore.close`.
"""

from __future__ import annotations

import bisect
import mmap
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ALIGN = mmap.ALLOCATIONGRANULARITY  # extents start on a page boundary (memory maps need no offset fix-up)


class FrontierStore:
    """Per-batch arrays kept between steps: in memory up to a byte budget, then in extents of one spill file."""

    def __init__(self, budget: int, spill_dir: str | Path | None) -> None:
        """Keep up to ``budget`` bytes in memory; spill the rest under ``spill_dir`` (default: the temp folder)."""
        self.budget, self.used, self.spill_dir = budget, 0, spill_dir
        self.memory: dict[tuple[str, int], np.ndarray] = {}
        self.where: dict[tuple[str, int], tuple[int, int, tuple[int, ...], np.dtype]] = {}
        self.folder: Path | None = None
        self.path: Path | None = None
        self.fd: int | None = None
        self.size = 0  # bytes of the spill file handed out so far
        self.free: list[tuple[int, int]] = []  # (offset, length) of writable extents, by offset, neighbours merged
        self.pending: list[tuple[int, int]] = []  # extents discarded since the last release
        self.write_s = 0.0  # seconds spent writing the spill file

    def put(self, name: str, batch: int, array: np.ndarray) -> None:
        """Keep batch ``batch`` of tensor ``name``."""
        if self.used + array.nbytes <= self.budget:
            self.memory[(name, batch)] = array
            self.used += array.nbytes
            return
        length = max(ALIGN, -(-array.nbytes // ALIGN) * ALIGN)
        offset = self._allocate(length)
        start = time.perf_counter()
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        done = 0
        while done < len(data):  # pwrite may write less than asked (2 GiB per call on Linux)
            done += os.pwrite(self._file(), data[done:], offset + done)
        self.write_s += time.perf_counter() - start
        self.where[(name, batch)] = (offset, length, array.shape, array.dtype)

    def get(self, name: str, batch: int) -> np.ndarray:
        """Batch ``batch`` of tensor ``name`` (a read-only memory map when spilled, valid until the next
        :meth:`release`)."""
        if (name, batch) in self.memory:
            return self.memory[(name, batch)]
        offset, _, shape, dtype = self.where[(name, batch)]
        if not int(np.prod(shape, dtype=np.int64)):
            return np.zeros(shape, dtype)
        # mapped, not copied: onnxruntime and numpy read the page cache directly
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)

    def discard(self, name: str, batch: int) -> None:
        """Forget batch ``batch`` of ``name`` (if kept); its extent is reused after the next :meth:`release`."""
        array = self.memory.pop((name, batch), None)
        if array is not None:
            self.used -= array.nbytes
        spilled = self.where.pop((name, batch), None)
        if spilled is not None:
            self.pending.append(spilled[:2])

    def release(self) -> None:
        """Make the extents discarded so far writable again (their memory maps must no longer be read)."""
        for offset, length in self.pending:
            at = bisect.bisect(self.free, (offset, length))
            if at < len(self.free) and offset + length == self.free[at][0]:  # merge with the next extent
                length += self.free.pop(at)[1]
            if at and self.free[at - 1][0] + self.free[at - 1][1] == offset:  # and with the previous one
                offset, length = self.free[at - 1][0], self.free[at - 1][1] + length
                self.free.pop(at - 1)
                at -= 1
            self.free.insert(at, (offset, length))
        self.pending.clear()

    def _allocate(self, length: int) -> int:
        """The offset of a writable extent of ``length`` bytes: the smallest free one that fits, else the end."""
        fits = [i for i, (_, size) in enumerate(self.free) if size >= length]
        if not fits:
            if self.free and self.free[-1][0] + self.free[-1][1] == self.size:  # grow the last free extent
                offset = self.free.pop()[0]
                self.size = offset + length
                return offset
            offset, self.size = self.size, self.size + length
            return offset
        at = min(fits, key=lambda i: self.free[i][1])
        offset, size = self.free[at]
        if size == length:
            self.free.pop(at)
        else:
            self.free[at] = (offset + length, size - length)
        return offset

    def _file(self) -> int:
        if self.fd is None:
            self.folder = Path(tempfile.mkdtemp(prefix=".diprune-sweep-", dir=self.spill_dir))
            self.path = self.folder / "frontier.bin"
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        return self.fd

    def close(self) -> None:
        """Forget everything and remove the spill folder."""
        self.memory.clear()
        self.where.clear()
        self.free.clear()
        self.pending.clear()
        self.used = self.size = 0
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = self.path = None
