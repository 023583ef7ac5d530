"""`lean-onnx inspect MODEL` (the channel graph, coverage, coupling, frozen parts, cost) and
`lean-onnx select MODEL --keep R` (which kernels the selection keeps, without writing a model)."""

from __future__ import annotations

import time

from .options import common_args, emit, explain_selection, make_pruner, model_args, selection_args


def register(sub) -> None:
    p = sub.add_parser("inspect", help="channel graph, prunable kernels, coupling groups, frozen parts, FLOPs")
    model_args(p)
    common_args(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("select", help="run LEAN (or a baseline) and report which kernels it keeps")
    model_args(p)
    selection_args(p, model=False)
    common_args(p)
    p.set_defaults(func=cmd_select)


def cmd_inspect(args) -> int:
    from ..graph.summary import inspect_summary
    from ..report import print_inspect

    pruner = make_pruner(args, norms=False)
    summary = inspect_summary(pruner.graph)
    summary["timings_s"] = pruner.timings
    return emit(summary, args, print_inspect)


def cmd_select(args) -> int:
    from ..report import print_selection
    from ..select.selection import check_keep, select_kernels

    check_keep(args.keep)
    pruner = make_pruner(args)
    graph, timings = pruner.graph, pruner.timings
    start = time.perf_counter()
    selection = select_kernels(graph, args.keep, args.method, redundancy=not args.no_redundancy,
                               keep_connected=args.keep_connected)
    timings["select"] = time.perf_counter() - start
    explain_selection(selection)
    layers = [{"name": layer.name, "kernels": layer.num_kernels, "kept": int(selection.layer_mask(layer).sum()),
               "prunable": layer.prunable} for layer in graph.layers]
    result = {"model": args.model, "method": args.method, "kernels": selection.stats(), "layers": layers,
              "timings_s": timings}
    return emit(result, args, print_selection)
