"""ONNX -> torch -> the same ONNX graph: what the optional training stages (finetune, push) train, and the way back.

:func:`to_torch` converts a model with onnx2torch (``attach_onnx_mapping=True``) and links every trainable torch
parameter to the ONNX initializer it was built from:

* onnx2torch adds exactly one ``call_module`` per ONNX node, in graph order, so the ``i``-th module call is
  ``graph.node[i]``;
* a module's parameters (Conv / ConvTranspose / Gemm-as-Linear weights and biases) are matched to that node's
  initializer inputs by value: equal (same shape) or, for 2-D weights, equal to the transpose (Gemm with
  ``transB=0`` becomes ``Linear`` with the transposed weight). A parameter without exactly one such initializer, or
  an initializer that two parameters claim (a weight shared by two nodes), is frozen and recorded, never guessed;
* constant weights that onnx2torch passes as buffers (MatMul input 1, a Gemm kept as ``OnnxGemm``) become trainable
  parameters when they are float and not scalars; every other constant (shapes, scales, clip bounds, per-channel
  constants of unfused ops) stays as it is.

:func:`write_back` copies the learned values into a copy of the SAME graph: same nodes, same initializer names, dtypes
and shapes, only the values change; the result passes ``onnx.checker.check_model(full_check=True)``. :func:`parity`
measures torch against onnxruntime on the same feeds: the training stages check it before training (the conversion
must reproduce the model, relative error <= 1e-5) and after writing back (the mapping must be right).

:func:`torch_settings` makes a training stage deterministic (seeded, deterministic algorithms, a fixed number of
threads) and restores torch's global state afterwards. torch and onnx2torch are imported lazily; without them
:func:`require_torch` raises a :class:`UserInputError` naming ``pip install 'diprune[torch]'``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.errors import UnsupportedModelError, UserInputError, VerificationError

TORCH_EXTRA = "pip install 'diprune[torch]' (with -c constraints.txt for the CPU build of PyTorch; see README)"
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
_TRAINABLE_BUFFERS = {"MatMul": (1,), "Gemm": (1, 2)}  # node inputs that are weights when onnx2torch keeps a buffer


def require_torch(purpose: str) -> Any:
    """``torch`` with onnx2torch importable, or a UserInputError naming the ``[torch]`` extra.

    Args:
        purpose: what needs it, for the message (e.g. ``"diprune finetune"``).
    """
    try:
        import torch

        from pipeline.model.export import import_torchvision_models

        import_torchvision_models()  # onnx2torch imports torchvision, which needs the CPU-torch fix first
        import onnx2torch  # noqa: F401
    except ImportError as err:
        raise UserInputError(f"{purpose} needs PyTorch and onnx2torch ({err.name or 'torch'} is not installed): "
                             f"{TORCH_EXTRA}") from err
    return torch


@dataclass(frozen=True)
class Link:
    """A trainable torch parameter and the ONNX initializer it writes back to (transposed for ``transB=0``)."""

    parameter: str
    initializer: str
    transpose: bool = False


@dataclass(frozen=True)
class TorchGraph:
    """A converted model: the torch module, its links to initializers, and where each ONNX tensor is computed.

    Attributes:
        module: the ``torch.fx.GraphModule`` onnx2torch built (train / eval mode is the caller's).
        links: trainable parameters and their initializers.
        frozen: ``(parameter, reason)`` of parameters that could not be linked (their ``requires_grad`` is off).
        inputs: the model's graph inputs (not initializers), in the order the module takes them.
        producers: ONNX tensor name -> (torch module name, output index) of the node that computes it.
    """

    module: Any
    links: tuple[Link, ...]
    frozen: tuple[tuple[str, str], ...]
    inputs: tuple[str, ...]
    producers: Mapping[str, tuple[str, int]] = field(repr=False)

    def parameters(self) -> list[Any]:
        """The linked (trainable) parameters, in link order."""
        named = dict(self.module.named_parameters())
        return [named[link.parameter] for link in self.links]

    def forward(self, feeds: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
        """Run the module on ``feeds`` (torch tensors by input name); return the named ONNX tensors."""
        with self.capture(names) as got:
            self.module(*(feeds[name] for name in self.inputs))
        missing = [n for n in names if n not in got]
        if missing:
            raise VerificationError(f"the converted model did not compute {missing}")
        return got

    @contextlib.contextmanager
    def capture(self, names: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Forward hooks that store the ONNX tensors ``names`` of the next forward passes (by name)."""
        unknown = [n for n in names if n not in self.producers]
        if unknown:
            raise UserInputError(f"tensors {unknown} are not computed by a node of the model")
        got: dict[str, Any] = {}
        by_module: dict[str, list[tuple[str, int]]] = {}
        for name in names:
            target, index = self.producers[name]
            by_module.setdefault(target, []).append((name, index))
        handles = []
        for target, wanted in by_module.items():
            def hook(_module: Any, _args: Any, output: Any, wanted: list[tuple[str, int]] = wanted) -> None:
                for name, index in wanted:
                    got[name] = output[index] if isinstance(output, (tuple, list)) else output

            handles.append(self.module.get_submodule(target).register_forward_hook(hook))
        try:
            yield got
        finally:
            for handle in handles:
                handle.remove()


def to_torch(model: onnx.ModelProto) -> TorchGraph:
    """Convert ``model`` with onnx2torch and link its trainable parameters to initializers (module docstring).

    Raises:
        UserInputError: torch or onnx2torch is not installed.
        UnsupportedModelError: onnx2torch does not cover an op of the model.
    """
    require_torch("training an ONNX model")
    import onnx2torch

    try:
        module = onnx2torch.convert(_copy(model), attach_onnx_mapping=True)
    except Exception as err:  # the converter raises its own types (NotImplementedError, KeyError, ...)
        raise UnsupportedModelError(f"onnx2torch cannot convert the model: {type(err).__name__}: {err}") from err
    calls = [n for n in module.graph.nodes if n.op == "call_module"]
    if len(calls) != len(model.graph.node):
        raise UnsupportedModelError(f"onnx2torch made {len(calls)} modules for {len(model.graph.node)} nodes; "
                                    "the parameters cannot be mapped back")
    producers = {}
    for call in calls:
        for index, name in enumerate(module.get_submodule(call.target).onnx_mapping.outputs):
            producers[name] = (str(call.target), index)
    links, frozen = _link(module, model, calls)
    inits = {t.name for t in model.graph.initializer}
    return TorchGraph(module=module, links=tuple(links), frozen=tuple(frozen),
                      inputs=tuple(i.name for i in model.graph.input if i.name not in inits), producers=producers)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _initializer_inputs(node: onnx.NodeProto, tables: Mapping[str, onnx.TensorProto]) -> list[tuple[int, str, np.ndarray]]:
    """(position, name, value) of the node's float initializer inputs."""
    return [(pos, name, numpy_helper.to_array(tables[name])) for pos, name in enumerate(node.input)
            if name in tables and tables[name].data_type in _FLOAT_TYPES]


def _match(value: np.ndarray, candidates: Sequence[tuple[int, str, np.ndarray]]) -> list[tuple[str, bool]]:
    """Initializers equal to ``value`` as they are (False) or transposed (True)."""
    found = []
    for _, name, init in candidates:
        if init.shape == value.shape and np.array_equal(init, value):
            found.append((name, False))
        elif init.ndim == 2 and init.T.shape == value.shape and np.array_equal(init.T, value):
            found.append((name, True))
    return found


@dataclass(frozen=True)
class _Claim:
    """A parameter and the initializer it matched (None: no unique match, ``reason`` says why)."""

    parameter: str
    tensor: Any
    initializer: str | None
    transpose: bool = False
    reason: str = ""


def _link(module: Any, model: onnx.ModelProto, calls: Sequence[Any]) -> tuple[list[Link], list[tuple[str, str]]]:
    """Links of module parameters (and weight buffers made parameters) to initializers; the rest frozen."""
    tables = {t.name: t for t in model.graph.initializer}
    claims: list[_Claim] = []
    for call, node in zip(calls, model.graph.node, strict=True):
        inputs = _initializer_inputs(node, tables)
        for pname, param in module.get_submodule(call.target).named_parameters():
            found = _match(param.detach().cpu().numpy(), inputs)
            name = f"{call.target}.{pname}"
            claims.append(_Claim(name, param, *found[0]) if len(found) == 1 else
                          _Claim(name, param, None, reason=f"{len(found)} initializers of node {node.name!r} match"))
        claims.extend(_weight_buffers(module, call, node, inputs))
    counts: dict[str, int] = {}
    for claim in claims:
        if claim.initializer is not None:
            counts[claim.initializer] = counts.get(claim.initializer, 0) + 1
    links, frozen = [], []
    for claim in claims:
        if claim.initializer is not None and counts[claim.initializer] == 1:
            links.append(Link(claim.parameter, claim.initializer, claim.transpose))
            continue
        claim.tensor.requires_grad_(False)
        frozen.append((claim.parameter, claim.reason or f"initializer {claim.initializer!r} is read by "
                                                       f"{counts[claim.initializer]} parameters (shared weight)"))
    return links, frozen


def _weight_buffers(module: Any, call: Any, node: onnx.NodeProto,
                    inputs: Sequence[tuple[int, str, np.ndarray]]) -> list[_Claim]:
    """Constant weights onnx2torch keeps as buffers (MatMul, OnnxGemm), turned into parameters."""
    import torch

    positions = _TRAINABLE_BUFFERS.get(node.op_type, ())
    wanted = [(pos, name, value) for pos, name, value in inputs if pos in positions and value.size > 1]
    out = []
    for arg in [*call.args, *call.kwargs.values()]:
        if getattr(arg, "op", None) != "get_attr" or not wanted:
            continue
        owner_name, _, attr = str(arg.target).rpartition(".")
        owner = module.get_submodule(owner_name)
        buffer = owner._buffers.get(attr)
        if buffer is None or not buffer.is_floating_point():
            continue
        found = _match(buffer.cpu().numpy(), wanted)
        if len(found) != 1 or found[0][1]:
            continue
        del owner._buffers[attr]
        param = torch.nn.Parameter(buffer.clone())
        owner.register_parameter(attr, param)
        out.append(_Claim(str(arg.target), param, found[0][0]))
    return out


def learned_values(graph: TorchGraph, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializer name -> the linked parameter's current value, in the initializer's layout and dtype."""
    dtypes = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in model.graph.initializer}
    named = dict(graph.module.named_parameters())
    values = {}
    for link in graph.links:
        value = named[link.parameter].detach().cpu().numpy()
        values[link.initializer] = np.ascontiguousarray(value.T if link.transpose else value).astype(
            dtypes[link.initializer])
    return values


def write_back(model: onnx.ModelProto, graph: TorchGraph) -> onnx.ModelProto:
    """A copy of ``model`` whose linked initializers hold the parameters' values (same names, shapes, dtypes).

    Raises:
        VerificationError: a value does not fit its initializer, or the result fails the full ONNX checker.
    """
    values = learned_values(graph, model)
    out = _copy(model)
    for tensor in out.graph.initializer:
        if tensor.name in values:
            value = values[tensor.name]
            if tuple(tensor.dims) != value.shape:
                raise VerificationError(f"learned value of {tensor.name!r} has shape {value.shape}, the initializer "
                                        f"{tuple(tensor.dims)}")
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    try:
        onnx.checker.check_model(out, full_check=True)
    except onnx.checker.ValidationError as err:
        raise VerificationError(f"the model with learned weights fails the ONNX checker: {err}") from err
    return out


def parity(model: onnx.ModelProto, graph: TorchGraph, feeds: Mapping[str, np.ndarray]) -> float:
    """Largest relative difference ``max |torch - onnxruntime| / max |onnxruntime|`` over the graph's outputs."""
    import torch

    from pipeline.model.runtime import open_session, run

    names = [o.name for o in model.graph.output]
    session = open_session(model.SerializeToString(), "ort-cpu", 1)
    expected = run(session, names, feeds, stage="round-trip check")
    was_training = graph.module.training
    graph.module.eval()
    with torch.no_grad():
        got = graph.forward({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}, names)
    graph.module.train(was_training)
    worst = 0.0
    for name, ref in zip(names, expected, strict=True):
        diff = float(np.max(np.abs(got[name].detach().cpu().numpy().astype(np.float64) - ref))) if ref.size else 0.0
        worst = max(worst, diff / max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-12))
    return worst


@contextlib.contextmanager
def torch_settings(seed: int, threads: int) -> Iterator[Any]:
    """Seeded, deterministic torch with ``threads`` intra-op threads; torch's global state is restored on exit.

    Yields:
        ``torch``.
    """
    torch = require_torch("training")
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield torch
        finally:
            torch.set_num_threads(threads_before)
            torch.use_deterministic_algorithms(deterministic_before)
