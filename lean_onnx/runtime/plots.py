"""PNG pictures of a prune or a sweep (matplotlib, Agg backend: no display needed).

- `plot_sweep(rows, out_dir)`: latency and error against keep, and the error/latency trade-off.
- `plot_channels(report, out_dir)`: conv output channels per layer before and after pruning.
- `plot_chains(graph, selection, out_dir)`: the kept kernels as a graph of channels laid out by layer,
  the picture the LEAN paper uses to show that LEAN keeps long chains (MS-D's dense skip connections
  are drawn as arcs, so that a chain through 50 one-channel layers stays readable).
- `plot_prune(result, out_dir)`: channels and chains of one PruneResult (`prune --plot DIR`).
Every function returns the paths it wrote. matplotlib is imported lazily: it is an optional extra.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import LeanOnnxError

#: at most this many kernels are drawn in a chain picture: beyond that, lines only add ink and seconds
MAX_EDGES_DRAWN = 20_000
ARC_POINTS = 16  # points per drawn edge: enough for a smooth arc
COLOURS = {"path": "tab:red", "fallback": "tab:blue", "frozen": "0.6"}
LABELS = {"path": "kept: on a LEAN chain", "fallback": "kept: individual-norm fallback",
          "frozen": "frozen layer (kept whole)"}


def require_matplotlib():
    """The pyplot module on the Agg backend, or a one-line LeanOnnxError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise LeanOnnxError("--plot needs matplotlib: pip install 'lean-onnx[plot]'") from None
    return plt


def _save(fig, out_dir: str, name: str) -> str:
    """Write one PNG; the folder is created when missing."""
    plt = require_matplotlib()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise LeanOnnxError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ sweep


def _latency(entry: dict | None) -> float | None:
    lat = entry and entry.get("latency_ms")
    return lat["median"] if lat else None


def plot_sweep(rows: list[dict], out_dir: str, original: dict | None = None) -> list[str]:
    """`sweep.png`: latency (or MACs when not timed) and error vs keep on a log x axis;
    `sweep_pareto.png`: error against latency, Pareto rows highlighted and labelled by keep."""
    plt = require_matplotlib()
    rows = sorted(rows, key=lambda r: r["keep_requested"])
    keeps = [r["keep_requested"] for r in rows]
    timed = all(_latency(r) is not None for r in rows)
    cost = [_latency(r) if timed else r["macs"] / 1e6 for r in rows]
    cost_label = "median latency (ms)" if timed else "MACs (millions)"
    errors = [r["max_rel_err_vs_original"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.plot(keeps, cost, "o-", color="tab:blue", label="pruned")
    reference = (_latency(original) if timed else original["macs"] / 1e6) if original else None
    if reference is not None:
        top.axhline(reference, color="0.4", linestyle="--", label="original")
    top.set_ylabel(cost_label)
    top.set_ylim(bottom=0)
    top.legend(loc="upper left")
    top.grid(True, which="both", alpha=0.3)
    bottom.plot(keeps, errors, "s-", color="tab:red", label="max relative error vs original")
    _error_scale(bottom, errors)
    bottom.set_ylabel("max |pruned - original| / max |original|")
    bottom.set_xlabel("keep (fraction of prunable kernels kept, log scale)")
    bottom.legend(loc="best")
    bottom.grid(True, which="both", alpha=0.3)
    bottom.set_xscale("log")
    fig.suptitle(f"pruning sweep: {'latency' if timed else 'MACs'} and error against keep")
    fig.tight_layout()
    paths = [_save(fig, out_dir, "sweep.png")]
    paths.append(_plot_pareto(plt, rows, cost, cost_label, errors, reference, out_dir))
    return paths


def _error_scale(ax, errors: list[float]) -> None:
    """Log scale when every error is positive; symlog keeps an exact 0 (keep 1.0) on the axis."""
    if errors and min(errors) > 0:
        ax.set_yscale("log")
    else:
        positive = [e for e in errors if e > 0]  # a decade below the smallest keeps every error on the log part
        ax.set_yscale("symlog", linthresh=min(positive) / 10 if positive else 1e-6)


def _plot_pareto(plt, rows, cost, cost_label, errors, reference, out_dir) -> str:
    fig, ax = plt.subplots(figsize=(7, 5))
    front = [r.get("pareto", False) for r in rows]
    ax.scatter([c for c, f in zip(cost, front) if not f], [e for e, f in zip(errors, front) if not f],
               color="0.6", label="dominated")
    ax.scatter([c for c, f in zip(cost, front) if f], [e for e, f in zip(errors, front) if f],
               color="tab:red", label="Pareto front")
    for r, c, e in zip(rows, cost, errors):
        ax.annotate(f"keep {r['keep_requested']:g}", (c, e), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if reference is not None:
        ax.axvline(reference, color="0.4", linestyle="--", label="original")
    _error_scale(ax, errors)
    ax.set_xlabel(cost_label)
    ax.set_ylabel("max relative error vs original")
    ax.set_title("error against cost: lower left is better")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.1, y=0.15)  # room for the keep labels at the edges
    ax.legend(loc="best")
    fig.tight_layout()
    return _save(fig, out_dir, "sweep_pareto.png")


# ---------------------------------------------------------------------------------------- channels


def plot_channels(report: dict, out_dir: str, name: str = "channels.png") -> list[str]:
    """Bars of conv output channels per layer (index in graph order), before and after pruning."""
    plt = require_matplotlib()
    from matplotlib.ticker import MaxNLocator

    layers = report["layers"]
    index = np.arange(len(layers))
    before = [layer["channels"]["before"] for layer in layers]
    after = [layer["channels"]["after"] for layer in layers]
    fig, ax = plt.subplots(figsize=(min(max(8, 0.15 * len(layers)), 24), 4.5))
    ax.bar(index, before, width=0.8, color="0.8", label="before")
    ax.bar(index, after, width=0.5, color="tab:blue", label="after")
    frozen = [i for i, layer in enumerate(layers) if not layer.get("prunable", True)]
    if frozen:
        ax.scatter(frozen, [before[i] for i in frozen], marker="v", color="0.3", s=12, label="frozen layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("conv layer (index in graph order)")
    ax.set_ylabel("output channels")
    ax.set_xlim(-0.8, len(layers) - 0.2)
    k = report["kernels"]
    ax.set_title(f"channels per conv layer: {report['channels']['before']:,} -> {report['channels']['after']:,} "
                 f"(keep {report['keep_requested']:g}, {report['method']}, {100 * k['keep_achieved']:.2f} % of "
                 "kernels kept)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    return [_save(fig, out_dir, name)]


# ------------------------------------------------------------------------------------------ chains


def channel_positions(graph, max_layers: int | None = None) -> tuple[np.ndarray, np.ndarray, list]:
    """(x, y) of every channel node: a conv's output channel j sits at x = its layer's rank + 1 and
    y = j centred on 0; input channels at x = 0. Other nodes (BN, residual sums, pools) take the place
    of their source with the largest x, so a kernel that reads them is drawn from where the data was
    made. Node ids are topological (graph.py), so one pass in id order suffices."""
    layers = graph.layers[:max_layers] if max_layers else graph.layers
    x = np.full(graph.num_nodes, np.nan)
    y = np.full(graph.num_nodes, np.nan)
    for tensor, nodes in graph.tensor_nodes.items():  # default y: index inside the first tensor seen
        free = np.isnan(y[nodes])
        y[nodes[free]] = (np.arange(len(nodes)) - (len(nodes) - 1) / 2)[free]
    for rank, layer in enumerate(graph.layers):
        x[layer.out_nodes] = rank + 1
        y[layer.out_nodes] = np.arange(layer.c_out) - (layer.c_out - 1) / 2
    made_by_conv = ~np.isnan(x)
    src, indptr = graph.src, graph.indptr
    for v in np.flatnonzero(~made_by_conv):
        sources = src[indptr[v]:indptr[v + 1]]
        if sources.size == 0:
            x[v] = 0.0
            y[v] = 0.0 if np.isnan(y[v]) else y[v]
            continue
        best = sources[np.nanargmax(x[sources])] if not np.isnan(x[sources]).all() else sources[0]
        x[v], y[v] = x[best], y[best]
    return np.nan_to_num(x), np.nan_to_num(y), layers


def edge_categories(graph, selection, layer_count: int) -> dict[str, np.ndarray]:
    """Kernel edge ids to draw, by kind: on a LEAN chain, from the fallback, or in a frozen layer."""
    in_layers = (graph.edge_layer >= 0) & (graph.edge_layer < layer_count)
    kept = selection.edge_keep & in_layers
    return {"path": np.flatnonzero(kept & selection.from_path_edges),
            "fallback": np.flatnonzero(kept & ~selection.from_path_edges),
            "frozen": np.flatnonzero(in_layers & graph.skippable)}  # excluded convs: skippable kernel edges


def cap_edges(categories: dict[str, np.ndarray], max_edges: int, seed: int = 0) -> dict[str, np.ndarray]:
    """At most `max_edges` in all: chain edges first (they are the point of the picture), then a
    uniform sample of the rest."""
    rng = np.random.default_rng(seed)
    left, capped = max_edges, {}
    for kind in ("path", "fallback", "frozen"):
        ids = categories[kind]
        if ids.size > left:
            ids = np.sort(rng.choice(ids, size=left, replace=False))
        capped[kind] = ids
        left -= ids.size
    return capped


def arc_segments(x0, y0, x1, y1, height) -> np.ndarray:
    """(n, ARC_POINTS, 2) quadratic Bezier curves; an edge that skips layers bulges up by `height`,
    an edge between neighbouring layers is a straight line."""
    t = np.linspace(0.0, 1.0, ARC_POINTS)[None, :]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + 2 * height  # the curve peaks at half its control point
    bx = (1 - t) ** 2 * x0[:, None] + 2 * (1 - t) * t * cx[:, None] + t ** 2 * x1[:, None]
    by = (1 - t) ** 2 * y0[:, None] + 2 * (1 - t) * t * cy[:, None] + t ** 2 * y1[:, None]
    return np.stack([bx, by], axis=-1)


def plot_chains(graph, selection, out_dir: str, max_layers: int | None = None,
                max_edges: int = MAX_EDGES_DRAWN, name: str = "chains.png") -> list[str]:
    """The kept kernels as lines between channel nodes (x = conv layer in graph order, y = channel);
    pruned kernels are not drawn. Kernels that skip layers (dense or skip connections) are arcs whose
    height grows with the skip, so one-channel layers such as MS-D's stay readable."""
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plt = require_matplotlib()
    x, y, layers = channel_positions(graph, max_layers)
    categories = edge_categories(graph, selection, len(layers))
    total = sum(ids.size for ids in categories.values())
    drawn = cap_edges(categories, max_edges)
    dst = graph.dst
    spread = max(1.0, float(np.ptp(y[np.concatenate([layer.out_nodes for layer in layers])])) if layers else 1.0)
    arc_unit = max(1.0, 0.1 * spread)  # the highest arc: one channel in MS-D, a tenth of the height elsewhere
    max_skip = max([1.0] + [float(np.max(x[dst[ids]] - x[graph.src[ids]] - 1)) for ids in drawn.values() if ids.size])
    fig, ax = plt.subplots(figsize=(min(max(8, 0.3 * len(layers)), 24), 6))
    handles = []
    for kind in ("frozen", "fallback", "path"):  # chains drawn last, on top
        ids = drawn[kind]
        if ids.size == 0:
            continue
        x0, y0, x1, y1 = x[graph.src[ids]], y[graph.src[ids]], x[dst[ids]], y[dst[ids]]
        skip = np.maximum(x1 - x0 - 1, 0)
        height = arc_unit * (0.25 + 0.75 * skip / max_skip) * (skip > 0)
        alpha = float(np.clip(300.0 / ids.size, 0.08, 0.9))
        ax.add_collection(LineCollection(arc_segments(x0, y0, x1, y1, height), colors=COLOURS[kind],
                                         linewidths=1.2 if kind == "path" else 0.7, alpha=alpha))
        handles.append(Line2D([], [], color=COLOURS[kind], label=f"{LABELS[kind]} ({categories[kind].size:,})"))
    _draw_nodes(ax, graph, selection, layers, x, y)
    handles.append(Line2D([], [], color="k", marker="o", linestyle="", markersize=4, label="channel on a kept chain"))
    handles.append(Line2D([], [], color="0.75", marker="o", linestyle="", markersize=4, label="channel off the kept chains"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8)
    ax.autoscale_view()
    ax.set_xlim(-0.5, len(layers) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("conv layer (0 = model input, then graph order)")
    ax.set_ylabel("channel index (centred per layer)")
    shown = "" if total <= max_edges else f"; {max_edges:,} of {total:,} kernels drawn"
    cut = "" if len(layers) == len(graph.layers) else f"; first {len(layers)} of {len(graph.layers)} layers"
    ax.set_title(f"kept kernels ({selection.method}, keep {selection.keep_requested:g}): {selection.from_paths:,} "
                 f"on {selection.num_paths:,} chains, {selection.from_fallback:,} from the fallback\n"
                 f"pruned kernels not drawn{shown}{cut}", fontsize=10)
    fig.tight_layout()
    return [_save(fig, out_dir, name)]


def _draw_nodes(ax, graph, selection, layers, x, y) -> None:
    """Channel dots: black when the channel lies on a chain of kept kernels from an input to an output
    (alive and used after redundancy pruning), light grey otherwise."""
    nodes = np.concatenate([layer.out_nodes for layer in layers] + [np.flatnonzero(graph.input_nodes)])
    touched = selection.alive & selection.used
    size = 14 if len(nodes) < 500 else 3
    ax.scatter(x[nodes[~touched[nodes]]], y[nodes[~touched[nodes]]], s=size, color="0.75", zorder=3, linewidths=0)
    ax.scatter(x[nodes[touched[nodes]]], y[nodes[touched[nodes]]], s=size, color="k", zorder=4, linewidths=0)


# ------------------------------------------------------------------------------------------- prune


def plot_prune(result, out_dir: str, label: str | None = None, max_layers: int | None = None) -> list[str]:
    """Channels per layer and the kept chains of one PruneResult; `label` suffixes the file names."""
    suffix = f"_{label}" if label else ""
    return (plot_channels(result.report, out_dir, name=f"channels{suffix}.png")
            + plot_chains(result.graph, result.selection, out_dir, max_layers=max_layers, name=f"chains{suffix}.png"))
