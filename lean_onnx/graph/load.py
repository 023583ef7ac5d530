"""Load an ONNX model, check it, and normalise what exporters leave behind.

The result is an *analysis copy* (normalise.py: functions inlined, weights from Constant nodes become
initializers, Identity nodes in front of initializers are bypassed, nodes are topologically sorted),
with symbolic input dims fixed (`--input-shape` or a documented default) and shapes inferred. The file
on disk is never touched, and its large weights are read only when needed (io/external_data.py, io/ondisk.py).
Hostile files get one LeanOnnxError line: unreadable protobuf, external data outside the model's
folder, quantized models, names that are not UTF-8, tensors whose data does not fit their dims.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import shape_inference

from ..errors import LeanOnnxError, first_line
from ..io import external_data, ondisk
from .normalise import (
    FOLD_MAX_ELEMENTS,
    _bypass_identity_of_initializers,
    _copy_with_stubs,
    _fold_constant_arithmetic,
    _unique_node_names,
    structural_copy,
)

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

    Large float weights are read from the file only when needed (io/external_data.py): `skeleton` is the original
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
    elem_types: dict[str, int] = field(default_factory=dict)  # tensor -> onnx.TensorProto data type
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
            if ondisk.file_id(self.path) != self._file_id:
                raise LeanOnnxError(f"{self.path}: the file changed on disk while lean-onnx was using it; nothing "
                                    "was written (run again)")
            self._original = read_model(self.path)
        return self._original

    def source_tensors(self) -> Mapping:
        """Name -> the original TensorProto of each stub (read from the file on access)."""
        return self._tensors

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        return self.shapes.get(name)

    def elem_type(self, name: str) -> int:
        """The data type of tensor `name` where shape inference gave it, else FLOAT."""
        return self.elem_types.get(name) or onnx.TensorProto.FLOAT


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
            direct = sources.array(name) if isinstance(sources, ondisk.FileTensors) else None
            return direct if direct is not None else external_data.tensor_array(sources[name], self._loaded.path)
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
    only after every location was checked (external_data.check_external_locations)."""
    _check_file(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError (random bytes, truncated files, nesting bombs), OSError
        text = _first_line(exc)
        hint = "; nested deeper than protobuf allows" if "MaxDepth" in text or "recursion" in text.lower() else ""
        raise LeanOnnxError(f"{path}: not a readable ONNX model ({text}{hint})") from None
    if not model.graph.node:
        raise LeanOnnxError(f"{path}: not an ONNX model (no graph nodes; is this really a .onnx file?)")
    if external_data.uses_external_data(model):
        external_data.check_external_locations(model, path)
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
        skeleton, offsets = ondisk.scan_model_file(path)
    except LeanOnnxError:
        raise
    except Exception:  # not a protobuf this scanner follows: onnx.load says what is wrong, or reads it
        original = read_model(path)
        external_data.check_strings(original, path)
        return _copy_with_stubs(original), external_data.source_tensors(original), original
    external_data.check_strings(skeleton, path)
    if not skeleton.graph.node:
        raise LeanOnnxError(f"{path}: not an ONNX model (no graph nodes; is this really a .onnx file?)")
    external: dict[str, onnx.TensorProto] = {}
    if external_data.uses_external_data(skeleton, offsets):
        external_data.check_external_locations(skeleton, path, offsets)
        folder = os.path.dirname(os.path.abspath(path))
        for k, t in enumerate(skeleton.graph.initializer):
            if t.data_location == onnx.TensorProto.EXTERNAL and t.name not in offsets and external_data.is_large(t):
                external[t.name] = onnx.TensorProto()
                external[t.name].CopyFrom(t)
                skeleton.graph.initializer[k].CopyFrom(external_data.stub(t))
        try:
            for _, t in external_data.all_tensors(skeleton):
                if t.data_location == onnx.TensorProto.EXTERNAL and t.name not in offsets and t.name not in external:
                    t.CopyFrom(ondisk.load_external_tensor(t, folder))
        except Exception as exc:
            raise LeanOnnxError(f"{path}: cannot read its external data ({_first_line(exc)})") from None
    constants = external_data.source_tensors(skeleton)
    stubs = {t.name: t for t in skeleton.graph.initializer if t.name in offsets}
    tensors = ondisk.FileTensors(path, offsets, external, constants, ondisk.file_id(path), stubs)
    return skeleton, tensors, None


def refuse_quantized(model: onnx.ModelProto, path: str) -> None:
    """Quantized models (QDQ pairs, QLinearConv, ConvInteger, ...) are refused with exit 2: LEAN's norms and
    the contract are defined on float weights."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    while nodes:
        node = nodes.pop(0)
        if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            raise LeanOnnxError(
                f"{path}: node {external_data.node_label(node)!r} ({node.op_type}): this is a quantized model; lean-onnx "
                "prunes float models: prune the float model first, then quantize the pruned one")
        for sub in external_data.subgraphs(node):
            nodes.extend(sub.node)


def check_model(model: onnx.ModelProto, path: str, on_disk: bool = True, tensors: Mapping | None = None) -> None:
    """onnx.checker on the file (C++, no re-serialisation), else on the normalised (sorted) copy, whose
    large weights are stubs: external_data.checker_view makes them typed inputs, and each one is then read
    once to see that its data fits its type and dims."""
    if on_disk:  # full: strict shape inference too, as the pruned model will get (prune._check)
        try:
            onnx.checker.check_model(path, full_check=True)
            return
        except Exception:
            pass  # e.g. unsorted nodes, which the copy has fixed
    try:
        onnx.checker.check_model(external_data.checker_view(model), full_check=True)
        for t in model.graph.initializer:
            if external_data.is_stub(t) and tensors is not None:
                onnx.checker.check_tensor(tensors[t.name])
                external_data.tensor_array(tensors[t.name], path)
    except LeanOnnxError:
        raise
    except Exception as exc:
        raise LeanOnnxError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None


def load_model(source: str | onnx.ModelProto, input_shapes: dict[str | None, tuple[int, ...]] | None = None,
               ) -> LoadedModel:
    """Read (a path) or take (a ModelProto), check and normalise into a LoadedModel (module docstring)."""
    on_disk = not isinstance(source, onnx.ModelProto)
    path = source if on_disk else (source.graph.name or "<model>")
    file_id = ondisk.file_id(path) if on_disk else None
    if on_disk:
        skeleton, tensors, original = read_skeleton(path)
    else:
        external_data.check_strings(source, path)
        original, skeleton, tensors = source, _copy_with_stubs(source), external_data.source_tensors(source)
    refuse_quantized(skeleton, path)
    model = structural_copy(skeleton, path, stub_large=True)
    duplicates = _unique_node_names(onnx.GraphProto(node=skeleton.graph.node))
    check_model(model, path, on_disk, tensors)
    used, assumed, warnings = _fix_input_shapes(model.graph, input_shapes or {}, path)
    if duplicates:
        warnings.append(f"{path}: node names used more than once ({', '.join(map(repr, duplicates[:5]))}): made "
                        "unique in the pruned model with a __2, __3... suffix (ONNX Runtime refuses duplicates)")
    model = _infer(model, path)
    shape_reads: dict[str, str] = {}
    for _ in range(FOLD_PASSES):  # a folded Shape can make the next one static (torch's chunk in every block)
        folded = _fold_constant_arithmetic(model, fold_shapes=True)
        _bypass_identity_of_initializers(model.graph)
        if not folded:
            break
        shape_reads.update(folded)
        model = _infer(model, path)
    loaded = LoadedModel(path, model, used, assumed, warnings, skeleton=skeleton, _original=original,
                         _tensors=tensors, _file_id=file_id)
    loaded.shape_reads = shape_reads
    _index(loaded)
    return loaded


#: rounds of shape inference and Shape folding at most (each round makes the shapes after one more
#: Shape-computed Slice/Reshape static)
FOLD_PASSES = 32


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


_first_line = first_line


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
        if external_data.is_stub(t):
            large.add(t.name)
        else:
            small[t.name] = external_data.tensor_array(t, loaded.path)
            if small[t.name].dtype.kind == "f" and np.isnan(small[t.name]).any():
                raise LeanOnnxError(f"{loaded.path}: initializer {t.name!r} has NaN values: not a usable model")
        loaded.shapes[t.name] = tuple(int(d) for d in t.dims)
    loaded.initializers = TensorArrays(loaded, small, large)
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.name in loaded.initializers:
            continue
        if vi.type.HasField("tensor_type"):
            loaded.elem_types[vi.name] = vi.type.tensor_type.elem_type
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
