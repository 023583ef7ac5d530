"""ONNX -> torch bridge for fine-tuning: run an ONNX graph with torch ops, train it, write it back.

`to_torch(model)` gives an `OnnxModule` whose `nn.Parameter`s are the float initializers that
Conv/ConvTranspose/BatchNormalization (scale, bias)/Gemm/MatMul/PRelu read; every other constant is a
buffer. It executes the graph node by node (topological order) with the torch ops in `torch_ops.OPS`.
`export_onnx(module, template)` writes the trained values back into a copy of the template, so the
graph, names, IR version, opsets and dynamic dims stay exactly the template's.
`zero_kernel_masks(module)` records the pruned (all-zero) kernels, which `apply_masks` keeps at zero.

BatchNormalization always runs in inference form with its running statistics, also while training:
fine-tuning updates scale and bias with frozen statistics (a pruned model's statistics stay valid, and
batches of 5 would give poor estimates anyway).

Exporter de-duplication: torch's exporter shares equal initializers (all-zero biases) through Identity
nodes. Each consumer of such an Identity gets its own parameter (named after the Identity output),
since training makes the values differ; `export_onnx` un-shares them only if they did.
Why our own converter rather than onnx2torch: see docs/finetune.md.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..errors import LeanOnnxError
from ..graph.normalise import structural_copy
from .ops import OPS, NodeContext, SliceConcat, constant_value

__all__ = ["OnnxModule", "to_torch", "export_onnx", "zero_kernel_masks", "apply_masks", "mask_gradients"]


#: node input slots whose float initializers become trainable parameters
TRAINABLE_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "BatchNormalization": (1, 2), "Gemm": (0, 1, 2),
                   "MatMul": (0, 1), "PRelu": (1,)}


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module. `forward(*inputs)` takes the graph inputs in order and returns
    the single output, or a tuple for several. `onnx_name[key]` maps parameter/buffer keys back to the
    tensor names of the template; `input_names`/`output_names` are the graph's."""

    def __init__(self, model: onnx.ModelProto, path: str = "<model>", fuse_slices: bool = True):
        super().__init__()
        self.path = path
        norm = structural_copy(model, path)
        self.opset = next((o.version for o in norm.opset_import if o.domain in ("", "ai.onnx")), 1)
        inits = {t.name: t for t in norm.graph.initializer}
        self.input_names = [i.name for i in norm.graph.input if i.name not in inits]
        self.output_names = [o.name for o in norm.graph.output]
        self.onnx_name: dict[str, str] = {}
        self._keys: dict[str, str] = {}  # onnx tensor name -> attribute key
        sources = _template_sources(model)
        self._nodes = []
        for node in norm.graph.node:
            self._check_supported(node)
            inputs = [self._input_key(node, slot, name, inits, sources) for slot, name in enumerate(node.input)]
            ctx = NodeContext(node, self.opset)
            self._nodes.append((ctx, inputs, list(node.output)))
        if fuse_slices:
            self._nodes = _fuse_slice_concats(norm, self._nodes, self.opset)
        #: optional `hook(ctx, output names, results) -> results`, called after every node (calibrate.py
        #: reads and corrects conv outputs with it)
        self.node_hook = None
        self.eval()  # like the ONNX model: Dropout off until someone calls .train()

    def _check_supported(self, node: onnx.NodeProto) -> None:
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            raise LeanOnnxError(f"{self.path}: node {node.name or node.output[0]!r} ({op}): "
                                f"op not supported by the fine-tuning bridge")

    def _input_key(self, node, slot: int, name: str, inits: dict, sources: dict) -> tuple[str, str] | None:
        """('param'|'buffer'|'value', key) for one node input; None for an omitted optional input."""
        if not name:
            return None
        if name not in inits:
            return ("value", name)
        trainable = slot in TRAINABLE_SLOTS.get(node.op_type, ()) and _is_float(inits[name])
        source = sources.get((node.output[0], slot)) if trainable else None
        if source is not None:  # read name in the template: an Identity output gets its own parameter
            return ("param", self._register(source, inits[name], parameter=True))
        return ("buffer", self._register(name, inits[name], parameter=False))

    def _register(self, onnx_name: str, tensor: onnx.TensorProto, parameter: bool) -> str:
        if onnx_name in self._keys:
            return self._keys[onnx_name]
        key = re.sub(r"\W", "_", onnx_name) or "t"
        while hasattr(self, key):
            key += "_"
        value = torch.from_numpy(np.array(numpy_helper.to_array(tensor)))
        if parameter:
            self.register_parameter(key, nn.Parameter(value.float()))
        else:
            self.register_buffer(key, value)
        self._keys[onnx_name] = key
        self.onnx_name[key] = onnx_name
        return key

    def forward(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise LeanOnnxError(f"{self.path}: expected {len(self.input_names)} inputs {self.input_names}, "
                                f"got {len(inputs)}")
        values = dict(zip(self.input_names, inputs))
        for ctx, keys, outputs in self._nodes:
            args = [None if k is None else (values[k[1]] if k[0] == "value" else getattr(self, k[1])) for k in keys]
            ctx.training = self.training
            try:
                result = (ctx.run or OPS[ctx.op_type])(ctx, *args)
            except LeanOnnxError:
                raise
            except Exception as exc:
                raise LeanOnnxError(f"{self.path}: node {ctx.name!r} ({ctx.op_type}): {exc}".splitlines()[0]) from None
            results = result if isinstance(result, (tuple, list)) else (result,)
            if self.node_hook is not None:
                results = self.node_hook(ctx, outputs, results)
            values.update((name, r) for name, r in zip(outputs, results) if name)
        out = tuple(values[name] for name in self.output_names)
        return out[0] if len(out) == 1 else out

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def slots(self):
        """(op_type, [input keys]) per node, for mask builders that need to know who reads what."""
        return [(ctx.op_type, keys) for ctx, keys, _ in self._nodes]

    def dead_parameters(self) -> list[str]:
        """Keys of the parameters read only by nodes that feed no graph output (they never get a gradient)."""
        needed, read = set(self.output_names), set()
        for _, keys, outputs in reversed(self._nodes):
            if any(name in needed for name in outputs):
                needed.update(k[1] for k in keys if k is not None and k[0] == "value")
                read.update(k[1] for k in keys if k is not None and k[0] == "param")
        return [key for key, _ in self.named_parameters() if key not in read]


def to_torch(model: onnx.ModelProto, path: str = "<model>", fuse_slices: bool = True) -> OnnxModule:
    """The bridge's entry point (see the module docstring). `fuse_slices=False` runs every Slice and
    Concat node on its own instead of as `torch_ops.SliceConcat` (for comparisons)."""
    return OnnxModule(model, path, fuse_slices)


def _fuse_slice_concats(model: onnx.ModelProto, nodes: list, opset: int) -> list:
    """Every Concat fed by one tensor and constant slices of it (symmetric/reflect padding) becomes a
    `SliceConcat` (torch_ops), and the Slice and Constant nodes left without a consumer are dropped.
    `nodes` are the module's (context, input keys, outputs), one per node of `model`, in its order."""
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = constant_value(NodeContext(node, opset))
            if value is not None:
                constants[node.output[0]] = value
        producer.update((name, node) for name in node.output)

    def slices(node):  # [(start, end, axis, step)] of a Slice node with constant parameters, else None
        if opset < 10:
            attrs = NodeContext(node, opset)
            params = [attrs.get("starts"), attrs.get("ends"), attrs.get("axes")]
        else:
            names = list(node.input[1:5]) + [""] * (5 - len(node.input))
            if any(name and name not in constants for name in names):
                return None
            params = [constants[name].reshape(-1).tolist() if name else None for name in names]
        starts, ends = params[0], params[1]
        if starts is None or ends is None:
            return None
        axes = params[2] if params[2] is not None else list(range(len(starts)))
        steps = params[3] if len(params) > 3 and params[3] is not None else [1] * len(starts)
        return [tuple(int(v) for v in s) for s in zip(starts, ends, axes, steps)]

    fused = []
    for node, (ctx, keys, outputs) in zip(model.graph.node, nodes):
        if node.op_type == "Concat" and node.domain in ("", "ai.onnx") and "axis" in ctx.attrs:
            chains, roots = [], set()
            for name in node.input:
                chain = []
                while name in producer and producer[name].op_type == "Slice" and \
                        producer[name].domain in ("", "ai.onnx") and (step := slices(producer[name])) is not None:
                    chain = step + chain
                    name = producer[name].input[0]
                chains.append(chain)
                roots.add(name)
            root = next(iter(roots))
            if len(roots) == 1 and any(chains) and root not in constants:
                ctx, keys = SliceConcat(node, opset, chains), [("value", root)]
        fused.append((ctx, keys, outputs))
    used, kept = {o.name for o in model.graph.output}, []
    for ctx, keys, outputs in reversed(fused):
        if ctx.op_type in ("Slice", "Constant") and not any(name in used for name in outputs):
            continue
        used.update(k[1] for k in keys if k is not None and k[0] == "value")
        kept.append((ctx, keys, outputs))
    return kept[::-1]


def _is_float(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                                onnx.TensorProto.BFLOAT16)


def _template_sources(model: onnx.ModelProto) -> dict[tuple[str, int], str]:
    """(first output of a node, input slot) -> the name that node reads in the template, when that name
    is an initializer, a Constant output, or an Identity chain ending at one (writable by export_onnx)."""
    writable = {t.name for t in model.graph.initializer}
    writable |= {n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output}
    identity = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    sources = {}
    for node in model.graph.node:
        if not node.output:
            continue
        for slot, name in enumerate(node.input):
            if name and _root(name, identity) in writable:
                sources[(node.output[0], slot)] = name
    return sources


def _root(name: str, identity: dict[str, str]) -> str:
    seen = set()
    while name in identity and name not in seen:
        seen.add(name)
        name = identity[name]
    return name


# ----------------------------------------------------------------------------------------- export
def export_onnx(module: OnnxModule, template: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `template` with the module's parameters written into the initializers (or Constant
    nodes) they came from, in the template's dtypes. Parameters that share one initializer through
    exporter Identity nodes are written once if still equal; otherwise each Identity is replaced by an
    initializer of the same name holding its own value (the only change to the graph)."""
    model = copy.deepcopy(template)
    graph = model.graph
    identity = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for key, param in module.named_parameters():
        name = module.onnx_name[key]
        groups.setdefault(_root(name, identity), []).append((name, param.detach().cpu().numpy()))
    unshared = {}
    for root, members in groups.items():
        root_value = next((value for name, value in members if name == root), members[0][1])
        _write_tensor(model, root, root_value, module.path)
        for name, value in members:
            if name != root and not np.array_equal(value, root_value):
                unshared[name] = _as_tensor(value, _dtype_of(model, root, module.path), name)
    if unshared:
        _unshare(model, unshared)
    return model


def _dtype_of(model: onnx.ModelProto, name: str, path: str) -> int:
    for t in model.graph.initializer:
        if t.name == name:
            return t.data_type
    node = _constant_node(model.graph, name)
    if node is None:
        raise LeanOnnxError(f"{path}: tensor {name!r} is not in the template (export needs the model the "
                            f"module was built from)")
    return next(a.t.data_type for a in node.attribute if a.name == "value")


def _as_tensor(value: np.ndarray, data_type: int, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(value.astype(onnx.helper.tensor_dtype_to_np_dtype(data_type)), name)


def _write_tensor(model: onnx.ModelProto, name: str, value: np.ndarray, path: str) -> None:
    """Replace an initializer's (or a Constant node's) data, keeping its name, dtype and shape."""
    for k, t in enumerate(model.graph.initializer):
        if t.name == name:
            value = value.reshape(tuple(t.dims))
            model.graph.initializer[k].CopyFrom(_as_tensor(value, t.data_type, name))
            return
    node = _constant_node(model.graph, name)
    if node is None:
        raise LeanOnnxError(f"{path}: tensor {name!r} is not in the template")
    data_type = _dtype_of(model, name, path)
    del node.attribute[:]
    node.attribute.append(onnx.helper.make_attribute("value", _as_tensor(value, data_type, name)))


def _constant_node(graph: onnx.GraphProto, name: str):
    return next((n for n in graph.node if n.op_type == "Constant" and n.output and n.output[0] == name), None)


def _unshare(model: onnx.ModelProto, tensors: dict[str, onnx.TensorProto]) -> None:
    """Drop the Identity nodes that produce these names and add initializers of the same names instead."""
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in tensors)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.graph.initializer.extend(tensors.values())
    if model.ir_version < 4:  # old IR: every initializer is also a graph input
        model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in tensors.values())


# ------------------------------------------------------------------------------------------ masks
def zero_kernel_masks(module: OnnxModule) -> dict[str, torch.Tensor]:
    """{parameter key: 0/1 float mask} that keeps pruned structure pruned while training:
    * Conv/ConvTranspose weights: 0 for every k x k kernel W[j, i] (W[i, j]) that is exactly zero;
    * their bias entries of dead output channels (all kernels zero and bias exactly zero);
    * BatchNormalization scale and bias of channels whose scale and bias are both exactly zero
      (the masked model's dead channels, DESIGN.md section 2)."""
    masks = {}
    for op_type, keys in module.slots():
        params = [k[1] if k is not None and k[0] == "param" else None for k in keys]
        if op_type in ("Conv", "ConvTranspose") and len(params) > 1 and params[1]:
            weight = getattr(module, params[1]).detach()
            kernel_alive = weight.flatten(2).ne(0).any(-1)
            masks[params[1]] = kernel_alive.to(weight.dtype).reshape(weight.shape[:2] + (1,) * (weight.dim() - 2))
            if len(params) > 2 and params[2]:
                bias = getattr(module, params[2]).detach()
                alive = _output_channel_alive(op_type, kernel_alive, bias.numel())
                masks[params[2]] = (alive | bias.ne(0)).to(bias.dtype)
        elif op_type == "BatchNormalization" and params[1] and params[2]:
            scale, bias = getattr(module, params[1]).detach(), getattr(module, params[2]).detach()
            alive = (scale.ne(0) | bias.ne(0)).to(scale.dtype)
            masks[params[1]] = alive
            masks[params[2]] = alive
    return masks


def _output_channel_alive(op_type: str, kernel_alive: torch.Tensor, out_channels: int) -> torch.Tensor:
    if op_type == "Conv":
        return kernel_alive.any(1)
    groups = out_channels // kernel_alive.shape[1]  # ConvTranspose: W is (C_in, C_out / group, ...)
    return kernel_alive.reshape(groups, -1, kernel_alive.shape[1]).any(1).reshape(-1)


def apply_masks(module: OnnxModule, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked entries of the parameters (after every optimizer step)."""
    with torch.no_grad():
        for key, mask in masks.items():
            getattr(module, key).mul_(mask)


def mask_gradients(module: OnnxModule, masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradients of masked entries (before the step), so Adam's moments stay zero there."""
    for key, mask in masks.items():
        grad = getattr(module, key).grad
        if grad is not None:
            grad.mul_(mask)
