"""Load an ONNX model, check it, and normalise what exporters leave behind.

The result is an *analysis copy*: weights from Constant nodes become initializers, Identity nodes in
front of initializers are bypassed, nodes are topologically sorted, symbolic input dims are fixed
(`--input-shape` or a documented default) and shapes are inferred. The file on disk is never touched.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from . import storage
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


#: op types of quantized models (QDQ, QLinear*, integer convs/matmuls): refused, prune before quantizing
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QGemm", "QAttention", "DynamicQuantizeMatMul",
                 "MatMulIntegerToFloat", "DynamicQuantizeLSTM"}


@dataclass
class LoadedModel:
    """The original model (untouched) and its normalised, shape-inferred analysis copy.

    Large float weights are read from the file only when needed (storage.py): `skeleton` is the original
    with those weights as stubs, `source_tensors()` reads them one at a time, `initializers` gives every
    initializer of the analysis copy as a numpy array, and `original` (the whole model) is read on first
    use only: pruning never needs it, --validate does."""

    path: str
    model: onnx.ModelProto
    input_shapes: dict[str, tuple[int, ...]]
    assumed_shape: bool
    warnings: list[str] = field(default_factory=list)
    initializers: Mapping = field(default_factory=dict)
    shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    shape_reads: dict[str, str] = field(default_factory=dict)  # tensor -> Shape node folded on it
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    skeleton: onnx.ModelProto | None = field(default=None, repr=False)
    _original: onnx.ModelProto | None = field(default=None, repr=False)
    _tensors: Mapping = field(default_factory=dict, repr=False)
    _file_id: tuple | None = field(default=None, repr=False)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    @property
    def original(self) -> onnx.ModelProto:
        if self._original is None:
            if storage.file_id(self.path) != self._file_id:
                raise LeanOnnxError(f"{self.path}: the file changed on disk while lean-onnx was using it; nothing "
                                    "was written (run again)")
            self._original = read_model(self.path)
        return self._original

    def source_tensors(self) -> Mapping:
        """Name -> the original TensorProto of each stub (read from the file on access)."""
        return self._tensors

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        return self.shapes.get(name)


class TensorArrays(Mapping):
    """Initializers of the analysis copy as numpy arrays: small ones converted once, large ones (stubs)
    converted from the original on each access, so the weights are not held twice."""

    def __init__(self, loaded: LoadedModel, small: dict[str, np.ndarray], large: set[str]):
        self._loaded, self._small, self._large = loaded, small, large

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._small:
            return self._small[name]
        if name in self._large:
            sources = self._loaded.source_tensors()
            direct = sources.array(name) if isinstance(sources, storage.FileTensors) else None
            return direct if direct is not None else storage.tensor_array(sources[name], self._loaded.path)
        raise KeyError(name)

    def __contains__(self, name) -> bool:
        return name in self._small or name in self._large

    def __iter__(self):
        yield from self._small
        yield from self._large

    def __len__(self) -> int:
        return len(self._small) + len(self._large)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise LeanOnnxError(f"{path}: no such file")
    if os.path.isdir(path):
        raise LeanOnnxError(f"{path}: is a directory, not an ONNX file")
    if not os.path.isfile(path):
        raise LeanOnnxError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise LeanOnnxError(f"{path}: empty file, not an ONNX model")


def read_model(path: str) -> onnx.ModelProto:
    """Read an ONNX file; every failure is one LeanOnnxError line naming the file. External data is read
    only after every location was checked (storage.check_external_locations)."""
    _check_file(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError (random bytes, truncated files, nesting bombs), OSError
        text = _first_line(exc)
        hint = "; nested deeper than protobuf allows" if "MaxDepth" in text or "recursion" in text.lower() else ""
        raise LeanOnnxError(f"{path}: not a readable ONNX model ({text}{hint})") from None
    if not model.graph.node:
        raise LeanOnnxError(f"{path}: not an ONNX model (no graph nodes; is this really a .onnx file?)")
    if storage.uses_external_data(model):
        storage.check_external_locations(model, path)
        try:
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as exc:
            raise LeanOnnxError(f"{path}: cannot read its external data ({_first_line(exc)})") from None
    return model


def read_skeleton(path: str) -> tuple[onnx.ModelProto, Mapping, onnx.ModelProto | None]:
    """(the model with large float initializers as stubs, their data source, the full model when it had to
    be read after all). External data locations are checked before anything is read from them."""
    _check_file(path)
    try:
        skeleton, offsets = storage.scan_model_file(path)
    except LeanOnnxError:
        raise
    except Exception:  # not a protobuf this scanner follows: onnx.load says what is wrong, or reads it
        original = read_model(path)
        storage.check_strings(original, path)
        return _copy_with_stubs(original), storage.source_tensors(original), original
    storage.check_strings(skeleton, path)
    if not skeleton.graph.node:
        raise LeanOnnxError(f"{path}: not an ONNX model (no graph nodes; is this really a .onnx file?)")
    external: dict[str, onnx.TensorProto] = {}
    if storage.uses_external_data(skeleton, offsets):
        storage.check_external_locations(skeleton, path, offsets)
        folder = os.path.dirname(os.path.abspath(path))
        for k, t in enumerate(skeleton.graph.initializer):
            if t.data_location == onnx.TensorProto.EXTERNAL and t.name not in offsets and storage.is_large(t):
                external[t.name] = onnx.TensorProto()
                external[t.name].CopyFrom(t)
                skeleton.graph.initializer[k].CopyFrom(storage.stub(t))
        try:
            for _, t in storage.all_tensors(skeleton):
                if t.data_location == onnx.TensorProto.EXTERNAL and t.name not in offsets and t.name not in external:
                    t.CopyFrom(storage.load_external_tensor(t, folder))
        except Exception as exc:
            raise LeanOnnxError(f"{path}: cannot read its external data ({_first_line(exc)})") from None
    constants = storage.source_tensors(skeleton)
    stubs = {t.name: t for t in skeleton.graph.initializer if t.name in offsets}
    tensors = storage.FileTensors(path, offsets, external, constants, storage.file_id(path), stubs)
    return skeleton, tensors, None


def refuse_quantized(model: onnx.ModelProto, path: str) -> None:
    """Quantized models (QDQ pairs, QLinearConv, ConvInteger, ...) are refused with exit 2: LEAN's norms and
    the contract are defined on float weights."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    while nodes:
        node = nodes.pop(0)
        if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            raise LeanOnnxError(
                f"{path}: node {storage.node_label(node)!r} ({node.op_type}): this is a quantized model; lean-onnx "
                "prunes float models: prune the float model first, then quantize the pruned one")
        for sub in storage.subgraphs(node):
            nodes.extend(sub.node)


def check_model(model: onnx.ModelProto, path: str, on_disk: bool = True, tensors: Mapping | None = None) -> None:
    """onnx.checker on the file (C++, no re-serialisation), else on the normalised (sorted) copy, whose
    large weights are stubs: storage.checker_view makes them typed inputs, and each one is then read
    once to see that its data fits its type and dims."""
    if on_disk:  # full: strict shape inference too, as the pruned model will get (prune._check)
        try:
            onnx.checker.check_model(path, full_check=True)
            return
        except Exception:
            pass  # e.g. unsorted nodes, which the copy has fixed
    try:
        onnx.checker.check_model(storage.checker_view(model), full_check=True)
        for t in model.graph.initializer:
            if storage.is_stub(t) and tensors is not None:
                onnx.checker.check_tensor(tensors[t.name])
                storage.tensor_array(tensors[t.name], path)
    except LeanOnnxError:
        raise
    except Exception as exc:
        raise LeanOnnxError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None


def structural_copy(original: onnx.ModelProto, path: str = "<model>", stub_large: bool = False
                    ) -> onnx.ModelProto:
    """A copy with exporter leftovers normalised, valid for any input shape: local functions are inlined,
    Constant nodes become initializers, nodes are sorted, small constant arithmetic is folded,
    Identity(initializer) is bypassed. The rewrite starts from this copy (so the pruned model keeps dynamic
    dims, IR version and opsets). `stub_large`: large float tensors are stubs (storage.py), no weights are
    copied; `storage.fill_stubs` puts them back."""
    model = _copy_with_stubs(original) if stub_large else copy.deepcopy(original)
    if model.functions:
        model = _inline_functions(model, path)
    _unique_node_names(model.graph)
    _constants_to_initializers(model.graph)
    _toposort(model.graph, path)
    _fold_constant_arithmetic(model, fold_shapes=False)
    _bypass_identity_of_initializers(model.graph)
    return model


def _copy_with_stubs(original: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto()
    storage.copy_fields(original, model, ("graph",))
    storage.copy_fields(original.graph, model.graph, ("initializer", "node"))
    for t in original.graph.initializer:
        model.graph.initializer.append(storage.stub(t) if storage.is_large(t) else t)
    for node in original.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None) \
            if node.op_type == "Constant" and len(node.output) == 1 else None
        if value is not None and storage.is_large(value):
            model.graph.initializer.append(storage.stub(value, node.output[0]))
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


def load_model(source: str | onnx.ModelProto, input_shapes: dict[str | None, tuple[int, ...]] | None = None,
               ) -> LoadedModel:
    """Read (a path) or take (a ModelProto), check and normalise into a LoadedModel (module docstring)."""
    on_disk = not isinstance(source, onnx.ModelProto)
    path = source if on_disk else (source.graph.name or "<model>")
    file_id = storage.file_id(path) if on_disk else None
    if on_disk:
        skeleton, tensors, original = read_skeleton(path)
    else:
        storage.check_strings(source, path)
        original, skeleton, tensors = source, _copy_with_stubs(source), storage.source_tensors(source)
    refuse_quantized(skeleton, path)
    model = structural_copy(skeleton, path, stub_large=True)
    duplicates = _unique_node_names(onnx.GraphProto(node=skeleton.graph.node))
    check_model(model, path, on_disk, tensors)
    used, assumed, warnings = _fix_input_shapes(model.graph, input_shapes or {}, path)
    if duplicates:
        warnings.append(f"{path}: node names used more than once ({', '.join(map(repr, duplicates[:5]))}): made "
                        "unique in the pruned model with a __2, __3... suffix (ONNX Runtime refuses duplicates)")
    model = _infer(model, path)
    shape_reads = _fold_constant_arithmetic(model, fold_shapes=True)
    _bypass_identity_of_initializers(model.graph)
    if shape_reads:
        model = _infer(model, path)
    loaded = LoadedModel(path, model, used, assumed, warnings, skeleton=skeleton, _original=original,
                         _tensors=tensors, _file_id=file_id)
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
                or any(i not in values or storage.is_stub(values[i]) for i in inputs)
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
        if any(True for _ in storage.subgraphs(node)):
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
    for sub in storage.subgraphs(node):
        for inner in sub.node:
            names.extend(all_inputs(inner))
        names.extend(o.name for o in sub.output)  # a body output may be an outer-scope name itself
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
    small, large = {}, set()
    for t in graph.initializer:
        if storage.is_stub(t):
            large.add(t.name)
        else:
            small[t.name] = storage.tensor_array(t, loaded.path)
            if small[t.name].dtype.kind == "f" and np.isnan(small[t.name]).any():
                raise LeanOnnxError(f"{loaded.path}: initializer {t.name!r} has NaN values: not a usable model")
        loaded.shapes[t.name] = tuple(int(d) for d in t.dims)
    loaded.initializers = TensorArrays(loaded, small, large)
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.name in loaded.initializers:
            continue
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            loaded.shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim
            )
    for node in graph.node:
        for out in node.output:
            loaded.producer[out] = node
        for inp in node.input:
            if inp:
                loaded.consumers.setdefault(inp, []).append(node)
