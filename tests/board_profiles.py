"""Synthetic board profiles of a known cost, in the formats trtexec and onnxruntime write (tests of latency fit).

TensorRT (:func:`write_trtexec_profiles`): each variant's engine is simulated as TensorRT builds a CNN: a Conv / Gemm
starts a layer and the Relu / residual Add (+ Relu) that follow it are fused into it, named by joining the ONNX node
names with " + "; the first layer gets an input reformat ("Reformatting CopyNode for Input Tensor 0 to ..."), the
Flatten becomes an opaque Myelin-style layer ``__myl_Reshape_0`` that only the layer info names. A layer's time is
``ms_per_mmac`` x the MACs (millions) of its costly nodes at the variant's widths plus ``fixed_ms``; the log's GPU
compute median is the sum plus ``overhead_ms``. Even variants come with ``--exportLayerInfo`` metadata for every
layer (TensorRT 10), odd ones without (TensorRT 8: names only). :func:`true_ms` is the exact cost of any widths.

onnxruntime (:func:`synthetic_ort_durations`): a real onnxruntime profile made here, its kernel durations replaced by
``us_per_weight`` x the element count of a Conv / Gemm kernel's weight input with its two channel dims rounded up to
``block`` (onnxruntime's NCHWc layout pads output channels to its block, which the fit is told), or 1 us for any other
kernel.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from pipeline.model.prepare import PreparedModel

FIXTURE_LOG = Path(__file__).parent / "fixtures" / "trtexec_tensorrt10_rtx6000.txt"


def engine_layers(prepared: PreparedModel) -> list[list[str]]:
    """The canonical model's nodes grouped into simulated TensorRT layers (module docstring)."""
    op = {node.name: node.op_type for node in prepared.model.graph.node}
    layers: list[list[str]] = []
    producer: dict[str, int] = {}
    for node in prepared.model.graph.node:
        fuses = (layers and node.op_type in ("Relu", "Add") and op[layers[-1][0]] in ("Conv", "Gemm")
                 and any(producer.get(t) == len(layers) - 1 for t in node.input))
        if fuses:
            layers[-1].append(node.name)
        else:
            layers.append([node.name])
        for t in node.output:
            producer[t] = len(layers) - 1
    return layers


def true_ms(prepared: PreparedModel, widths: Mapping[str, int], costly: Iterable[str], *, ms_per_mmac: float,
            fixed_ms: float, reformat_ms: float) -> float:
    """The synthetic engine's exact latency (sum of its layers) at these widths."""
    return sum(ms for _, ms in layer_times(prepared, widths, costly, ms_per_mmac=ms_per_mmac, fixed_ms=fixed_ms,
                                           reformat_ms=reformat_ms))


def layer_times(prepared: PreparedModel, widths: Mapping[str, int], costly: Iterable[str], *, ms_per_mmac: float,
                fixed_ms: float, reformat_ms: float) -> list[tuple[list[str], float]]:
    """(ONNX nodes, ms) per simulated layer, the input reformat first (nodes ``["reformat", ...]``)."""
    terms = {t.node: t for t in prepared.index.cost}
    full = {**prepared.index.full_widths(), **widths}
    costly = set(costly)
    out: list[tuple[list[str], float]] = []
    for i, layer in enumerate(engine_layers(prepared)):
        macs = sum(terms[n].macs(full) for n in layer if n in costly and n in terms)
        if i == 0:
            out.append((["reformat", *layer], reformat_ms))
        out.append((layer, ms_per_mmac * macs / 1e6 + fixed_ms))
    return out


def write_trtexec_profiles(folder: Path, prepared: PreparedModel, costly: Iterable[str], *, ms_per_mmac: float = 0.01,
                           fixed_ms: float = 0.002, reformat_ms: float = 0.003, overhead_ms: float = 0.02,
                           skip: Iterable[str] = ()) -> None:
    """The profiles/ folder the board's run_trtexec.sh would have written for every variant of ``folder``."""
    manifest = json.loads((folder / "variants.json").read_text())
    (folder / "profiles").mkdir(exist_ok=True)
    log = FIXTURE_LOG.read_text()
    for n, variant in enumerate(manifest["variants"]):
        if variant["name"] in skip:
            continue
        layers = layer_times(prepared, variant["widths"], costly, ms_per_mmac=ms_per_mmac, fixed_ms=fixed_ms,
                             reformat_ms=reformat_ms)
        entries, info = [{"count": 500}], []
        for nodes, ms in layers:
            if nodes[0] == "reformat":
                name = "Reformatting CopyNode for Input Tensor 0 to " + " + ".join(nodes[1:])
            elif any(node.endswith("Flatten") for node in nodes):
                name = "__myl_Reshape_0"
            else:
                name = " + ".join(nodes)
            entries.append({"name": name, "timeMs": ms * 500, "averageMs": ms, "medianMs": ms,
                            "percentage": 0.0})
            if nodes[0] != "reformat":
                info.append({"Name": name, "LayerType": "CaskConvolution",
                             "Metadata": "\x1f".join(f"[ONNX Layer: {node}]" for node in nodes)})
        stem = folder / "profiles" / variant["name"]
        Path(f"{stem}.trt.profile.json").write_text(json.dumps(entries, indent=1))
        if n % 2 == 0:
            Path(f"{stem}.trt.layers.json").write_text(json.dumps({"Layers": info, "Bindings": ["input", "logits"]}))
        whole = sum(ms for _, ms in layers) + overhead_ms
        summary = (f"GPU Compute Time: min = {whole:.6f} ms, max = {whole * 2:.6f} ms, mean = {whole:.6f} ms, "
                   f"median = {whole:.6f} ms, percentile(90%) = {whole:.6f} ms, percentile(95%) = {whole:.6f} ms, "
                   f"percentile(99%) = {whole:.6f} ms")
        lines = [line.split("[I] ")[0] + "[I] " + summary if "] GPU Compute Time:" in line else line
                 for line in log.splitlines()]
        Path(f"{stem}.trtexec.log").write_text("\n".join(lines) + "\n")


def synthetic_ort_durations(events: list[dict], us_per_weight: float = 0.01, block: int = 1
                            ) -> tuple[list[dict], float]:
    """A real onnxruntime profile with its kernel durations replaced (module docstring), and the synthetic run time
    (the kernels of one run)."""
    out, run_us, runs = [], 0.0, sum(1 for e in events if e.get("name") == "model_run")
    for event in events:
        event = dict(event)
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            shapes = (event.get("args") or {}).get("input_type_shape") or []
            op = (event.get("args") or {}).get("op_name", "")
            weight = next(iter(shapes[1].values())) if len(shapes) > 1 and shapes[1] else None
            dur = 1.0
            if op in ("Conv", "FusedConv", "Gemm", "FusedGemm") and weight:
                count = 1
                for i, d in enumerate(weight):
                    count *= -(-int(d) // block) * block if i < 2 else int(d)
                dur = us_per_weight * count
            event["dur"] = dur
            run_us += dur
        out.append(event)
    return out, run_us / max(runs, 1)
