"""The pruning pipeline: load -> graph -> norms -> select -> plan -> rewrite, and its report.

`Pruner` builds the graph and the norms once; `Pruner.prune(keep, method)` can then be called for
many keeps (a sweep) without repeating them. `prune(...)` is the one-shot form.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import __version__
from .analysis import compute_edge_weights, float_params, model_cost, pruned_macs
from .errors import LeanOnnxError
from .graph import ChannelGraph, build_channel_graph, check_keep
from .load import load_model, structural_copy
from . import ondisk
from .ondisk import write_streamed
from .storage import checker_view, data_bytes, external_data_threshold
from .plan import Plan, make_plan
from .rewrite import rewrite
from .selection import Selection, inputs_reach_outputs, select_kernels

SCHEMA_VERSION = 1
#: conv output channel counts stay multiples of 16 (or unchanged): measured in docs/benchmarks.md, odd
#: counts push ONNX Runtime's convs off its blocked (NCHWc, AVX-512 block 16) kernels, and a pruned
#: MobileNetV2 ran at 0.76x the original's speed; 16 also covers AVX2's 8 and TensorRT's multiples of 8
DEFAULT_ROUND_CHANNELS = 16
#: a conv that reads at most this fraction of its shared input's channels reads them through a Gather:
#: measured (tools/bench_gather.py, docs/benchmarks.md) 1.2-5x faster convs at read fractions <= 0.75
DEFAULT_GATHER_BELOW = 0.75


#: a pruned model with more data than this is serialised through a temporary file (ondisk.write_streamed),
#: so its proto and its bytes are never both in memory (upb's SerializeToString holds the proto, a growing
#: buffer and the result: three copies); `PruneResult.model` is then parsed from the bytes on first use
STREAM_BYTES = 128 << 20


@dataclass
class PruneResult:
    _model: onnx.ModelProto | None
    masked: onnx.ModelProto | None
    report: dict
    selection: Selection = field(repr=False)
    plan: Plan = field(repr=False)
    graph: ChannelGraph = field(repr=False)
    #: the serialised pruned model, as checked; the ModelProto itself when it is too large for one protobuf
    #: (save_model_atomic then writes it with external data)
    model_bytes: bytes | onnx.ModelProto = field(default=b"", repr=False)

    @property
    def model(self) -> onnx.ModelProto:
        """The pruned model (parsed from `model_bytes` on first use when it was streamed)."""
        if self._model is None:
            self._model = onnx.load_from_string(self.model_bytes)
        return self._model


class Pruner:
    """Load, build the channel graph and compute the edge weights of one model, once."""

    def __init__(self, source, *, exclude=(), input_shapes=None, norm_grid: int | None = None,
                 norms: bool = True):
        """`norms=False` stops after the graph (`inspect` needs no edge weights)."""
        self.timings: dict[str, float] = {}
        self._base_bytes: bytes | None = None
        self._bases_made = 0
        self.loaded = self._timed("load", load_model, source, input_shapes)
        self.graph: ChannelGraph = self._timed("graph", build_channel_graph, self.loaded, list(exclude), norm_grid)
        if norms:
            self._timed("norms", compute_edge_weights, self.graph)
        self.cost_before = model_cost(self.loaded)

    def _base(self) -> onnx.ModelProto:
        """A fresh structural copy of the original. The first one is made directly (a one-shot prune pays
        nothing more); from the second on, it is normalised once more, kept serialised and re-parsed,
        which is much cheaper than normalising again (constant folding is slow on models like MS-D)."""
        self._bases_made += 1
        if self._bases_made == 1:
            return structural_copy(self.loaded.skeleton, self.loaded.path, stub_large=True)
        if self._base_bytes is None:  # large weights are stubs (storage.py): these bytes are the graph only
            self._base_bytes = structural_copy(self.loaded.skeleton, self.loaded.path, stub_large=True
                                               ).SerializeToString()
        return onnx.ModelProto.FromString(self._base_bytes)

    def _timed(self, stage, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
        return value

    def prune(self, keep: float, method: str = "lean", redundancy: bool = True, masked: bool = True,
              round_channels: int = DEFAULT_ROUND_CHANNELS, fold_constants: bool = False,
              gather_below: float = DEFAULT_GATHER_BELOW, zeros_are_pruned: bool = False,
              keep_connected: bool = False) -> PruneResult:
        """Prune to `keep`; `masked=False` skips building (and checking) the masked model;
        `round_channels` N keeps conv output channel counts at multiples of N (see plan.make_plan);
        `fold_constants`: dead channels keep their constant act(bias) (the masked model keeps biases, as
        the reference's does) and constants that reach a Gemm head move into its bias; `gather_below` F: a
        conv reading at most F of its shared input's channels reads them through a Gather (0: never);
        `zeros_are_pruned`: exactly-zero kernels count as pruned already (steps of a schedule);
        `keep_connected`: add the best input-to-output chain when the selection collapsed a layer."""
        check_keep(keep)
        timings = dict(self.timings)
        start = time.perf_counter()
        selection = select_kernels(self.graph, keep, method, redundancy, zeros_are_pruned, keep_connected)
        timings["select"] = time.perf_counter() - start
        start = time.perf_counter()
        plan = make_plan(self.graph, selection, round_channels, fold_constants, gather_below)
        pruned = rewrite(self.graph, selection, plan, True, self._base())
        masked_model = rewrite(self.graph, selection, plan, False, self._base()) if masked else None
        timings["rewrite"] = time.perf_counter() - start
        start = time.perf_counter()
        _check(pruned, "pruned", self.loaded.path)
        if masked_model is not None:
            _check(masked_model, "masked", self.loaded.path)
        cost_after = {"params": float_params(pruned), "macs": pruned_macs(pruned, self.loaded)}
        timings["check"] = time.perf_counter() - start
        report = build_report(self.graph, selection, plan, pruned, self.cost_before, cost_after, timings)
        size = data_bytes(pruned)
        if size > external_data_threshold():
            pruned_bytes = pruned  # too large for one protobuf: save_model_atomic writes external data
        elif size > STREAM_BYTES:  # the file first, then the proto goes, then the bytes come back
            with tempfile.TemporaryFile() as f:
                write_streamed(pruned, f)
                pruned = None  # upb frees a message's memory only with the whole message
                f.seek(0)
                pruned_bytes = f.read()
        else:
            pruned_bytes = pruned.SerializeToString()
        return PruneResult(pruned, masked_model, report, selection, plan, self.graph, pruned_bytes)

    def slice_like(self, result: PruneResult, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`arrays` ({initializer name: array of its shape}, e.g. Adam's moments of the weights) cut the
        way `prune` cut the weights into `result.model`, by the same rewrite run on a copy whose
        initializers are these arrays; returns {name in the pruned model: array} (a copy made for one reader
        of a shared initializer, "name__node", included). Zero kernels come out
        as zeros; constants folded into a Gemm bias (--fold-constants) are left out of the arrays."""
        from dataclasses import replace

        from onnx import numpy_helper

        base = self._base()
        for tensor in base.graph.initializer:
            if tensor.name in arrays:
                value = np.asarray(arrays[tensor.name])
                if tuple(value.shape) != tuple(tensor.dims):
                    raise LeanOnnxError(f"{self.loaded.path}: {tensor.name!r}: array of shape {value.shape} "
                                        f"for an initializer of shape {tuple(tensor.dims)}")
                tensor.CopyFrom(numpy_helper.from_array(value.astype(
                    onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)), tensor.name))
        plan = replace(result.plan, heads=[replace(h, values=np.zeros_like(h.values)) for h in result.plan.heads])
        moved = rewrite(self.graph, result.selection, plan, True, base)
        names = {t.name for t in result.model.graph.initializer}
        return {t.name: numpy_helper.to_array(t) for t in moved.graph.initializer
                if t.name in names and (t.name in arrays or t.name.partition("__")[0] in arrays)}


def prune(source, keep: float, method: str = "lean", *, exclude=(), input_shapes=None,
          norm_grid: int | None = None, redundancy: bool = True,
          round_channels: int = DEFAULT_ROUND_CHANNELS, fold_constants: bool = False,
          gather_below: float = DEFAULT_GATHER_BELOW) -> PruneResult:
    """Prune an ONNX model (path or ModelProto) to `keep` of its kernels; the source is not modified."""
    return Pruner(source, exclude=exclude, input_shapes=input_shapes, norm_grid=norm_grid).prune(
        keep, method, redundancy, round_channels=round_channels, fold_constants=fold_constants,
        gather_below=gather_below)


def _check(model: onnx.ModelProto, what: str, path: str) -> None:
    """Full onnx.checker on the model; large weights are typed inputs there (storage.checker_view): they
    were checked in the input file or made by numpy_helper.from_array, and checking them would copy them."""
    try:
        onnx.checker.check_model(checker_view(model), full_check=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise LeanOnnxError(f"{path}: internal: the {what} model fails onnx.checker ({first}); nothing was "
                            "written (please report)") from None


def pruned_kernels(model: onnx.ModelProto) -> int:
    """Kernels (c_out x c_in/group) of every Conv/ConvTranspose in a model."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.input[1] in shapes:
            dims = shapes[node.input[1]]
            total += int(dims[0]) * int(dims[1])
    return total


def build_report(graph: ChannelGraph, sel: Selection, plan: Plan, pruned, before: dict, after: dict,
                 timings: dict) -> dict:
    """The JSON report of DESIGN.md section 5 (input/output paths are added by the caller)."""
    init = graph.loaded.initializers
    layers, dead_nonzero = [], 0
    for layer in graph.layers:
        kept_rows = plan.node_keep[layer.out_nodes]
        out_keep = plan.keep(layer.output)
        after_channels = int(out_keep.sum()) if out_keep is not None else layer.c_out
        producer = graph.loaded.producer.get(layer.output)
        bias_name = producer.input[2] if producer is not None and len(producer.input) > 2 and producer.input[2] \
            else None
        if bias_name is not None:
            dead = plan.dead[layer.out_nodes] & kept_rows
            dead_nonzero += int(np.count_nonzero(init[bias_name][dead]))
        layers.append({"name": layer.name, "op": layer.op, "channels": {"before": layer.c_out, "after": after_channels},
                       "kernels": {"total": layer.num_kernels, "kept": int(sel.layer_mask(layer).sum())},
                       "prunable": layer.prunable})
    stats = sel.stats()
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": _versions(),
        "method": sel.method,
        "keep_requested": sel.keep_requested,
        "input_shapes": {k: list(v) for k, v in graph.loaded.input_shapes.items()},
        "kernels": {
            "total": stats["total"], "requested": stats["requested"], "selected": stats["selected"],
            "kept": stats["kept"], "keep_achieved": stats["keep_achieved"],
            "from_paths": stats["from_paths"], "from_fallback": stats["from_fallback"],
            "in_pruned_model": pruned_kernels(pruned), "in_original_model": sum(x.num_kernels for x in graph.layers),
            "removed_by_redundancy": stats["removed_by_redundancy"], "paths": stats["paths"],
        },
        "channels": {"before": sum(x["channels"]["before"] for x in layers),
                     "after": sum(x["channels"]["after"] for x in layers),
                     "dead_kept": int(np.count_nonzero(plan.dead & plan.node_keep)),
                     "dead_nonzero_bias": dead_nonzero},
        "params": {"before": before["params"], "after": after["params"]},
        "flops": {"before": before["macs"], "after": after["macs"], "unit": "MACs",
                  "at_input_shapes": {k: list(v) for k, v in graph.loaded.input_shapes.items()}},
        "concat_inputs_dropped": sum(len(v) for v in plan.concat_drop.values()),
        "head_channels_dropped": sum(int((~plan.keep(h.read.tensor)).sum()) for h in plan.heads),
        "fold_constants": not plan.zero_dead,
        "gathers_inserted": len(plan.gathers),
        "inputs_reach_outputs": inputs_reach_outputs(graph, sel.edge_keep),
        "layers": layers,
        "frozen": [{"node": f.node, "op": f.op, "reason": f.reason, "channels": f.channels} for f in graph.frozen],
        "timings_s": timings,
    }


def _versions() -> dict:
    versions = {"lean_onnx": __version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        versions["onnxruntime"] = None
    return versions


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model_atomic(model: onnx.ModelProto | bytes, path: str) -> None:
    """Write a model (or any bytes: the JSON report) atomically: temporary files in the target folder, then
    rename, so a reader never sees half a file and an existing file is replaced only by a complete one.

    A model whose data exceeds `storage.external_data_threshold()` (protobuf's 2 GiB limit) is written with
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


class _CallableModule(types.ModuleType):
    """Lets `lean_onnx.prune(...)` call `prune()` although `lean_onnx.prune` is also this module
    (`from lean_onnx.prune import Pruner` keeps working)."""

    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
