"""Write the masked model and the physically pruned model (DESIGN.md section 2).

Both start from `load.structural_copy` of the original, so IR version, opsets, names and dynamic
dims stay. The masked model zeroes the kernels that were not kept and makes dead channels zero (conv
bias, BatchNormalization scale and shift). The pruned model does the same and then slices every
tensor that carries channels to the plan's keep mask. A node whose channels change but which no rule
here knows how to rewrite is an internal error: never a wrong model.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import LeanOnnxError
from ..graph.channel_graph import ChannelGraph, ConvLayer, node_name
from ..graph.load import LoadedModel
from ..graph.normalise import all_inputs, structural_copy
from ..graph.registry import ALIAS_OPS
from ..io.external_data import LARGE_ELEMENTS, fill_stubs, is_stub, tensor_array
from ..select.selection import Selection
from .plan import Plan

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "PRelu", "Pow"}
#: ops that carry channels through without parameters to slice
PASS_THROUGH = set(ALIAS_OPS) | {"Concat", "GlobalAveragePool", "AveragePool", "ReduceMean", "ReduceMax",
                                 "ReduceMin", "ReduceSum", "ReduceL2", "Transpose", "Squeeze", "Unsqueeze",
                                 "Pad"}  # Pad: routing.pad freezes it unless its pads leave the channels alone


class Initializers:
    """Initializer arrays of a model copy, read lazily; changed ones are written back by `finish`.
    An initializer read by several nodes is copied before one of them changes it. Stubs (large weights,
    io/external_data.py) are read from the loaded original and filled in by `finish` when they did not change."""

    def __init__(self, model: onnx.ModelProto, loaded: LoadedModel | None = None):
        self.model, self.loaded = model, loaded
        self.protos = {t.name: t for t in model.graph.initializer}
        self.users = Counter(name for n in model.graph.node for name in all_inputs(n))
        self.changed: dict[str, np.ndarray] = {}
        self.copies: dict[str, list[str]] = {}  # shared initializer -> the copies made for its readers

    def get(self, name: str) -> np.ndarray | None:
        if name in self.changed:
            return self.changed[name]
        proto = self.protos.get(name)
        if proto is None:
            return None
        if is_stub(proto):
            if name in self.loaded.initializers:  # read from the file into one array
                return self.loaded.initializers[name]
            return tensor_array(self.loaded.source_tensors()[name], self.loaded.path)
        return tensor_array(proto, self.loaded.path if self.loaded is not None else "<model>")

    def set(self, node, index: int, value: np.ndarray) -> None:
        name = node.input[index]
        if self.users[name] > 1:  # shared: this node gets its own copy, or an equal copy made before
            current = self.get(name)
            if current.shape == value.shape and np.array_equal(current, value):
                return
            twin = next((n for n in self.copies.get(name, []) if self.changed[n].shape == value.shape
                         and np.array_equal(self.changed[n], value)), None)
            self.users[name] -= 1
            if twin is not None:
                node.input[index] = twin
                self.users[twin] += 1
                return
            new = f"{name}__{node_name(node)}"
            while new in self.protos or new in self.changed:
                new += "_"
            node.input[index] = new
            self.users[new] = 1
            self.copies.setdefault(name, []).append(new)
            name = new
        dtype = self.protos[node.input[index]].data_type if node.input[index] in self.protos else None
        self.changed[name] = value.astype(onnx.helper.tensor_dtype_to_np_dtype(dtype), copy=False) if dtype else value

    def set_new(self, node, index: int, value: np.ndarray) -> None:
        """Point input `index` at a fresh initializer (for sizes/bounds that were not initializers)."""
        name = f"{node_name(node)}__in{index}"
        while name in self.protos or name in self.changed:
            name += "_"
        if index < len(node.input):
            node.input[index] = name
        else:
            node.input.extend([""] * (index - len(node.input)) + [name])
        self.users[name] = 1
        self.changed[name] = value

    def finish(self, fill: bool = True) -> None:
        """Unchanged initializers stay (stubs filled from the original unless not `fill`), changed ones are
        converted one at a time and dropped from `changed`, so the weights are never held twice here."""
        graph = self.model.graph
        used = {name for n in graph.node for name in all_inputs(n)} | {o.name for o in graph.output}
        tensors = [t for t in graph.initializer if t.name in used and t.name not in self.changed]
        del graph.initializer[:]
        graph.initializer.extend(tensors)
        del tensors
        if fill and self.loaded is not None and any(is_stub(t) for t in graph.initializer):
            fill_stubs(self.model, self.loaded.source_tensors())
        for name in list(self.changed):
            if name in used:  # popped into the call: _to_tensor holds the only reference
                graph.initializer.append(_to_tensor(self.changed.pop(name), name))
            else:
                del self.changed[name]


def _to_tensor(value: np.ndarray, name: str) -> onnx.TensorProto:
    """numpy_helper.from_array, except that a large array is dropped before its bytes are copied into the
    proto (two copies of it at a time, not three)."""
    if value.size <= LARGE_ELEMENTS or value.dtype.byteorder == ">" or value.dtype.kind not in "fiub":
        return numpy_helper.from_array(np.ascontiguousarray(value), name)
    tensor = onnx.TensorProto(name=name, dims=value.shape,
                              data_type=onnx.helper.np_dtype_to_tensor_dtype(value.dtype))
    raw = np.ascontiguousarray(value).tobytes()
    del value  # the caller holds no other reference
    tensor.raw_data = raw
    return tensor


def rewrite(graph: ChannelGraph, selection: Selection, plan: Plan, slice_channels: bool,
            base: onnx.ModelProto | None = None, changed: set[str] | None = None) -> onnx.ModelProto:
    """The pruned model (slice_channels) or the masked model (same shapes), written into `base` (a fresh
    `structural_copy` of the original, made here when not given; it is modified). `changed`, when given,
    receives the names of the initializers written, and the unchanged large ones stay stubs (the masked
    model is then carried onto the original's graph, rewrite/masked.py)."""
    model = base if base is not None else structural_copy(graph.loaded.original, graph.loaded.path)
    inits = Initializers(model, graph.loaded)
    layers = {layer.output: layer for layer in graph.layers}
    keep = (lambda t: _nontrivial(plan.keep(t))) if slice_channels else (lambda t: None)
    removed = []
    head_of_reader = {h.read.reader_output: h for h in plan.heads} if slice_channels else {}
    head_of_gemm = {h.gemm: h for h in plan.heads} if slice_channels else {}
    for node in model.graph.node:
        if slice_channels and _all_removed(node, plan):
            removed.append(node)
            continue
        if slice_channels and node.output and node.output[0] in plan.bypass:
            _bypass(node, plan.bypass[node.output[0]], keep(node.output[0]), graph, inits)
            continue
        if node.output and node.output[0] in head_of_gemm:
            _gemm_columns(node, head_of_gemm[node.output[0]], plan, inits)
            continue
        if node.output and node.output[0] in head_of_reader and node.op_type in ("Flatten", "Reshape"):
            _head_reshape(node, head_of_reader[node.output[0]], plan, inits, graph)
            continue
        layer = layers.get(node.output[0]) if node.op_type in ("Conv", "ConvTranspose") else None
        if layer is not None:
            _conv(node, layer, selection, plan, inits, keep, plan.gathers if slice_channels else None)
        elif node.op_type == "BatchNormalization":
            _batch_norm(node, graph, plan, inits, keep)
        elif not slice_channels:
            continue
        elif node.op_type == "InstanceNormalization":
            _slice_params(node, inits, keep(node.input[0]), (1, 2))
        elif node.op_type in ELEMENTWISE:
            _elementwise(node, graph, inits, keep(node.output[0]))
        elif node.op_type == "Concat":
            _concat(node, plan, keep)
        elif node.op_type == "Split":
            _split(node, graph, inits, keep(node.input[0]))
        elif node.op_type == "Slice":
            _slice(node, graph, inits, keep(node.input[0]))
        elif node.op_type == "Resize":
            _resize(node, inits, keep(node.output[0]))
        elif node.op_type not in PASS_THROUGH and any(keep(t) is not None for t in list(node.input) + list(node.output)):
            raise LeanOnnxError(f"{graph.loaded.path}: node {node_name(node)!r} ({node.op_type}): internal: no rule "
                                "to remove channels here (please report); nothing was written")
    for node in removed:
        model.graph.node.remove(node)
    if slice_channels and plan.gathers:
        _insert_gathers(model, plan, inits)
    if changed is not None:
        changed.update(inits.changed)
    inits.finish(fill=changed is None)
    del model.graph.value_info[:]
    return model


def _gemm_columns(node, head, plan: Plan, inits: Initializers) -> None:
    """Drop the input columns of channels that left the head's input; with --fold-constants their
    constant contribution moves into the Gemm bias (it is 0 otherwise)."""
    keep = _nontrivial(plan.keep(head.read.tensor))
    if keep is None:
        return
    columns = np.repeat(keep, head.per_channel)
    weight = inits.get(node.input[1])
    trans_b = node.op_type == "Gemm" and next((a.i for a in node.attribute if a.name == "transB"), 0)
    rows = weight.T if trans_b else weight  # (in, out)
    constants = np.repeat(np.where(keep, 0.0, head.values), head.per_channel)
    if not np.all(np.isfinite(constants)):
        raise LeanOnnxError(f"{node_name(node)}: internal: a head column that is not constant was dropped "
                            "(please report); nothing was written")
    delta = constants @ rows.astype(np.float64)
    inits.set(node, 1, (rows[columns].T if trans_b else rows[columns]).astype(weight.dtype))
    if np.any(delta != 0):
        if node.op_type != "Gemm":
            raise LeanOnnxError(f"{node_name(node)}: internal: non-zero constant at a MatMul head (please report)")
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        has_bias = len(node.input) > 2 and node.input[2] and inits.get(node.input[2]) is not None
        if len(node.input) > 2 and node.input[2] and not has_bias:
            raise LeanOnnxError(f"{node_name(node)}: internal: Gemm bias is computed at run time (please report)")
        bias = inits.get(node.input[2]).astype(np.float64) if has_bias else 0.0
        new_bias = (bias + alpha * delta / (beta if has_bias else 1.0)).astype(weight.dtype)
        if has_bias:
            inits.set(node, 2, new_bias)
        else:
            for a in list(node.attribute):
                if a.name == "beta":
                    node.attribute.remove(a)  # the new bias enters with beta = 1
            inits.set_new(node, 2, new_bias)


def _head_reshape(node, head, plan: Plan, inits: Initializers, graph: ChannelGraph) -> None:
    """A Reshape to (batch, C*H*W) in front of a head: the column count follows the kept channels."""
    keep = _nontrivial(plan.keep(head.read.tensor))
    if keep is None or node.op_type == "Flatten":
        return
    target = inits.get(node.input[1])
    columns = len(keep) * head.per_channel
    if target is None:
        raise LeanOnnxError(f"{graph.loaded.path}: node {node_name(node)!r} (Reshape): internal: target shape "
                            "is not constant but its channels changed (please report); nothing was written")
    if int(target[1]) == columns:
        target = target.copy()
        target[1] = int(keep.sum()) * head.per_channel
        inits.set(node, 1, target)


def _insert_gathers(model, plan: Plan, inits: Initializers) -> None:
    """A conv listed in plan.gathers reads `Gather(x, channels, axis=1)`: the positions, in the pruned
    x, of the channels its kernels read (its weight was sliced to them in `_conv`)."""
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for node in nodes:
        read = plan.gathers.get(node.output[0]) if node.op_type in ("Conv", "ConvTranspose") else None
        if read is not None:
            x = node.input[0]
            kept = plan.keep(x)
            positions = np.flatnonzero(read[kept] if kept is not None else read).astype(np.int64)
            gather = onnx.helper.make_node("Gather", [x, ""], [f"{x}__gather__{node_name(node)}"], axis=1,
                                           name=f"{node_name(node)}__gather")
            inits.set_new(gather, 1, positions)
            node.input[0] = gather.output[0]
            model.graph.node.append(gather)
        model.graph.node.append(node)


def _bypass(node, bypass, out_keep, graph: ChannelGraph, inits: Initializers) -> None:
    """A sum whose other operand is a constant in the masked model (rewrite/bypass.py): an Identity of the
    operand that stays when the constant is 0, else that operand plus the constant (kept channels, on the
    channel axis) as an initializer."""
    del node.input[:]
    node.input.append(bypass.other)
    del node.attribute[:]
    if bypass.bias is None:
        node.op_type = "Identity"
        return
    node.op_type = "Add"
    bias = bypass.bias if out_keep is None else bypass.bias[out_keep]
    rank = len(graph.loaded.shape(node.output[0]))
    dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.loaded.elem_type(node.output[0]))
    inits.set_new(node, 1, bias.reshape((-1,) + (1,) * max(rank - 2, 0)).astype(dtype))


def _nontrivial(mask):
    return None if mask is None or mask.all() else mask


def _all_removed(node, plan: Plan) -> bool:
    """Every output carries channels and none of them stays: the node goes."""
    outs = [plan.keep(t) for t in node.output if t]
    return bool(outs) and all(k is not None and not k.any() for k in outs)


def _conv(node, layer: ConvLayer, selection: Selection, plan: Plan, inits: Initializers, keep,
          gathers: dict | None = None) -> None:
    weight = inits.get(layer.weight_name)
    kernels = layer.kernels(weight).copy()
    mask = selection.layer_mask(layer)
    kernels[~mask] = 0
    dead_rows = plan.dead[layer.out_nodes] & plan.zero_dead
    bias = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    bias_changed = bias is not None and bool(np.any(bias[dead_rows]))
    if bias_changed:
        bias = bias.copy()
        bias[dead_rows] = 0
    out_keep, in_keep = keep(layer.output), keep(layer.input)
    if gathers is not None and layer.output in gathers:
        in_keep = gathers[layer.output]  # it reads a Gather of the channels its kernels use
    group = layer.group
    sliced = out_keep is not None or in_keep is not None
    if not sliced and mask.all() and not bias_changed:
        return  # untouched: shared initializers stay shared
    if sliced:
        out_keep = np.ones(layer.c_out, bool) if out_keep is None else out_keep
        in_keep = np.ones(layer.c_in, bool) if in_keep is None else in_keep
        if group == 1:
            kernels = kernels[out_keep][:, in_keep]
        elif layer.c_in_g == 1 and group == layer.c_in:  # depthwise: in and out are coupled
            kernels = kernels[out_keep]
            group = int(in_keep.sum())
        else:
            raise LeanOnnxError(f"{layer.name}: internal: grouped conv channels changed (please report)")
        if bias is not None:
            bias = bias[out_keep]
    inits.set(node, 1, _to_onnx_layout(kernels, layer, group, weight.ndim))
    if bias is not None and (bias_changed or sliced):
        inits.set(node, 2, bias)
    if group != layer.group:
        for a in node.attribute:
            if a.name == "group":
                a.i = group


def _to_onnx_layout(kernels: np.ndarray, layer: ConvLayer, group: int, ndim: int) -> np.ndarray:
    """Inverse of ConvLayer.kernels for the (possibly sliced) kernel array."""
    if ndim == 3:
        kernels = kernels[:, :, 0, :]
    if layer.op != "ConvTranspose":
        return kernels
    c_out, cig = kernels.shape[:2]
    cog = c_out // group
    kernels = kernels.reshape((group, cog, cig) + kernels.shape[2:]).swapaxes(1, 2)
    return kernels.reshape((group * cig, cog) + kernels.shape[3:])


def _batch_norm(node, graph: ChannelGraph, plan: Plan, inits: Initializers, keep) -> None:
    nodes = graph.tensor_nodes.get(node.output[0])
    dead = plan.dead[nodes] & plan.zero_dead if nodes is not None else None
    in_keep = keep(node.input[0])
    for index in (1, 2, 3, 4):
        value = inits.get(node.input[index])
        if value is None:
            continue
        if dead is not None and dead.any() and index in (1, 2):  # scale and shift of dead channels
            value = value.copy()
            value[dead] = 0
        elif in_keep is None:
            continue
        inits.set(node, index, value if in_keep is None else value[in_keep])


def _slice_params(node, inits: Initializers, channel_keep, indices) -> None:
    if channel_keep is None:
        return
    for index in indices:
        value = inits.get(node.input[index]) if index < len(node.input) else None
        if value is not None and value.ndim >= 1 and value.shape[0] == len(channel_keep):
            inits.set(node, index, value[channel_keep])


def _elementwise(node, graph: ChannelGraph, inits: Initializers, out_keep) -> None:
    """Slice per-channel constant operands (biases, SE scales, PRelu slopes) along the channel axis."""
    if out_keep is None:
        return
    out_rank = len(graph.loaded.shape(node.output[0]) or ()) or 4
    for index, name in enumerate(node.input):
        value = inits.get(name)
        if value is None:
            continue
        axis = 1 - (out_rank - value.ndim)
        if 0 <= axis < value.ndim and value.shape[axis] == len(out_keep) and len(out_keep) > 1:
            inits.set(node, index, np.compress(out_keep, value, axis=axis))


def _concat(node, plan: Plan, keep) -> None:
    drop = set(plan.concat_drop.get(node.output[0], []))
    drop |= {k for k, t in enumerate(node.input) if (m := plan.keep(t)) is not None and not m.any()}
    if len(drop) == len(node.input):
        drop.discard(0)
    if drop:
        kept = [t for k, t in enumerate(node.input) if k not in drop]
        del node.input[:]
        node.input.extend(kept)


def _split(node, graph: ChannelGraph, inits: Initializers, in_keep) -> None:
    """New split sizes from the kept channels. An output that keeps no channel leaves the Split (nothing
    that stays reads it: plan.py `_starved_inputs`); a Split left with one output becomes an Identity."""
    if in_keep is None:
        return
    sizes = [len(graph.tensor_nodes[t]) for t in node.output]
    offsets = np.cumsum([0] + sizes)
    new = np.array([int(in_keep[a:b].sum()) for a, b in zip(offsets[:-1], offsets[1:])], np.int64)
    if (new == 0).any():
        outputs = [t for t, n in zip(node.output, new) if n > 0]
        new = new[new > 0]
        del node.output[:]
        node.output.extend(outputs)
        if len(outputs) == 1:
            del node.input[1:]
            del node.attribute[:]
            node.op_type = "Identity"
            return
    if any(a.name == "split" for a in node.attribute):  # opset < 13
        next(a for a in node.attribute if a.name == "split").ints[:] = new.tolist()
        return
    for a in list(node.attribute):
        if a.name == "num_outputs":  # opset 18 equal split: make the sizes explicit
            node.attribute.remove(a)
    if len(node.input) > 1 and node.input[1] and inits.get(node.input[1]) is not None:
        inits.set(node, 1, new)
    else:
        inits.set_new(node, 1, new)


def _slice(node, graph: ChannelGraph, inits: Initializers, in_keep) -> None:
    if in_keep is None:
        return
    if len(node.input) < 3 or any(inits.get(t) is None for t in node.input[1:] if t):
        raise LeanOnnxError(f"{graph.loaded.path}: node {node_name(node)!r} (Slice): internal: bounds are not "
                            "constant but its channels changed (please report)")
    starts, ends = inits.get(node.input[1]).copy(), inits.get(node.input[2]).copy()
    rank = len(graph.loaded.shape(node.input[0]) or ()) or 4
    axes = inits.get(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(len(starts))
    c = len(in_keep)
    prefix = np.concatenate([[0], np.cumsum(in_keep)])
    for k, axis in enumerate(axes):
        if int(axis) % rank == 1:
            start, stop, _ = slice(int(max(min(starts[k], 2**62), -2**62)), int(max(min(ends[k], 2**62), -2**62))).indices(c)
            starts[k], ends[k] = prefix[start], prefix[max(stop, start)]
    inits.set(node, 1, starts)
    inits.set(node, 2, ends)


def _resize(node, inits: Initializers, out_keep) -> None:
    if out_keep is None or len(node.input) < 4 or not node.input[3]:
        return
    sizes = inits.get(node.input[3])
    if sizes is not None and sizes.ndim == 1 and len(sizes) >= 2:
        sizes = sizes.copy()
        sizes[1] = int(out_keep.sum())
        inits.set(node, 3, sizes)
