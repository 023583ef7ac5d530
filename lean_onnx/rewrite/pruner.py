"""The pruning pipeline: load -> graph -> norms -> select -> plan -> rewrite (the stages below wire up here).

`Pruner` builds the graph and the norms once; `Pruner.prune(keep, method)` can then be called for
many keeps (a sweep) without repeating them. `prune(...)` is the one-shot form.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import LeanOnnxError
from ..graph.build import build_channel_graph
from ..graph.channel_graph import ChannelGraph
from ..graph.cost import float_params, model_cost, pruned_macs
from ..graph.load import load_model
from ..graph.normalise import structural_copy
from ..io.external_data import checker_view, data_bytes, external_data_threshold, fill_stubs
from ..io.ondisk import write_streamed
from ..io.save import STREAM_BYTES
from ..select.budget import DEFAULT_ALLOCATE, DEFAULT_DROP_BLOCKS, DEFAULT_MIN_CHANNELS, ChannelBudget, check_budget
from ..select.selection import METHODS, Selection, select_kernels
from ..select.weights import compute_edge_weights
from .budget_plan import plan_for_macs
from .channel_map import compose, kept_channels, record
from .masked import on_original
from .merge_reads import merge_repeated_reads
from .plan import Plan, make_plan
from .prune_report import build_report
from .rewriter import rewrite

#: channel counts a conv sees stay multiples of 16 (or unchanged): measured in docs/benchmarks.md, odd
#: counts push ONNX Runtime's convs off its blocked (NCHWc, AVX-512 block 16) kernels, and a pruned
#: MobileNetV2 ran at 0.76x the original's speed; 16 also covers AVX2's 8 and TensorRT's multiples of 8
DEFAULT_ROUND_CHANNELS = 16
#: a conv that reads at most this fraction of its shared input's channels reads them through a Gather:
#: measured (tools/bench_gather.py, docs/benchmarks.md) 1.2-5x faster convs at read fractions <= 0.75
DEFAULT_GATHER_BELOW = 0.75


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
        self._budgets: dict[tuple, ChannelBudget] = {}
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
        if self._base_bytes is None:  # large weights are stubs (io/external_data.py): these bytes are the graph only
            self._base_bytes = structural_copy(self.loaded.skeleton, self.loaded.path, stub_large=True
                                               ).SerializeToString()
        return onnx.ModelProto.FromString(self._base_bytes)

    def _masked(self, selection: Selection, plan: Plan, base: onnx.ModelProto, also=()) -> tuple:
        """(the masked model, which graph it is on): the input's own graph with the changed values carried
        over (rewrite/masked.py), or the normalised graph where that cannot be done. `also`: initializers
        that `base` holds with new values (calibration) besides those the rewrite changes."""
        changed = set(also)
        normalised = rewrite(self.graph, selection, plan, False, base, changed)
        model = on_original(normalised, changed, self.loaded)
        if model is not None:
            return model, "input"
        fill_stubs(normalised, self.loaded.source_tensors())
        return normalised, "normalised (a pruned weight is read inside an inlined local function)"

    def record_channels(self, pruned: onnx.ModelProto, plan: Plan) -> None:
        """Write which of the original's channels `pruned` kept into its metadata (rewrite/channel_map.py),
        composed with the input's own record when the input was pruned before."""
        source = self.loaded.skeleton if self.loaded.skeleton is not None else self.loaded.model
        record(pruned, compose(kept_channels(self.graph, plan, pruned.graph), source))

    def write_pruned(self, selection: Selection, plan: Plan, base: onnx.ModelProto,
                     first_copy: bool = False) -> tuple[onnx.ModelProto, int]:
        """(the pruned model written into `base`, Concat inputs merged): the rewrite, then a Concat's repeated
        reads merged into the convs after it (merge_reads.py; `first_copy`: the first copy's kernels, not
        the sum)."""
        pruned = rewrite(self.graph, selection, plan, True, base)
        return pruned, merge_repeated_reads(pruned, self._channel_count(plan), self._rank, first_copy)

    def _channel_count(self, plan: Plan):
        """tensor -> its channel count in the pruned model of `plan` (None when unknown)."""
        def count(tensor: str) -> int | None:
            keep = plan.keep(tensor)
            if keep is not None:
                return int(keep.sum())
            shape = self.loaded.shape(tensor)
            return shape[1] if shape and len(shape) > 1 and isinstance(shape[1], int) else None
        return count

    def _rank(self, tensor: str) -> int | None:
        shape = self.loaded.shape(tensor)
        return len(shape) if shape else None

    def _timed(self, stage, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
        return value

    def prune(self, keep: float | None = None, method: str = "lean", redundancy: bool = True, masked: bool = True,
              round_channels: int = DEFAULT_ROUND_CHANNELS, fold_constants: bool = False,
              gather_below: float = DEFAULT_GATHER_BELOW, zeros_are_pruned: bool = False,
              keep_connected: bool = False, *, target_macs: float | None = None, granularity: str | None = None,
              min_channels: float = DEFAULT_MIN_CHANNELS, allocate: str = DEFAULT_ALLOCATE,
              drop_blocks: float | None = None) -> PruneResult:
        """Prune to `keep`; `masked=False` skips building (and checking) the masked model;
        `round_channels` N keeps the channel counts convs see at multiples of N (see plan.make_plan);
        `fold_constants`: dead channels keep their constant act(bias) (the masked model keeps biases, as
        the reference's does) and constants that reach a Gemm head move into its bias; `gather_below` F: a
        conv reading at most F of its shared input's channels reads them through a Gather (0: never);
        `zeros_are_pruned`: exactly-zero kernels count as pruned already (steps of a schedule);
        `keep_connected`: add the best input-to-output chain when the selection collapsed a layer.
        `target_macs` F (instead of `keep`): channel granularity, the pruned model's MACs F of the original's
        (select/budget.py, docs/budgets.md), every prunable layer keeping at least `min_channels` of its
        channels, the units ranked by value per estimated time per MAC (`allocate="time"`) or by value
        alone (`"macs"`); `drop_blocks` F: up to F of the residual branches may go whole, lowest gain first
        (select/blocks.py; None: DEFAULT_DROP_BLOCKS with a target); the report's `budget` section says how it went."""
        check_budget(keep, target_macs, granularity, min_channels, drop_blocks=drop_blocks)
        timings = dict(self.timings)
        start = time.perf_counter()
        budget_info = None
        if target_macs is not None:
            budget = self.channel_budget(method, min_channels, round_channels, allocate, drop_blocks)
            selection, plan, budget_info = plan_for_macs(self.graph, budget, target_macs, round_channels,
                                                         fold_constants, gather_below)
            timings["select"] = time.perf_counter() - start
            start = time.perf_counter()
        else:
            selection = select_kernels(self.graph, keep, method, redundancy, zeros_are_pruned, keep_connected)
            timings["select"] = time.perf_counter() - start
            start = time.perf_counter()
            plan = make_plan(self.graph, selection, round_channels, fold_constants, gather_below)
        pruned, merged = self.write_pruned(selection, plan, self._base())
        self.record_channels(pruned, plan)
        masked_model, masked_graph = self._masked(selection, plan, self._base()) if masked else (None, None)
        timings["rewrite"] = time.perf_counter() - start
        start = time.perf_counter()
        _check(pruned, "pruned", self.loaded.path)
        if masked_model is not None:
            _check(masked_model, "masked", self.loaded.path)
        cost_after = {"params": float_params(pruned), "macs": pruned_macs(pruned, self.loaded)}
        timings["check"] = time.perf_counter() - start
        report = build_report(self.graph, selection, plan, pruned, self.cost_before, cost_after, timings)
        report["concat_reads_merged"] = merged
        if masked_graph is not None:
            report["masked_graph"] = masked_graph
        if budget_info is not None:
            before = self.cost_before["macs"]
            budget_info["achieved_macs_ratio"] = cost_after["macs"] / before if before else 1.0
            report["budget"] = budget_info
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

    def channel_budget(self, method: str = "lean", min_channels: float = DEFAULT_MIN_CHANNELS,
                       round_channels: int = DEFAULT_ROUND_CHANNELS,
                       allocate: str = DEFAULT_ALLOCATE, drop_blocks: float | None = None) -> ChannelBudget:
        """The channel units and scores of this model for `method` (made once, then reused: a sweep or a
        latency search prunes at many budgets); `drop_blocks` None: DEFAULT_DROP_BLOCKS."""
        drop_blocks = DEFAULT_DROP_BLOCKS if drop_blocks is None else drop_blocks
        key = (method, min_channels, round_channels, allocate, drop_blocks)
        if key not in self._budgets:
            if method not in METHODS:
                raise LeanOnnxError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
            self._budgets[key] = self._timed("channel scores", ChannelBudget, self.graph, method, min_channels,
                                             round_channels, allocate, drop_blocks=drop_blocks)
        return self._budgets[key]

    def slice_like(self, result: PruneResult, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`arrays` ({initializer name: array of its shape}, e.g. Adam's moments of the weights) cut the
        way `prune` cut the weights into `result.model`, by the same rewrite run on a copy whose
        initializers are these arrays; returns {name in the pruned model: array} (a copy made for one reader
        of a shared initializer, "name__node", included; a conv kernel merged from the copies of a tensor
        a Concat read twice (merge_reads.py) holds the first copy's values). Zero kernels come out
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
        moved = self.write_pruned(result.selection, plan, base, first_copy=True)[0]
        names = {t.name for t in result.model.graph.initializer}
        return {t.name: numpy_helper.to_array(t) for t in moved.graph.initializer
                if t.name in names and (t.name in arrays or t.name.partition("__")[0] in arrays)}


def replace_initializers(pruner: Pruner, result: PruneResult, arrays: dict[str, np.ndarray]) -> PruneResult:
    """`result` written again, with the same selection and plan, from the original whose initializers
    `arrays` ({name: full-size array}) replace (train/calibrate.py): the pruned and the masked model both
    come from the new values, so the pruned model still equals the masked one. Checked as `prune` checks."""
    from onnx import numpy_helper

    def base():
        model = pruner._base()
        found = set()
        for tensor in model.graph.initializer:
            if tensor.name in arrays:
                tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arrays[tensor.name]), tensor.name))
                found.add(tensor.name)
        if found != set(arrays):
            raise LeanOnnxError(f"{pruner.loaded.path}: no initializer {sorted(set(arrays) - found)[0]!r} to replace")
        return model

    pruned = pruner.write_pruned(result.selection, result.plan, base())[0]
    pruner.record_channels(pruned, result.plan)
    masked = pruner._masked(result.selection, result.plan, base(), arrays)[0] if result.masked is not None else None
    _check(pruned, "pruned", pruner.loaded.path)
    if masked is not None:
        _check(masked, "masked", pruner.loaded.path)
    report = copy.deepcopy(result.report)
    return PruneResult(pruned, masked, report, result.selection, result.plan, result.graph, pruned.SerializeToString())


def prune(source, keep: float | None = None, method: str = "lean", *, exclude=(), input_shapes=None,
          norm_grid: int | None = None, redundancy: bool = True,
          round_channels: int = DEFAULT_ROUND_CHANNELS, fold_constants: bool = False,
          gather_below: float = DEFAULT_GATHER_BELOW, target_macs: float | None = None,
          min_channels: float = DEFAULT_MIN_CHANNELS, allocate: str = DEFAULT_ALLOCATE) -> PruneResult:
    """Prune an ONNX model (path or ModelProto) to `keep` of its kernels, or to `target_macs` of its MACs
    (channel granularity); the source is not modified."""
    return Pruner(source, exclude=exclude, input_shapes=input_shapes, norm_grid=norm_grid).prune(
        keep, method, redundancy, round_channels=round_channels, fold_constants=fold_constants,
        gather_below=gather_below, target_macs=target_macs, min_channels=min_channels, allocate=allocate)


def _check(model: onnx.ModelProto, what: str, path: str) -> None:
    """Full onnx.checker on the model; large weights are typed inputs there (external_data.checker_view): they
    were checked in the input file or made by numpy_helper.from_array, and checking them would copy them."""
    try:
        onnx.checker.check_model(checker_view(model), full_check=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise LeanOnnxError(f"{path}: internal: the {what} model fails onnx.checker ({first}); nothing was "
                            "written (please report)") from None
