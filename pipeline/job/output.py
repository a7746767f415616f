"""The output folder of ``diprune run``: the files and folders a run owns (checked against the inputs before any
work), the folder prepared, one writer at a time (its lock), and ``best.onnx`` written from the best candidate.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from graph_ops.io import atomic_write_files, check_writable, is_inside, same_file
from pipeline.errors import UserInputError
from pipeline.job.config import RunConfig
from pipeline.job.report import CandidateResult
from pipeline.locks import LOCK_NAME, exclusive_lock

RUN_FILES = ("best.onnx", "best.onnx.plan.json", "best.onnx.report.json", "report.json", "report.md", "mlflow.db",
             LOCK_NAME)
"""Files a job writes (or deletes) in its output folder."""


RUN_FOLDERS = ("candidates", "cache", "plots")
"""Folders whose content a job writes in its output folder."""


def check_run_paths(config: RunConfig) -> None:
    """Refuse a job whose inputs lie where it writes or deletes (``RUN_FILES``, ``RUN_FOLDERS``), before any work:
    a model at ``OUTPUT/best.onnx`` would be deleted as a stale best or overwritten by the new one."""
    output = config.output
    for item in config.input_paths():
        clash = next((output / name for name in RUN_FILES if same_file(item, output / name)), None)
        clash = clash or next((output / name for name in RUN_FOLDERS
                               if same_file(item, output / name) or is_inside(item, output / name)), None)
        if clash is None and is_inside(output, item):  # an image folder holding the output: plots would be images
            raise UserInputError(f"the output folder {output} lies inside the input folder {item}: the run's files "
                                 "would join its data; choose an output folder outside it")
        if clash is not None:
            raise UserInputError(f"input {item} lies where this run writes ({clash}): it would be overwritten or "
                                 f"deleted; move it out of {output} or choose another output folder")


def _write_best(output: Path, best: CandidateResult | None) -> None:
    """``best.onnx`` with its plan and report (copies of the best candidate's files), or no stale best at all."""
    names = ("best.onnx", "best.onnx.plan.json", "best.onnx.report.json")
    if best is None:
        for name in names:
            (output / name).unlink(missing_ok=True)
        return
    source = output / best.path
    sources = (source, Path(f"{source}.plan.json"), Path(f"{source}.report.json"))
    atomic_write_files({output / name: src.read_bytes() for name, src in zip(names, sources, strict=True)})


def _prepare_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise UserInputError(f"output {output} is a file; give a folder (it is created when missing)")
    try:
        (output / "candidates").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserInputError(f"cannot create the output folder {output}: {err.strerror or err}") from err
    for name in RUN_FILES:  # a folder, device node or FIFO where the run writes is refused before any work
        if name != LOCK_NAME:
            check_writable(output / name)


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """The exclusive lock of an output folder (:mod:`pipeline.locks`) for the block; taken once per process."""
    with exclusive_lock(output / LOCK_NAME, f"output folder {output}"):
        yield
