"""Normalising what exporters leave behind, in a copy of the model (`structural_copy`): local functions
inlined, duplicate node names made unique, Constant nodes turned into initializers, nodes sorted, small
constant arithmetic folded, Identity(initializer) bypassed, NHWC stretches between Transposes made NCHW
(layout.py). The analysis copy and the rewrite's base are
both made here, so the pruned model keeps IR version, opsets, names and dynamic dims."""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import LeanOnnxError
from ..errors import first_line as _first_line
from ..io import external_data
from .layout import sink_transposes


def structural_copy(original: onnx.ModelProto, path: str = "<model>", stub_large: bool = False
                    ) -> onnx.ModelProto:
    """A copy with exporter leftovers normalised, valid for any input shape: local functions are inlined,
    Constant nodes become initializers, nodes are sorted, small constant arithmetic is folded,
    Identity(initializer) is bypassed. The rewrite starts from this copy (so the pruned model keeps dynamic
    dims, IR version and opsets). `stub_large`: large float tensors are stubs (io/external_data.py), no weights are
    copied; `external_data.fill_stubs` puts them back."""
    model = _copy_with_stubs(original) if stub_large else copy.deepcopy(original)
    if model.functions:
        model = _inline_functions(model, path)
    _unique_node_names(model.graph)
    _constants_to_initializers(model.graph)
    _toposort(model.graph, path)
    _fold_constant_arithmetic(model, fold_shapes=False)
    _bypass_identity_of_initializers(model.graph)
    if sink_transposes(model):  # NHWC stretches of converted TensorFlow models run in NCHW (layout.py)
        _toposort(model.graph, path)
        _bypass_identity_of_initializers(model.graph)
    return model


def order_and_name(graph: onnx.GraphProto, path: str = "<model>") -> None:
    """Only what onnx.checker and ONNX Runtime require of a graph that is otherwise left as it is: nodes
    sorted, duplicate node names suffixed (rewrite/masked.py keeps the input's graph this way)."""
    _unique_node_names(graph)
    _toposort(graph, path)


def _copy_with_stubs(original: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto()
    external_data.copy_fields(original, model, ("graph",))
    external_data.copy_fields(original.graph, model.graph, ("initializer", "node"))
    for t in original.graph.initializer:
        model.graph.initializer.append(external_data.stub(t) if external_data.is_large(t) else t)
    for node in original.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None) \
            if node.op_type == "Constant" and len(node.output) == 1 else None
        if value is not None and external_data.is_large(value):
            model.graph.initializer.append(external_data.stub(value, node.output[0]))
            continue
        model.graph.node.append(node)
    return model


def _unique_node_names(graph: onnx.GraphProto) -> list[str]:
    """Duplicate node names (ONNX Runtime refuses them) get a suffix: `conv`, `conv__2`, ...; returns them."""
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.name:
            counts[node.name] = counts.get(node.name, 0) + 1
    duplicates = [name for name, n in counts.items() if n > 1]
    if duplicates:
        taken = set(counts)
        seen: dict[str, int] = {}
        for node in graph.node:
            if node.name in duplicates:
                seen[node.name] = seen.get(node.name, 0) + 1
                if seen[node.name] > 1:
                    new, k = f"{node.name}__{seen[node.name]}", seen[node.name]
                    while new in taken:
                        k += 1
                        new = f"{node.name}__{k}"
                    taken.add(new)
                    node.name = new
    return duplicates


def _inline_functions(model: onnx.ModelProto, path: str) -> onnx.ModelProto:
    """Local functions are inlined (onnx.inliner), so the convs inside them are prunable like any other;
    the opset imports stay as they were."""
    import onnx.inliner

    try:
        inlined = onnx.inliner.inline_local_functions(model)
    except Exception as exc:
        raise LeanOnnxError(f"{path}: cannot inline its local functions ({_first_line(exc)})") from None
    del inlined.opset_import[:]
    inlined.opset_import.extend(model.opset_import)
    return inlined


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes with a tensor value become initializers (Paddle and torch exports use both)."""
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            tensor = _constant_value(node)
            if tensor is not None:
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                continue
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            return copy.deepcopy(attr.t)
        if attr.name in ("value_float", "value_int"):
            value = attr.f if attr.name == "value_float" else attr.i
            dtype = np.float32 if attr.name == "value_float" else np.int64
            return numpy_helper.from_array(np.array(value, dtype=dtype))
        if attr.name in ("value_floats", "value_ints"):
            values = attr.floats if attr.name == "value_floats" else attr.ints
            dtype = np.float32 if attr.name == "value_floats" else np.int64
            return numpy_helper.from_array(np.array(list(values), dtype=dtype))
    return None  # sparse or string constants stay as nodes (their consumers are frozen if they matter)


#: Small shape/index arithmetic that exporters leave on constants (Slice bounds, Reshape shapes, ...).
FOLDABLE = {"Unsqueeze", "Squeeze", "Concat", "Gather", "Cast", "Reshape", "Add", "Sub", "Mul", "Div", "Neg",
            "Slice", "Range", "ConstantOfShape", "Transpose", "Floor", "Ceil", "Min", "Max"}
FOLD_MAX_ELEMENTS = 1 << 16


def _fold_constant_arithmetic(model: onnx.ModelProto, fold_shapes: bool) -> dict[str, str]:
    """Evaluate FOLDABLE nodes whose inputs are all small initializers (onnx's reference evaluator),
    and (fold_shapes) Shape nodes of tensors whose shape is static at the analysis input shape.

    Returns {tensor: Shape node} for every folded Shape: the channel count of those tensors is read at
    run time (ShuffleNet's channel split), so the graph must not change it.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    static = {}
    for vi in list(graph.input) + list(graph.value_info):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if dims and all(d.HasField("dim_value") for d in dims):
            static[vi.name] = [d.dim_value for d in dims]
    shape_reads: dict[str, str] = {}
    keep = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if fold_shapes and node.op_type == "Shape" and node.domain in ("", "ai.onnx") and inputs[0] in static:
            start, end = 0, None
            for a in node.attribute:
                start, end = (a.i, end) if a.name == "start" else (start, a.i if a.name == "end" else end)
            tensor = numpy_helper.from_array(np.array(static[inputs[0]][start:end], np.int64), node.output[0])
            graph.initializer.append(tensor)
            values[node.output[0]] = tensor
            shape_reads[inputs[0]] = node.name or node.output[0]
            continue
        if (node.op_type not in FOLDABLE or node.domain not in ("", "ai.onnx") or not inputs
                or any(i not in values or external_data.is_stub(values[i]) for i in inputs)
                or sum(int(np.prod(values[i].dims)) for i in inputs) > FOLD_MAX_ELEMENTS):
            keep.append(node)
            continue
        tiny = onnx.helper.make_model(
            onnx.helper.make_graph([node], "fold", [], [onnx.helper.make_empty_tensor_value_info(o) for o in node.output],
                                   [values[i] for i in dict.fromkeys(inputs)]),
            opset_imports=model.opset_import, ir_version=model.ir_version)
        try:
            results = ReferenceEvaluator(tiny).run(None, {})
        except Exception:  # not foldable after all: leave the node alone
            keep.append(node)
            continue
        for name, value in zip(node.output, results):
            tensor = numpy_helper.from_array(np.asarray(value), name)
            graph.initializer.append(tensor)
            values[name] = tensor
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    return shape_reads


def _bypass_identity_of_initializers(graph: onnx.GraphProto) -> None:
    """`Identity(initializer)` is rewired so that consumers read the initializer itself (not when a
    subgraph reads the Identity's output: its reference would dangle)."""
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output} | subgraph_reads(graph)
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        src = rename.get(node.input[0], node.input[0]) if node.input else ""
        if node.op_type == "Identity" and src in inits and node.output[0] not in outputs:
            rename[node.output[0]] = src
            continue
        keep.append(node)
    if not rename:
        return
    for node in keep:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names that subgraphs (If/Loop/Scan bodies) of the graph's nodes read from outer scopes (or define)."""
    names: set[str] = set()
    for node in graph.node:
        if any(True for _ in external_data.subgraphs(node)):
            names.update(all_inputs(node))
    return names


def _toposort(graph: onnx.GraphProto, path: str) -> None:
    """Sort nodes so that every node comes after the producers of its inputs (Kahn's algorithm)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer_of = {out: k for k, n in enumerate(graph.node) for out in n.output}
    waiting = [0] * len(graph.node)
    users: dict[int, list[int]] = {}
    for k, node in enumerate(graph.node):
        deps = {producer_of[i] for i in all_inputs(node) if i not in available and i in producer_of}
        waiting[k] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    order: list[int] = []
    while ready:
        k = ready.pop(0)
        order.append(k)
        for u in users.get(k, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(order) != len(graph.node):
        stuck = next(n for k, n in enumerate(graph.node) if k not in set(order))
        raise LeanOnnxError(f"{path}: node {stuck.name!r} ({stuck.op_type}): graph has a cycle")
    if order != list(range(len(order))):
        nodes = [copy.deepcopy(graph.node[k]) for k in order]
        del graph.node[:]
        graph.node.extend(nodes)


def all_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node, including the outer-scope names its subgraphs (If/Loop/Scan) read."""
    names = list(node.input)
    for sub in external_data.subgraphs(node):
        for inner in sub.node:
            names.extend(all_inputs(inner))
        names.extend(o.name for o in sub.output)  # a body output may be an outer-scope name itself
    return names
