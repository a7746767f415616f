"""Board-side onnxruntime profiler that ``diprune latency variants`` copies next to the variant models.

It needs only ``onnxruntime`` and ``numpy`` (not diprune), so it runs on the board as it is::

    python3 profile_onnxruntime.py variant_003.onnx --provider CUDAExecutionProvider --batch 1 \
        -o profiles/variant_003.ort.json

It times the model without the profiler (``--runs`` calls after ``--warmup``; the median goes to
``OUT.timing.json`` with the providers that ran and the onnxruntime version), then runs it again in a session with
onnxruntime's profiler on and moves the profile (the trace-event JSON of ``InferenceSession.end_profiling``, whose
first ``warmup`` runs are the warm-up) to ``OUT``. Inputs are seeded random values of the model's input types, with
a dynamic batch set to ``--batch`` (any other dynamic dimension must be given with ``--dim NAME=VALUE``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
          "tensor(bool)": np.bool_}


def feeds(session: ort.InferenceSession, batch: int, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for every input of the session."""
    rng = np.random.default_rng(seed)
    out = {}
    for arg in session.get_inputs():
        shape = []
        for i, d in enumerate(arg.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(dims[d])
            elif i == 0:
                shape.append(batch)
            else:
                sys.exit(f"input {arg.name} has dynamic dimension {d!r}: give it with --dim {d}=VALUE")
        dtype = _TYPES[arg.type]
        values = rng.standard_normal(shape) if np.issubdtype(dtype, np.floating) else rng.integers(0, 2, shape)
        out[arg.name] = values.astype(dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    """Time and profile one model (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("-o", "--output", required=True, help="where the profile JSON goes")
    parser.add_argument("--provider", action="append", default=None,
                        help="execution provider, in priority order (repeatable; default CPUExecutionProvider)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args(argv)
    providers = args.provider or ["CPUExecutionProvider"]
    dims = {k: int(v) for k, v in (d.split("=", 1) for d in args.dim)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)

    def session(profile: bool) -> ort.InferenceSession:
        options = ort.SessionOptions()
        if args.threads:
            options.intra_op_num_threads = args.threads
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(out.with_suffix(""))
        return ort.InferenceSession(args.model, options, providers=providers)

    plain = session(False)
    inputs = feeds(plain, args.batch, dims)
    for _ in range(args.warmup):
        plain.run(None, inputs)
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        plain.run(None, inputs)
        times.append(time.perf_counter() - start)
    profiled = session(True)
    for _ in range(args.warmup + args.runs):
        profiled.run(None, inputs)
    shutil.move(profiled.end_profiling(), out)
    timing = {"median_ms": statistics.median(times) * 1e3, "runs": args.runs, "warmup": args.warmup,
              "batch": args.batch, "providers": plain.get_providers(), "onnxruntime": ort.__version__,
              "device": ort.get_device()}
    stem = out.name[:-len(".json")] if out.name.endswith(".json") else out.name
    out.with_name(stem + ".timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(f"{args.model}: {timing['median_ms']:.3f} ms median on {', '.join(plain.get_providers())}; profile {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
