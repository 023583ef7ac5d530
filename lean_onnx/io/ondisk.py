"""Model files read and written without a second copy of the weights in memory.

* `scan_model_file` parses an ONNX file with its large float initializers left on disk (stubs, see
  io/external_data.py) by walking the protobuf wire format; `FileTensors` reads each one back when needed.
* `write_streamed` writes a ModelProto one initializer at a time; `write_external` writes the graph and an
  external data file; `external_locations` lists the data files an existing (small) ONNX file uses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import LeanOnnxError
from .external_data import all_tensors, copy_fields, is_large, stub

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
