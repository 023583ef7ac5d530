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
  LEAN_ONNX_EXTERNAL_DATA_BYTES environment variable) is written with external data (`write_external`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import LeanOnnxError

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


# -- writing external data -----------------------------------------------------------------------

#: tensors of at least this many bytes go to the external data file (onnx's own default threshold)
EXTERNAL_MIN_BYTES = 1024
_ALIGN = 4096


def write_external(model: onnx.ModelProto, model_path: str, data_name: str) -> None:
    """Write `model` as `model_path` (the graph) plus `data_name` beside it (tensors of >= 1 KiB), one
    tensor at a time, without changing `model` or holding a second copy of its weights."""
    folder = os.path.dirname(model_path)
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, ("graph",))
    copy_fields(model.graph, skeleton.graph, ("initializer",))
    with open(os.path.join(folder, data_name), "wb") as data:
        for t in model.graph.initializer:
            if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED) or not _big_enough(t):
                skeleton.graph.initializer.append(t)
                continue
            raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
            offset = -(-data.tell() // _ALIGN) * _ALIGN
            data.seek(offset)
            data.write(raw)
            ext = TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, doc_string=t.doc_string)
            ext.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                ext.external_data.add(key=key, value=value)
            skeleton.graph.initializer.append(ext)
            del raw
        data.flush()
        os.fsync(data.fileno())
    with open(model_path, "wb") as f:
        f.write(skeleton.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def _big_enough(t: TensorProto) -> bool:
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize >= EXTERNAL_MIN_BYTES


def external_locations(path: str, limit_bytes: int = 64 << 20) -> set[str]:
    """The external data locations an existing (small, graph-only) ONNX file refers to; empty when the
    file is large (it then holds its weights itself), unreadable or not a model."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > limit_bytes:
            return set()
        model = onnx.load(path, load_external_data=False)
    except Exception:
        return set()
    return {e.value for _, t in all_tensors(model) if t.data_location == TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


# -- reading an ONNX file without its large tensors ----------------------------------------------

_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
#: TensorProto fields that hold data: float, int32, string, int64, raw, double, uint64
_PAYLOAD_FIELDS = {4, 5, 6, 7, 9, 10, 11}


def _read_varint(f) -> int:
    value, shift = 0, 0
    while True:
        byte = f.read(1)
        if not byte:
            raise ValueError("truncated varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _skip_value(f, wire_type: int, end: int) -> None:
    """Move past the value of a field whose tag was just read."""
    if wire_type == 0:
        _read_varint(f)
    elif wire_type in (1, 5):
        f.seek(8 if wire_type == 1 else 4, os.SEEK_CUR)
    elif wire_type == 2:
        f.seek(_read_varint(f), os.SEEK_CUR)
    else:
        raise ValueError(f"unsupported wire type {wire_type}")
    if f.tell() > end:
        raise ValueError("field runs past its message")


def _fields(f, end: int):
    """(field number, wire type, start of the field's tag) of each field up to `end`; leaves `f` after the tag."""
    while f.tell() < end:
        start = f.tell()
        tag = _read_varint(f)
        yield tag >> 3, tag & 7, start


def _raw_field(f, start: int, wire_type: int, end: int) -> bytes:
    _skip_value(f, wire_type, end)
    stop = f.tell()
    f.seek(start)
    return f.read(stop - start)


def scan_model_file(path: str) -> tuple[onnx.ModelProto, dict[str, tuple[int, int, int]]]:
    """Parse an ONNX file with its large float initializers left on disk: returns the model with those
    initializers as stubs, and {name: (offset, length, raw data offset or -1)} of each one's TensorProto
    in the file. The graph
    is re-assembled from the file's bytes, so everything else is exactly what onnx.load would give."""
    large: dict[str, tuple[int, int, int]] = {}
    top, graph = bytearray(), bytearray()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for field, wire_type, start in _fields(f, size):
            if field != _MODEL_GRAPH or wire_type != 2:
                top += _raw_field(f, start, wire_type, size)
                continue
            length = _read_varint(f)
            graph_end = f.tell() + length
            if graph_end > size:
                raise ValueError("graph runs past the end of the file")
            for gfield, gwire, gstart in _fields(f, graph_end):
                if gfield != _GRAPH_INITIALIZER or gwire != 2:
                    graph += _raw_field(f, gstart, gwire, graph_end)
                    continue
                length = _read_varint(f)
                body = f.tell()
                header, raw_length = bytearray(), None
                for tfield, twire, tstart in _fields(f, body + length):
                    if tfield in _PAYLOAD_FIELDS:
                        if tfield == 9 and twire == 2:  # raw_data: its length is checked below
                            raw_length = _read_varint(f)
                            raw_start = f.tell()
                            f.seek(raw_length, os.SEEK_CUR)
                        else:
                            _skip_value(f, twire, body + length)
                    else:
                        header += _raw_field(f, tstart, twire, body + length)
                head = TensorProto.FromString(bytes(header))
                if is_large(head) and head.data_location != TensorProto.EXTERNAL:
                    expected = int(np.prod(head.dims, dtype=np.int64)) * np.dtype(
                        helper.tensor_dtype_to_np_dtype(head.data_type)).itemsize
                    if raw_length is not None and raw_length != expected:
                        raise LeanOnnxError(f"{path}: initializer {head.name!r}: {raw_length} bytes of data for "
                                            f"dims {list(head.dims)} ({expected} bytes)")
                    large[head.name] = (body, length, raw_start if raw_length is not None else -1)
                    encoded = stub(head).SerializeToString()
                else:
                    f.seek(body)
                    encoded = f.read(length)
                f.seek(body + length)
                graph += _varint_bytes((_GRAPH_INITIALIZER << 3) | 2) + _varint_bytes(len(encoded)) + encoded
            if f.tell() != graph_end:
                raise ValueError("graph runs past the end of the file")
    skeleton = bytes(top) + _varint_bytes((_MODEL_GRAPH << 3) | 2) + _varint_bytes(len(graph)) + bytes(graph)
    return onnx.ModelProto.FromString(skeleton), large


class FileTensors(Mapping):
    """The original data of stub tensors: read from the model file (or its external data files) one at a
    time, on each access; refuses to read when the file changed since it was scanned."""

    def __init__(self, path: str, offsets: dict[str, tuple[int, int, int]], external: dict[str, TensorProto],
                 constants: dict[str, TensorProto], file_id: tuple | None, stubs: dict[str, TensorProto]):
        self.path, self.offsets, self.external, self.constants = path, offsets, external, constants
        self.file_id, self.stubs = file_id, stubs

    def _unchanged(self) -> None:
        if file_id(self.path) != self.file_id:
            raise LeanOnnxError(f"{self.path}: the file changed on disk while lean-onnx was reading it; "
                                "nothing was written (run again)")

    def __getitem__(self, name: str) -> TensorProto:
        if name in self.offsets:
            self._unchanged()
            offset, length, _ = self.offsets[name]
            with open(self.path, "rb") as f:
                f.seek(offset)
                return TensorProto.FromString(f.read(length))
        if name in self.external:
            return load_external_tensor(self.external[name], os.path.dirname(os.path.abspath(self.path)))
        return self.constants[name]

    def array(self, name: str) -> np.ndarray | None:
        """The data of a stub stored as raw_data in the model file, read straight into one array (None when
        it is stored otherwise)."""
        if name not in self.offsets or self.offsets[name][2] < 0:
            return None
        self._unchanged()
        head = self.stubs[name]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(head.data_type)).newbyteorder("<")
        count = int(np.prod(head.dims, dtype=np.int64))
        with open(self.path, "rb") as f:
            f.seek(self.offsets[name][2])
            data = np.fromfile(f, dtype=dtype, count=count)
        if data.size != count:
            raise LeanOnnxError(f"{self.path}: initializer {name!r}: the file ends inside its data")
        return data.astype(dtype.newbyteorder("="), copy=False).reshape(tuple(head.dims))

    def __contains__(self, name) -> bool:
        return name in self.offsets or name in self.external or name in self.constants

    def __iter__(self):
        yield from self.offsets
        yield from self.external
        yield from self.constants

    def __len__(self) -> int:
        return len(self.offsets) + len(self.external) + len(self.constants)


def load_external_tensor(t: TensorProto, folder: str) -> TensorProto:
    """A copy of an external tensor with its data read in (locations were checked on load)."""
    from onnx.external_data_helper import load_external_data_for_tensor

    copy = TensorProto()
    copy.CopyFrom(t)
    load_external_data_for_tensor(copy, folder)
    copy.data_location = TensorProto.DEFAULT
    del copy.external_data[:]
    return copy


def file_id(path: str) -> tuple | None:
    """(device, inode, size, mtime) of a file: a re-read is refused when it changed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def write_streamed(model: onnx.ModelProto, f) -> None:
    """Write `model` to the binary file `f` as one ModelProto, its initializers serialised one at a time
    (no second copy of the weights in memory). The bytes parse to the same model as SerializeToString's;
    only the order of fields differs (initializers last in the graph)."""
    top = onnx.ModelProto()
    copy_fields(model, top, ("graph",))
    graph = onnx.GraphProto()
    copy_fields(model.graph, graph, ("initializer",))
    graph_bytes = graph.SerializeToString()
    sizes = [t.ByteSize() for t in model.graph.initializer]
    tag = _varint_bytes((_GRAPH_INITIALIZER << 3) | 2)
    graph_length = len(graph_bytes) + sum(len(tag) + len(_varint_bytes(s)) + s for s in sizes)
    f.write(top.SerializeToString())
    f.write(_varint_bytes((_MODEL_GRAPH << 3) | 2) + _varint_bytes(graph_length) + graph_bytes)
    for t, size in zip(model.graph.initializer, sizes):
        data = t.SerializeToString()
        if len(data) != size:
            raise RuntimeError(f"initializer {t.name!r} changed while it was written")
        f.write(tag + _varint_bytes(size))
        f.write(data)
        del data
