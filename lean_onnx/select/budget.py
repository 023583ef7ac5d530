"""Channel granularity and MACs budgets (`--target-macs`, docs/budgets.md).

The unit kept or removed is a *channel unit*: a channel together with every channel coupled to it
(residual operands and their sum, depthwise input and output, per-channel scales: the coupling pairs of
the graph, joined into connected components). A unit can go only when none of its channels is frozen.
Every kernel between kept channels stays, so what is selected is what the dense model keeps.

`ChannelBudget(graph, method)` scores the units once (`lean`: the best scale-invariant chain through
the unit, less its layer's median, chain_values.py; `l1` / `sv`: the per-layer-normalised norm of the
unit's filters), then
`node_keep_for(ratio)` keeps, on top of a per-layer floor (`min_channels`: never collapse), the
best-scored units until the estimated MACs reach `ratio` of the original's. The estimate counts every
conv's kernels between kept channels times the conv's MACs per kernel, plus everything that is not a
conv as it is; the rewrite stage measures the real model and corrects the ratio (rewrite/pruner.py).
Before that, at each target, `--drop-blocks` may remove whole residual branches (blocks.py): their units
are left out, floors included, and the skip carries the input past them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import LeanOnnxError
from ..graph.branches import residual_branches
from ..graph.channel_graph import ChannelGraph
from ..graph.cost import layer_macs, model_cost
from ..graph.heads import head_layout
from .blocks import BlockDrops
from .chain_values import centred_chain_values, magnitude_scores
from .selection import Selection, check_keep, prune_redundancy
from .unit_cost import unit_costs
from .weights import compute_edge_weights, l1_scores

GRANULARITIES = ("kernel", "channel")
#: every prunable layer keeps at least this fraction of its channels (and at least one rounding block)
DEFAULT_MIN_CHANNELS = 0.1
#: how the budget is allocated: `time` ranks units by value per estimated time per MAC (unit_cost.py),
#: `macs` by value alone
ALLOCATIONS = ("time", "macs")
DEFAULT_ALLOCATE = "time"
#: with a budget, at most this fraction of the residual branches may be removed whole (select/blocks.py);
#: 1: any of them, lowest gain first, while the channels left can still carry the target's MACs
DEFAULT_DROP_BLOCKS = 1.0
#: weight of log(time / MACs) against a unit's log-value in the `time` allocation
TIME_WEIGHT = 2.0
#: units tried one by one after a rounding block jumped past the target
WINDOW = 512


def check_fraction(value: float, flag: str) -> float:
    if not 0 < value <= 1:
        hint = f"; did you mean {value / 100:g}?" if 1 < value <= 100 else ""
        raise LeanOnnxError(f"{flag} is a fraction of the original, in (0, 1]; got {value:g}{hint}")
    return value


def check_drop_blocks(value: float) -> float:
    if not 0 <= value <= 1:
        raise LeanOnnxError(f"--drop-blocks {value:g}: expected a fraction of the residual branches, in [0, 1]")
    return value


def check_min_channels(value: float) -> float:
    if not 0 <= value <= 1:
        raise LeanOnnxError(f"--min-channels {value:g}: expected a fraction in [0, 1]")
    return value


def check_budget(keep: float | None, target: float | None, granularity: str | None = None,
                 min_channels: float = DEFAULT_MIN_CHANNELS, target_flag: str = "--target-macs",
                 drop_blocks: float | None = None) -> str:
    """Exactly one of `keep` (a kernel fraction) / `target` (a fraction of the original's MACs or latency,
    given as `target_flag`); returns the granularity that goes with it (channel for a budget)."""
    if (keep is None) == (target is None):
        raise LeanOnnxError("give exactly one of --keep (a kernel fraction) or --target-macs / --target-latency "
                            "(a fraction of the original)")
    if granularity not in (None, *GRANULARITIES):
        raise LeanOnnxError(f"--granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    if keep is not None:
        check_keep(keep)
        if drop_blocks is not None:
            raise LeanOnnxError("--drop-blocks goes with a budget (--target-macs / --target-latency), not --keep")
        if granularity == "channel":
            raise LeanOnnxError("--granularity channel goes with a budget (--target-macs / --target-latency); "
                                "--keep counts kernels (the reference's mode)")
        return "kernel"
    check_fraction(target, target_flag)
    if granularity == "kernel":
        raise LeanOnnxError(f"--granularity kernel cannot meet {target_flag} (kernels leave the dense model only "
                            "with their whole channel); use the default, channel")
    check_min_channels(min_channels)
    if drop_blocks is not None:
        check_drop_blocks(drop_blocks)
    return "channel"


def _kept_for_outputs(graph: ChannelGraph) -> np.ndarray:
    """Channels the plan keeps whatever is selected: model outputs and what a reader that cannot drop
    columns reads (a linear head whose columns are channel-major blocks can drop a removed channel's,
    graph/heads.py), and every channel that reaches those through per-channel (skippable) edges only."""
    fixed = (graph.is_terminal if graph.is_hard_terminal is None else graph.is_hard_terminal).copy()
    for read in graph.head_reads:
        nodes = graph.tensor_nodes[read.tensor]
        if head_layout(graph.loaded, read, len(nodes)) is None:
            fixed[nodes] = True
    src, dst, through = graph.src, graph.dst, graph.skippable  # dst: one np.repeat, not one per pass
    while True:
        more = through & fixed[dst] & ~fixed[src]
        if not more.any():
            return fixed
        fixed[src[more]] = True


def _repeatable_reads(graph: ChannelGraph) -> dict[int, tuple[list[tuple[int, int, str]], dict]]:
    """Convs whose input is a channel Concat of which some input is a residual sum: {layer index: (the
    Concat's inputs as (start, end, tensor) in the layer's input channels, {sum output: (skip, branch)})}.
    When a branch goes whole its sum is its skip, the Concat may read one tensor twice, and the rewrite
    merges the copies (rewrite/merge_reads.py): `ChannelBudget.macs` counts such a conv's inputs once."""
    sums = {b.output: (b.skip, b.branch) for b in residual_branches(graph)}
    if not sums:
        return {}
    loaded, found = graph.loaded, {}
    for layer in graph.layers:
        concat = loaded.producer.get(layer.input)
        readers = loaded.consumers.get(layer.input, [])
        if (layer.group != 1 or layer.op != "Conv" or concat is None or not graph.is_channel_concat(concat)
                or not any(t in sums for t in concat.input) or any(r.op_type != "Conv" for r in readers)):
            continue
        sizes = [len(graph.tensor_nodes[t]) for t in concat.input]
        starts = np.cumsum([0] + sizes)
        found[layer.index] = ([(int(a), int(b), t) for a, b, t in zip(starts[:-1], starts[1:], concat.input)], sums)
    return found


@dataclass
class _Layer:
    out_nodes: np.ndarray
    in_nodes: np.ndarray
    group: int
    macs_per_kernel: float


class ChannelBudget:
    """Units, their scores and the MACs model of one channel graph (see the module docstring)."""

    def __init__(self, graph: ChannelGraph, method: str = "lean", min_channels: float = DEFAULT_MIN_CHANNELS,
                 round_channels: int = 16, allocate: str = DEFAULT_ALLOCATE, time_weight: float = TIME_WEIGHT,
                 drop_blocks: float = DEFAULT_DROP_BLOCKS):
        if not graph.weights_ready:
            compute_edge_weights(graph)
        check_min_channels(min_channels)
        self.graph, self.method, self.min_channels = graph, method, min_channels
        self.unit = graph.coupling_components
        removable = np.ones(int(self.unit.max()) + 1, dtype=bool)
        fixed = graph.is_frozen | graph.is_source | _kept_for_outputs(graph)
        removable[self.unit[fixed]] = False
        for layer in graph.layers:  # excluded layers keep their channels: nothing of theirs is selected
            if not layer.prunable:
                removable[self.unit[layer.out_nodes]] = False
        conv_out = np.zeros(graph.num_nodes, dtype=bool)
        for layer in graph.layers:
            conv_out[layer.out_nodes] = True
        has_conv = np.zeros_like(removable)
        has_conv[self.unit[conv_out]] = True
        self.removable = removable & has_conv  # a unit without a conv output removes no MACs
        self.unit_score = self._unit_scores(conv_out)
        self.layers, per_layer = [], []
        for layer in graph.layers:
            macs = layer_macs(layer, graph.loaded) or 0
            self.layers.append(_Layer(layer.out_nodes, layer.in_nodes, layer.group, macs / layer.num_kernels))
            per_layer.append(macs)
        self.repeats = _repeatable_reads(graph)
        self.macs_before = model_cost(graph.loaded)["macs"]
        self.other_macs = self.macs_before - sum(per_layer)
        check_drop_blocks(drop_blocks)
        self.blocks = BlockDrops(graph, self.unit, self.removable, np.array(per_layer, dtype=float), drop_blocks)
        self.round_channels = round_channels
        self.ranked = self._rank_layers()
        self.forced = self._floor(round_channels)
        self.segment_units, self.segment_starts, self.segment_lengths = self._segments()
        if allocate not in ALLOCATIONS:
            raise LeanOnnxError(f"--allocate {allocate!r}: choose one of {', '.join(ALLOCATIONS)}")
        self.allocate = allocate
        self.unit_key = self._keys(time_weight if allocate == "time" else 0.0)
        candidates = np.flatnonzero(self.removable & ~self.forced)
        order = np.lexsort((-candidates, -self.unit_key[candidates]))  # best first; ties: higher unit id
        self.order = candidates[order]

    # -- scores ------------------------------------------------------------------------------
    def _unit_scores(self, conv_out: np.ndarray) -> np.ndarray:
        graph, n_units = self.graph, int(self.unit.max()) + 1
        if self.method == "lean":
            values = centred_chain_values(graph)
            score = np.full(n_units, -np.inf)
            np.maximum.at(score, self.unit, values)
            return score
        kernel_scores = graph.weight if self.method == "sv" else l1_scores(graph)
        node_scores = magnitude_scores(graph, kernel_scores, squared=self.method == "sv")
        total = np.bincount(self.unit[conv_out], node_scores[conv_out], minlength=n_units)
        count = np.bincount(self.unit[conv_out], minlength=n_units)
        return np.where(count > 0, total / np.maximum(count, 1), -np.inf)

    def _keys(self, time_weight: float) -> np.ndarray:
        """The order in which units are kept, best first: the log-value (chain values are log-products;
        the baselines' positive scores are logged) minus `time_weight` x log(estimated time / MACs), so that
        of two units of equal value the one that costs more time per MAC goes first."""
        n_units = self.unit_score.size
        if self.method == "lean":
            key = self.unit_score.copy()
        else:
            key = np.full(n_units, -np.inf)
            np.log(self.unit_score, out=key, where=self.unit_score > 0)
        if time_weight:
            macs, time = unit_costs(self.graph, self.unit, n_units)
            per_mac = np.where(macs > 0, time / np.maximum(macs, 1e-300), 1.0)
            key -= time_weight * np.log(np.maximum(per_mac, 1.0))
        return key

    def _rank_layers(self) -> list[tuple[np.ndarray, int, int]]:
        """Per prunable layer with removable channels: (its distinct units, best first; c_out; index)."""
        ranked = []
        for layer in self.graph.layers:
            units = self.unit[layer.out_nodes]
            if not layer.prunable or not self.removable[units].any():
                continue
            distinct, first = np.unique(units[np.argsort(-self.unit_score[units], kind="stable")], return_index=True)
            ranked.append((distinct[np.argsort(first)], layer.c_out, layer.index))
        return ranked

    def _floor(self, round_channels: int) -> np.ndarray:
        """Units kept whatever the budget: in every prunable layer, its best `min_channels` of the channels
        (at least one rounding block, or all when the layer is narrower), so no layer collapses."""
        forced = np.zeros_like(self.removable)
        for units, c_out, _ in self.ranked:
            need = max(math.ceil(self.min_channels * c_out), min(round_channels, c_out), 1)
            forced[units[:need]] = True
        return forced

    def _segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The channel tensors a blocked kernel sees (`graph.blocked_tensors`) with a removable unit, as one
        flat array of their channels' units, each tensor's best first, with each tensor's start and length."""
        flat = [units[np.argsort(-self.unit_score[units], kind="stable")]
                for units in (self.unit[nodes] for nodes in self.graph.blocked_tensors.values())
                if self.removable[units].any()]
        if not flat:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        lengths = np.array([len(units) for units in flat])
        return np.concatenate(flat), np.cumsum(lengths) - lengths, lengths

    def _fill_blocks(self, keep_unit: np.ndarray) -> np.ndarray:
        """Round the kept count of every channel tensor a blocked kernel sees (conv inputs and outputs,
        Concat inputs, Split outputs) up to a multiple of `round_channels` with its next-best units, so the
        rewrite's channel rounding (which would keep zeroed channels) has nothing left to add. A unit may
        belong to several tensors (residual sums, Split halves of a conv's output): a few passes settle it."""
        block = self.round_channels
        if block <= 1 or not self.segment_units.size:
            return keep_unit
        flat, starts, lengths = self.segment_units, self.segment_starts, self.segment_lengths
        for _ in range(6):
            counts = np.add.reduceat(keep_unit[flat].astype(np.int64), starts)
            want = np.minimum(lengths, -(-counts // block) * block)
            short = np.flatnonzero(counts < want)
            if not short.size:
                break
            for k in short:  # counted again: an earlier tensor of this pass may share its units
                units = flat[starts[k]:starts[k] + lengths[k]]
                count = int(keep_unit[units].sum())
                need = min(int(lengths[k]), -(-count // block) * block) - count
                keep_unit[units[~keep_unit[units]][:need]] = True
        return keep_unit

    # -- the MACs model ----------------------------------------------------------------------
    def macs(self, node_keep: np.ndarray) -> float:
        """Estimated MACs of the dense model that keeps the channels `node_keep`."""
        total = float(self.other_macs)
        for index, layer in enumerate(self.layers):
            out_g = node_keep[layer.out_nodes].reshape(layer.group, -1).sum(1)
            if index in self.repeats:
                in_g = np.array([self._distinct_inputs(index, node_keep[layer.in_nodes], node_keep)])
            else:
                in_g = node_keep[layer.in_nodes].reshape(layer.group, -1).sum(1)
            total += layer.macs_per_kernel * float(np.dot(out_g, in_g))
        return total

    def _distinct_inputs(self, index: int, kept: np.ndarray, node_keep: np.ndarray) -> int:
        """Kept input channels of a conv reading a Concat of residual sums, a tensor read twice counted once
        (a sum whose branch keeps no channel is its skip: `_repeatable_reads`)."""
        segments, sums = self.repeats[index]
        nodes, seen, count = self.graph.tensor_nodes, set(), 0
        for start, end, tensor in segments:
            while tensor in sums and not node_keep[nodes[sums[tensor][1]]].any():
                tensor = sums[tensor][0]
            if tensor not in seen:
                seen.add(tensor)
                count += int(kept[start:end].sum())
        return count

    def node_keep(self, num_units: int, dropped: np.ndarray | None = None) -> np.ndarray:
        """Channels kept with the floor, the fixed units and the `num_units` best-scored others, each layer
        filled up to a whole rounding block (less the branches of `dropped`, see `_with_fill`)."""
        return self._with_fill(self.order[:num_units], dropped)

    def _with_fill(self, units: np.ndarray, dropped: np.ndarray | None = None) -> np.ndarray:
        """Channels kept with `units` (and the floors and fixed units), less the units of the dropped
        branches (`dropped`, a unit mask: `drops_at`), each tensor filled to whole blocks."""
        keep_unit = ~self.removable | self.forced
        keep_unit[units] = True
        if dropped is not None:
            keep_unit[dropped] = False
        return self._fill_blocks(keep_unit)[self.unit]

    def drops_at(self, ratio: float) -> np.ndarray:
        """Units of the residual branches dropped at `ratio` of the original's MACs (`--drop-blocks`,
        blocks.py; with every channel kept the estimate is the original's MACs)."""
        chosen = self.blocks.for_target(self.macs_before, ratio * self.macs_before)
        return self.blocks.unit_mask(chosen, self.removable.size)

    @property
    def smallest_ratio(self) -> float:
        """The smallest MACs ratio a target can reach: every floor, and the branches dropped at 0."""
        keep = self.node_keep(0, self.drops_at(0.0))
        return self.macs(keep) / self.macs_before if self.macs_before else 1.0

    def node_keep_for(self, ratio: float, tolerance: float = 0.01) -> np.ndarray:
        """The fewest best-scored units whose estimated MACs reach `ratio` of the original's (bisection on
        the count: the MACs grow with every unit added). Filling a layer's rounding block can jump past the
        target (a wide, expensive layer crossing a block); then the units before the jump are kept and the
        next `WINDOW` units in score order are added one by one where they keep the estimate within
        `tolerance` of the target (units of cheaper layers fill the gap); the closer of the two wins."""
        target, slack = ratio * self.macs_before, tolerance * self.macs_before
        dropped = self.drops_at(ratio)
        lo, hi = 0, len(self.order)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.macs(self.node_keep(mid, dropped)) >= target:
                hi = mid
            else:
                lo = mid + 1
        keep = self.node_keep(lo, dropped)
        over = self.macs(keep) - target
        if lo == 0 or over <= slack:
            return keep
        chosen = list(self.order[:lo - 1])
        best = self.node_keep(lo - 1, dropped)
        for unit in self.order[lo:lo + WINDOW]:
            trial = self._with_fill(np.array(chosen + [unit], dtype=np.int64), dropped)
            macs = self.macs(trial)
            if macs <= target + slack:
                chosen.append(unit)
                best = trial
                if macs >= target - slack:
                    break
        return keep if over < target - self.macs(best) else best

    def edge_keep(self, node_keep: np.ndarray) -> np.ndarray:
        """Every prunable kernel whose input and output channels are both kept."""
        graph = self.graph
        return graph.prunable_edges & node_keep[graph.src] & node_keep[graph.dst]


def select_channels(budget: ChannelBudget, node_keep: np.ndarray) -> Selection:
    """The Selection of a channel keep mask: every prunable kernel between kept channels, then redundancy
    (both directions, as `select_kernels`: a kept channel whose inputs all went is dead, one that nothing
    kept reads is unused; with the floors in place it removes little)."""
    graph = budget.graph
    edge_keep = budget.edge_keep(node_keep)
    total, selected = int(graph.prunable_edges.sum()), int(edge_keep.sum())
    edge_keep, alive, used, removed_fwd, removed_bwd = prune_redundancy(graph, edge_keep)
    no_paths = np.zeros(graph.num_edges, dtype=bool)
    return Selection(budget.method, selected / total if total else 1.0, total, selected, selected, edge_keep,
                     no_paths, 0, 0, 0.0, removed_fwd, removed_bwd, alive, used)
