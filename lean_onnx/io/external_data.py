"""Where a model's weights live, and how they are read and written safely.

* External data of an input is checked before a byte of it is read: every location must be a relative
  path to a regular file inside the model's folder (after resolving `..` and symlinks) and the tensor must
  lie inside that file.
* Large float tensors are *stubs* in the analysis and rewrite copies (name, type and dims, no data): the
  weights stay in the original ModelProto once, and the rewrite fills the stubs it did not change from
  there (`fill_stubs`). A stub looks like an external tensor at STUB_LOCATION, so anything that reads one
  by mistake fails loudly instead of reading zeros.
* `checker_view` is what onnx.checker sees of a large model: large initializers become typed graph
  inputs, so checking a 500 MB model does not copy 500 MB twice (the checker serialises its argument).
* A model whose data exceeds `external_data_threshold()` (just under protobuf's 2 GiB limit, or the
  LEAN_ONNX_EXTERNAL_DATA_BYTES environment variable) is written with external data (ondisk.py).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import LeanOnnxError

#: float tensors with more elements than this are "large": stubs in the working copies, not cached as arrays
LARGE_ELEMENTS = 1 << 16
STUB_LOCATION = "lean-onnx-stub:data-in-the-original-model"
EXTERNAL_DATA_ENV = "LEAN_ONNX_EXTERNAL_DATA_BYTES"
#: protobuf refuses to serialise 2 GiB or more; 64 MiB are left for the graph itself
DEFAULT_EXTERNAL_DATA_BYTES = 2**31 - 2**26
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def external_data_threshold() -> int:
    value = os.environ.get(EXTERNAL_DATA_ENV, "")
    try:
        return int(value) if value else DEFAULT_EXTERNAL_DATA_BYTES
    except ValueError:
        raise LeanOnnxError(f"{EXTERNAL_DATA_ENV}={value!r}: expected a number of bytes") from None


# -- walking tensors -----------------------------------------------------------------------------

def subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def node_label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def all_tensors(model: onnx.ModelProto):
    """(where, TensorProto) for every tensor of a model: initializers, sparse initializers and tensors in
    node attributes, in the main graph, its subgraphs (If/Loop/Scan) and local functions."""

    def in_nodes(nodes, where):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield f"node {node_label(node)!r}", attr.t
                for t in attr.tensors:
                    yield f"node {node_label(node)!r}", t
            for sub in subgraphs(node):
                yield from in_graph(sub, f"{where}/{node.name or node.op_type}")

    def in_graph(graph, where):
        for t in graph.initializer:
            yield f"initializer {t.name!r}", t
        for s in graph.sparse_initializer:
            yield f"sparse initializer {s.values.name!r}", s.values
            yield f"sparse initializer {s.values.name!r}", s.indices
        yield from in_nodes(graph.node, where)

    yield from in_graph(model.graph, "graph")
    for f in model.functions:
        yield from in_nodes(f.node, f"function {f.name}")


def _external(model: onnx.ModelProto, own_stubs=()):
    """External tensors of a model, except the stubs named in `own_stubs` (made by scan_model_file)."""
    for where, t in all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL and not (t.name in own_stubs and is_stub(t)):
            yield where, t


def uses_external_data(model: onnx.ModelProto, own_stubs=()) -> bool:
    return any(True for _ in _external(model, own_stubs))


def check_external_locations(model: onnx.ModelProto, path: str, own_stubs=()) -> None:
    """Refuse external data outside the model's folder (`../`, absolute paths, symlinks leading out),
    missing files, and offsets/lengths beyond the file, before anything is read from there."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for where, t in _external(model, own_stubs):
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        prefix = f"{path}: {where}: external data location {location!r}"
        if not location or "\0" in location:
            raise LeanOnnxError(f"{prefix}: missing or invalid")
        if os.path.isabs(location) or location.startswith(("\\", "/")) or (len(location) > 1 and location[1] == ":"):
            raise LeanOnnxError(f"{prefix} is an absolute path; external data must lie in the model's folder "
                                "(refused, nothing was read from it)")
        joined = os.path.join(folder, location)
        target = os.path.realpath(joined)
        if os.path.commonpath([folder, target]) != folder:
            raise LeanOnnxError(f"{prefix} points outside the model's folder {folder} (refused, nothing was read "
                                "from it)")
        if os.path.islink(joined):
            raise LeanOnnxError(f"{prefix} is a symbolic link (refused, nothing was read from it)")
        if not os.path.isfile(target):
            raise LeanOnnxError(f"{prefix}: no such file beside the model")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise LeanOnnxError(f"{prefix}: offset/length are not integers") from None
        size = os.path.getsize(target)
        if offset < 0 or offset > size or (length >= 0 and offset + length > size):
            raise LeanOnnxError(f"{prefix}: offset {offset} / length {length} lie outside the {size}-byte file")


# -- stubs ---------------------------------------------------------------------------------------

def tensor_array(t: TensorProto, path: str) -> np.ndarray:
    """numpy_helper.to_array, with a tensor whose data does not fit its type and dims (which onnx.checker
    lets through when there is too much of it) refused as one line naming the tensor."""
    try:
        return onnx.numpy_helper.to_array(t)
    except (ValueError, TypeError) as exc:
        raise LeanOnnxError(f"{path}: tensor {t.name!r}: its data does not fit its type and dims "
                            f"{list(t.dims)} ({str(exc).splitlines()[0][:200]})") from None


def is_large(t: TensorProto) -> bool:
    return t.data_type in FLOAT_TYPES and int(np.prod(t.dims, dtype=np.int64)) > LARGE_ELEMENTS


def stub(t: TensorProto, name: str | None = None) -> TensorProto:
    s = TensorProto(name=t.name if name is None else name, data_type=t.data_type, dims=t.dims)
    s.data_location = TensorProto.EXTERNAL
    s.external_data.add(key="location", value=STUB_LOCATION)
    return s


def is_stub(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == STUB_LOCATION for e in t.external_data)


def source_tensors(original: onnx.ModelProto) -> dict[str, TensorProto]:
    """Name -> the original's TensorProto (no copy): initializers and tensor-valued Constant nodes."""
    sources = {t.name: t for t in original.graph.initializer}
    for node in original.graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    sources.setdefault(node.output[0], attr.t)
    return sources


def fill_stubs(model: onnx.ModelProto, sources: dict[str, TensorProto]) -> None:
    """Replace every stub initializer of `model` by the data of the tensor of the same name in `sources`."""
    for t in model.graph.initializer:
        if is_stub(t):
            name = t.name
            t.CopyFrom(sources[name])
            t.name = name


# -- copies without the weights --------------------------------------------------------------------

def copy_fields(src, dst, skip: tuple[str, ...] = ()) -> None:
    """Copy every set field of protobuf message `src` into `dst`, except those named in `skip`."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def check_strings(message, path: str) -> None:
    """Every string field of a message (recursively) must be UTF-8. protobuf parses proto2 strings without
    checking and then fails on access (or returns bytes), anywhere later: this refuses the model here."""
    try:
        if isinstance(message, TensorProto):  # not ListFields: it would copy raw_data
            message = TensorProto(name=message.name, doc_string=message.doc_string,
                                  external_data=message.external_data)
        fields = message.ListFields()
    except (UnicodeDecodeError, TypeError) as exc:
        raise LeanOnnxError(f"{path}: not a valid ONNX model (a name or string is not UTF-8: {exc})") from None
    for fd, value in fields:
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        items = value if repeated else [value]
        if fd.type == fd.TYPE_STRING and not all(isinstance(v, str) for v in items):
            raise LeanOnnxError(f"{path}: not a valid ONNX model ({message.DESCRIPTOR.name}.{fd.name} is not UTF-8)")
        if fd.message_type is not None:
            for item in items:
                check_strings(item, path)


def checker_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model for onnx.checker with large initializers (and stubs) turned into typed graph inputs."""
    if not any(is_large(t) or is_stub(t) for t in model.graph.initializer):
        return model
    view = onnx.ModelProto()
    copy_fields(model, view, ("graph",))
    copy_fields(model.graph, view.graph, ("initializer", "input"))
    inputs = {i.name for i in model.graph.input}
    kept_inputs = list(model.graph.input)
    for t in model.graph.initializer:
        if is_large(t) or is_stub(t):
            if t.name not in inputs:
                kept_inputs.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            view.graph.initializer.append(t)
    view.graph.input.extend(kept_inputs)
    return view


def data_bytes(model: onnx.ModelProto) -> int:
    """The bytes a model's tensors take (from their dims: no serialisation), plus its nodes' sizes."""
    total = 0
    for t in model.graph.initializer:
        if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
            total += t.ByteSize()
        else:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total + sum(n.ByteSize() for n in model.graph.node)
