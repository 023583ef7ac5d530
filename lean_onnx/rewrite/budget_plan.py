"""A plan that meets a MACs budget (`--target-macs`): select channel units, plan, measure, correct.

`select/budget.py` estimates MACs from the channels it keeps; the plan then keeps a few more (channel
rounding to multiples of `--round-channels`, channels a kept reader still needs), so the estimate of the
*plan's* channels is what the pruned model will have. The requested ratio is corrected by the difference
and the selection made again, until the plan is within `TOLERANCE` of the target (or `MAX_STEPS` tries);
every try is recorded for the report.
"""

from __future__ import annotations

from ..errors import LeanOnnxError
from ..graph.channel_graph import ChannelGraph
from ..select.budget import ChannelBudget, check_fraction, select_channels
from ..select.selection import Selection
from .plan import Plan, make_plan

TOLERANCE = 0.01
MAX_STEPS = 6
#: a target this far below the smallest estimate is refused (within it, the floor is what is written)
REFUSE_BELOW = 0.03


def plan_for_macs(graph: ChannelGraph, budget: ChannelBudget, target: float, round_channels: int,
                  fold_constants: bool, gather_below: float) -> tuple[Selection, Plan, dict]:
    """(selection, plan, budget report) for `target` = pruned MACs / original MACs."""
    check_fraction(target, "--target-macs")
    smallest = budget.smallest_ratio
    if target < smallest - REFUSE_BELOW:
        n = budget.blocks.limit
        branches = f", but in the {n} residual branches that may go whole" if n else ""
        raise LeanOnnxError(f"{graph.loaded.path}: --target-macs {target:g} cannot be reached: the smallest reachable "
                            f"MACs ratio is {smallest:.3f} (frozen channels, and every prunable layer keeps at least "
                            f"--min-channels {budget.min_channels:g} of its channels and one rounding block{branches})")
    requested, steps, best = target, [], None
    for _ in range(MAX_STEPS):
        selection = select_channels(budget, budget.node_keep_for(requested))
        plan = make_plan(graph, selection, round_channels, fold_constants, gather_below)
        planned = budget.macs(plan.node_keep) / budget.macs_before
        steps.append({"requested_ratio": round(requested, 6), "planned_ratio": round(planned, 6)})
        if best is None or abs(planned - target) < abs(best[2] - target):
            best = (selection, plan, planned)
        if abs(planned - target) <= TOLERANCE or (planned > target and requested <= smallest):
            break
        requested = min(1.0, max(0.0, requested + target - planned))
    selection, plan, planned = best
    info = {"kind": "macs", "target": target, "granularity": "channel", "method": budget.method,
            "min_channels": budget.min_channels, "allocate": budget.allocate, "smallest_ratio": round(smallest, 6),
            "planned_ratio": round(planned, 6), "steps": steps, "drop_blocks": budget.blocks.fraction,
            "branches": len(budget.blocks.branches)}
    return selection, plan, info
