"""`--target-latency F`: the largest MACs budget whose pruned model measures at most F of the original's
median latency, found with real ONNX Runtime timings (same provider, threads, runs and warm-up as
`--validate`).

Latency is monotone in the MACs budget only roughly (ONNX Runtime's cost per layer is not its MAC count:
depthwise and memory-bound layers), so this is a bracketing search on the MACs ratio, each step pruning
(channel granularity, no masked model) and timing the original and the pruned model in paired rounds
(runtime/bench.paired_benchmark: a noisy machine hits both alike). It starts at F and scales the budget by the
measured miss until a step meets F; from then on the budget that met F and the smallest one that did not
(or 1, whose ratio is 1 by definition) bracket the answer, and the next step interpolates the measured ratios
linearly in that bracket (kept a twentieth of the bracket away from its ends, so a step always narrows it).
Bisecting instead spent its steps far from the answer: on MobileNetV2 at 0.6, after 0.604 of the MACs measured
0.581, it tried 0.807, 0.705, 0.648, 0.680 and 0.664. Every step is in the report (`budget.search`).
"""

from __future__ import annotations

from ..rewrite.pruner import DEFAULT_ROUND_CHANNELS
from ..select.budget import DEFAULT_ALLOCATE, check_fraction
from .bench import paired_benchmark

MAX_STEPS = 6
#: the search stops when the MACs bracket is narrower than this
RESOLUTION = 0.02
#: an interpolated step stays this fraction of the bracket away from its ends
MARGIN = 0.05


def interpolate(low: float, low_ratio: float, high: float, high_ratio: float, target: float) -> float:
    """The MACs budget between `low` (measured `low_ratio` <= target) and `high` (measured `high_ratio` >
    target) where the latency ratio, linear between the two, would be `target`; at least MARGIN of the
    bracket from either end."""
    width = high - low
    guess = low + (target - low_ratio) / (high_ratio - low_ratio) * width  # low_ratio <= target < high_ratio
    return min(max(guess, low + MARGIN * width), high - MARGIN * width)


def prune_to_latency(pruner, target: float, *, method: str = "lean", min_channels: float, provider: str = "auto",
                     threads: int = 2, runs: int = 20, warmup: int = 5, log=lambda msg: None, **prune_options):
    """(PruneResult, budget report) for the pruned model that meets `target` with the most MACs kept; when
    no step meets it, the fastest step's budget, with `met` False in the report."""
    check_fraction(target, "--target-latency")
    masked = prune_options.pop("masked", True)
    round_channels = prune_options.get("round_channels", DEFAULT_ROUND_CHANNELS)
    budget = pruner.channel_budget(method, min_channels, round_channels,
                                   prune_options.get("allocate", DEFAULT_ALLOCATE), prune_options.get("drop_blocks"))
    shapes = pruner.loaded.input_shapes
    timing = {"provider": provider, "input_shapes": shapes, "threads": threads, "runs": runs, "warmup": warmup}
    low, high = min(max(budget.smallest_ratio, 0.01), 1.0), 1.0
    low_ratio, high_ratio = None, 1.0  # measured latency ratios at the bracket's ends (1 unpruned)
    macs = min(max(target, low), 1.0)  # latency roughly follows MACs: start there
    steps, met, fastest = [], None, None
    for _ in range(MAX_STEPS):
        result = pruner.prune(target_macs=macs, method=method, min_channels=min_channels, masked=False,
                              **prune_options)
        original, pruned = paired_benchmark([pruner.loaded.original, result.model_bytes], **timing)
        ratio = pruned["latency_ms"]["median"] / original["latency_ms"]["median"]
        step = {"target_macs": round(macs, 4), "macs_ratio": round(result.report["budget"]["achieved_macs_ratio"], 4),
                "latency_ms": {"original": original["latency_ms"]["median"], "pruned": pruned["latency_ms"]["median"]},
                "latency_ratio": round(ratio, 4), "provider": pruned["provider"]}
        steps.append(step)
        log(f"target-latency search: MACs {step['macs_ratio']:.3f} -> latency ratio {ratio:.3f} "
            f"({step['latency_ms']['pruned']:.2f} / {step['latency_ms']['original']:.2f} ms)")
        if ratio <= target:
            if met is None or macs > met["target_macs"]:
                met = step
            low, low_ratio = macs, ratio
        else:
            high, high_ratio = macs, ratio
        if fastest is None or ratio < fastest["latency_ratio"]:
            fastest = step
        if high - low < RESOLUTION or (ratio > target and macs <= budget.smallest_ratio):
            break
        if met is None and ratio > target:  # not met yet: scale the budget by how far off it was
            macs = max(budget.smallest_ratio, macs * target / ratio)
        elif low_ratio is None:
            macs = (low + high) / 2
        else:
            macs = interpolate(low, low_ratio, high, high_ratio, target)
    chosen = met or fastest
    result = pruner.prune(target_macs=chosen["target_macs"], method=method, min_channels=min_channels, masked=masked,
                          **prune_options)
    info = dict(result.report["budget"])
    info.update(kind="latency", target=target, target_macs=chosen["target_macs"], met=met is not None,
                latency_ratio=chosen["latency_ratio"], provider=chosen["provider"], threads=threads, runs=runs,
                search=steps)
    result.report["budget"] = info
    return result, info
