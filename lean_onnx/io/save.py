"""Writing models and reports atomically (temporary file + rename), with external data above 2 GiB."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile

import onnx

from ..errors import LeanOnnxError
from . import ondisk
from .external_data import data_bytes, external_data_threshold
from .ondisk import write_streamed

#: a pruned model with more data than this is serialised through a temporary file (ondisk.write_streamed),
#: so its proto and its bytes are never both in memory (upb's SerializeToString holds the proto, a growing
#: buffer and the result: three copies); `PruneResult.model` is then parsed from the bytes on first use
STREAM_BYTES = 128 << 20


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model_atomic(model: onnx.ModelProto | bytes, path: str) -> None:
    """Write a model (or any bytes: the JSON report) atomically: temporary files in the target folder, then
    rename, so a reader never sees half a file and an existing file is replaced only by a complete one.

    A model whose data exceeds `external_data.external_data_threshold()` (protobuf's 2 GiB limit) is written with
    its tensors in `OUT.<random hex>.data` beside OUT (a unique name: a reader of the old OUT keeps its own
    data file): both are written into a temporary folder beside OUT, pass onnx.checker (full, by path),
    then the data file is renamed first and the model last. The data file of an OUT written like that
    before is removed only after OUT was replaced."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise LeanOnnxError(f"{path}: output folder does not exist")
    if os.path.isdir(path):
        raise LeanOnnxError(f"{path}: is a directory")
    base = os.path.basename(path)
    ours = re.compile(re.escape(base) + r"\.[0-9a-f]{16}\.data")
    old_data = {loc for loc in ondisk.external_locations(path) if ours.fullmatch(loc)}
    try:
        if isinstance(model, onnx.ModelProto) and data_bytes(model) > external_data_threshold():
            new_data = _save_external(model, path, folder, f"{base}.{secrets.token_hex(8)}.data")
        else:
            _save_single(model, path, folder)
            new_data = None
    except OSError as exc:
        raise LeanOnnxError(f"{path}: cannot write ({exc.strerror or exc})") from None
    for loc in old_data - {new_data}:
        try:
            os.unlink(os.path.join(folder, loc))
        except OSError:
            pass


def _save_single(model: onnx.ModelProto | bytes, path: str, folder: str) -> None:
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if not isinstance(model, onnx.ModelProto):
                f.write(model)
            elif data_bytes(model) > STREAM_BYTES:
                write_streamed(model, f)  # no second copy of the weights as bytes
            else:
                f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _save_external(model: onnx.ModelProto, path: str, folder: str, data_name: str) -> str:
    tmpdir = tempfile.mkdtemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    renamed = None
    try:
        tmp_model = os.path.join(tmpdir, "model.onnx")
        ondisk.write_external(model, tmp_model, data_name)
        try:
            onnx.checker.check_model(tmp_model, full_check=True)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise LeanOnnxError(f"{path}: internal: the model written with external data fails onnx.checker "
                                f"({first}); nothing was written (please report)") from None
        renamed = os.path.join(folder, data_name)
        os.replace(os.path.join(tmpdir, data_name), renamed)
        os.replace(tmp_model, path)
        renamed = None
        return data_name
    finally:
        if renamed is not None and os.path.exists(renamed):  # the model did not follow its data
            os.unlink(renamed)
        shutil.rmtree(tmpdir, ignore_errors=True)
