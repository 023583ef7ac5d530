"""Load an ONNX model, check it, and normalise what exporters leave behind.

The result is an *analysis copy*: weights from Constant nodes become initializers, Identity nodes in
front of initializers are bypassed, nodes are topologically sorted, symbolic input dims are fixed
(`--input-shape` or a documented default) and shapes are inferred. The file on disk is never touched.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from .errors import LeanOnnxError

#: Symbolic dims without --input-shape: batch (axis 0) becomes 1, every other symbolic dim 224.
DEFAULT_BATCH = 1
DEFAULT_SPATIAL = 224

_SHAPE_RE = re.compile(r"^(?:(?P<name>[^=]+)=)?(?P<dims>\d+(?:x\d+)*)$")


def parse_input_shapes(specs: list[str] | None) -> dict[str | None, tuple[int, ...]]:
    """Parse `NAME=1x3x224x224` (or `1x3x224x224` for a single-input model) into a dict.

    >>> parse_input_shapes(["x=1x3x32x32"])
    {'x': (1, 3, 32, 32)}
    """
    shapes: dict[str | None, tuple[int, ...]] = {}
    for spec in specs or []:
        m = _SHAPE_RE.match(spec.strip())
        if not m or any(int(d) <= 0 for d in m.group("dims").split("x")):
            raise LeanOnnxError(
                f"--input-shape {spec!r}: expected NAME=DxDxD... with positive integers, e.g. input=1x3x224x224"
            )
        shapes[m.group("name")] = tuple(int(d) for d in m.group("dims").split("x"))
    return shapes


@dataclass
class LoadedModel:
    """The original model (untouched) and its normalised, shape-inferred analysis copy."""

    path: str
    original: onnx.ModelProto
    model: onnx.ModelProto
    input_shapes: dict[str, tuple[int, ...]]
    assumed_shape: bool
    warnings: list[str] = field(default_factory=list)
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    shape_reads: dict[str, str] = field(default_factory=dict)  # tensor -> Shape node folded on it
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        return self.shapes.get(name)


def read_model(path: str) -> onnx.ModelProto:
    """Read an ONNX file; every failure is one LeanOnnxError line naming the file."""
    if not os.path.exists(path):
        raise LeanOnnxError(f"{path}: no such file")
    if os.path.isdir(path):
        raise LeanOnnxError(f"{path}: is a directory, not an ONNX file")
    if os.path.getsize(path) == 0:
        raise LeanOnnxError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(path)
    except Exception as exc:  # protobuf DecodeError, truncated files, bad external data
        raise LeanOnnxError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not model.graph.node:
        raise LeanOnnxError(f"{path}: not an ONNX model (no graph nodes; is this really a .onnx file?)")
    return model


def check_model(model: onnx.ModelProto, path: str, on_disk: bool = True) -> None:
    """onnx.checker on the file (C++, no re-serialisation), else on the normalised (sorted) copy."""
    if on_disk:
        try:
            onnx.checker.check_model(path)
            return
        except Exception:
            pass  # e.g. unsorted nodes, which the copy has fixed
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise LeanOnnxError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None


def structural_copy(original: onnx.ModelProto, path: str = "<model>") -> onnx.ModelProto:
    """A copy with exporter leftovers normalised, valid for any input shape: Constant nodes become
    initializers, nodes are sorted, small constant arithmetic is folded, Identity(initializer) is bypassed.
    The rewrite starts from this copy (so the pruned model keeps dynamic dims, IR version and opsets)."""
    model = copy.deepcopy(original)
    _constants_to_initializers(model.graph)
    _toposort(model.graph, path)
    _fold_constant_arithmetic(model, fold_shapes=False)
    _bypass_identity_of_initializers(model.graph)
    return model


def load_model(source: str | onnx.ModelProto, input_shapes: dict[str | None, tuple[int, ...]] | None = None,
               ) -> LoadedModel:
    """Read (a path) or take (a ModelProto), check and normalise into a LoadedModel (module docstring)."""
    on_disk = not isinstance(source, onnx.ModelProto)
    path = source if on_disk else (source.graph.name or "<model>")
    original = read_model(path) if on_disk else source
    model = structural_copy(original, path)
    check_model(model, path, on_disk)
    used, assumed, warnings = _fix_input_shapes(model.graph, input_shapes or {}, path)
    model = _infer(model, path)
    shape_reads = _fold_constant_arithmetic(model, fold_shapes=True)
    _bypass_identity_of_initializers(model.graph)
    if shape_reads:
        model = _infer(model, path)
    loaded = LoadedModel(path, original, model, used, assumed, warnings)
    loaded.shape_reads = shape_reads
    _index(loaded)
    return loaded


def _infer(model: onnx.ModelProto, path: str) -> onnx.ModelProto:
    """Shape inference on a skeleton (large initializers replaced by typed inputs), results copied back:
    serialising 100 MB of weights twice costs more than the whole graph analysis."""
    graph = model.graph
    skeleton = onnx.ModelProto(ir_version=model.ir_version)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    sk = skeleton.graph
    sk.node.extend(graph.node)
    sk.output.extend(graph.output)
    names = {i.name for i in graph.input}
    sk.input.extend(graph.input)
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or int(np.prod(t.dims)) > FOLD_MAX_ELEMENTS:
            if t.name not in names:
                sk.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            sk.initializer.append(t)
    try:
        inferred = shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception as exc:
        raise LeanOnnxError(f"{path}: shape inference failed ({_first_line(exc)})") from None
    del graph.value_info[:]
    graph.value_info.extend(inferred.graph.value_info)
    del graph.output[:]
    graph.output.extend(inferred.graph.output)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


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
                or any(i not in values for i in inputs)
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
    """`Identity(initializer)` is rewired so that consumers read the initializer itself."""
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
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


def _toposort(graph: onnx.GraphProto, path: str) -> None:
    """Sort nodes so that every node comes after the producers of its inputs (Kahn's algorithm)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer_of = {out: k for k, n in enumerate(graph.node) for out in n.output}
    waiting = [0] * len(graph.node)
    users: dict[int, list[int]] = {}
    for k, node in enumerate(graph.node):
        deps = {producer_of[i] for i in _all_inputs(node) if i not in available and i in producer_of}
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


def _all_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node, including the outer-scope names its subgraphs (If/Loop/Scan) read."""
    names = list(node.input)
    for attr in node.attribute:
        subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for sub in subgraphs:
            for inner in sub.node:
                names.extend(_all_inputs(inner))
    return names


def _fixed(dim) -> bool:
    """A concrete dim; paddle2onnx writes dynamic ones as dim_value -1 (or 0), which count as symbolic."""
    return dim.HasField("dim_value") and dim.dim_value > 0


def _fix_input_shapes(graph, requested, path):
    """Set concrete dims on graph inputs; return (shapes used, whether a default was assumed, warnings)."""
    inits = {t.name for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in inits]
    names = {i.name for i in real_inputs}
    if None in requested:
        if len(real_inputs) != 1:
            raise LeanOnnxError(f"{path}: --input-shape without NAME= needs a single-input model; inputs: {sorted(names)}")
        requested = {real_inputs[0].name: requested[None], **{k: v for k, v in requested.items() if k}}
    for name in requested:
        if name not in names:
            raise LeanOnnxError(f"{path}: --input-shape names {name!r}, which is not a graph input; inputs: {sorted(names)}")
    used: dict[str, tuple[int, ...]] = {}
    assumed = False
    warnings = []
    for inp in real_inputs:
        if not inp.type.HasField("tensor_type"):
            continue
        dims = inp.type.tensor_type.shape.dim
        if inp.name in requested:
            shape = requested[inp.name]
            if len(shape) != len(dims) or any(
                _fixed(d) and d.dim_value != s for d, s in zip(dims, shape)
            ):
                model_shape = "x".join(d.dim_param or str(d.dim_value) or "?" for d in dims)
                raise LeanOnnxError(
                    f"{path}: --input-shape {inp.name}={'x'.join(map(str, shape))} does not fit the model's {model_shape}"
                )
        else:
            shape = tuple(
                d.dim_value if _fixed(d) else (DEFAULT_BATCH if k == 0 else DEFAULT_SPATIAL)
                for k, d in enumerate(dims)
            )
            if any(not _fixed(d) for d in dims):
                assumed = True
                warnings.append(
                    f"{path}: input {inp.name!r} has symbolic dims; assuming {'x'.join(map(str, shape))} "
                    f"(set --input-shape {inp.name}=...)"
                )
        for d, s in zip(dims, shape):
            d.Clear()
            d.dim_value = s
        used[inp.name] = tuple(shape)
    return used, assumed, warnings


def _index(loaded: LoadedModel) -> None:
    graph = loaded.graph
    loaded.initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            loaded.shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim
            )
    for name, arr in loaded.initializers.items():
        loaded.shapes[name] = tuple(arr.shape)
    for node in graph.node:
        for out in node.output:
            loaded.producer[out] = node
        for inp in node.input:
            if inp:
                loaded.consumers.setdefault(inp, []).append(node)
