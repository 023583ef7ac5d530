"""Terminal tables for `inspect`, `select` and `prune` (stdout; logs go to stderr in cli/), and the tool
versions every JSON report records. A leaf: it imports no stage, and every stage may use it."""

from __future__ import annotations


def tool_versions() -> dict:
    """Versions of lean-onnx, onnx and onnxruntime (None when it is not installed), for JSON reports."""
    import onnx

    from . import __version__

    versions = {"lean_onnx": __version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        versions["onnxruntime"] = None
    return versions


def _n(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:g}"


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def print_inspect(s: dict, verbose: bool = False) -> None:
    shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in s["input_shapes"].items())
    prunable_layers = sum(1 for layer in s["layers"] if layer["prunable"])
    rows = [
        ("model", s["model"]),
        ("input shape", shapes + (" (assumed)" if s["input_shape_assumed"] else "")),
        ("conv layers", f"{len(s['layers'])} ({prunable_layers} prunable)"),
        ("channels", _n(s["channels"])),
        ("kernels", f"{_n(s['kernels']['total'])} ({_n(s['kernels']['prunable'])} prunable)"),
        ("coverage", f"{100 * s['coverage']:.2f} %"),
        ("parameters", _si(s["params"])),
        ("MACs", f"{_si(s['flops']['macs'])} at {shapes}"),
        ("channel graph", f"{_n(s['graph']['nodes'])} nodes, {_n(s['graph']['edges'])} edges, "
                          f"{_n(s['graph']['frozen_channels'])} frozen channels "
                          f"({100 * s['graph']['frozen_share']:.2f} % of the nodes)"),
        ("coupling groups", str(len(s["coupling_groups"]))),
        ("frozen parts", str(len(s["frozen"]))),
    ]
    print(_table(rows))
    if s["frozen"]:
        print("\nfrozen:")
        for f in s["frozen"]:
            print(f"  {f['node']} ({f['op']}): {f['reason']} [{f['channels']} channels]")
    if verbose:
        print("\ncoupling groups:")
        for g in s["coupling_groups"]:
            print(f"  {g['channels']:>5} channels  {', '.join(g['reasons'])}: {', '.join(g['nodes'][:4])}"
                  + (" ..." if len(g["nodes"]) > 4 else ""))
        print("\nlayers:")
        for layer in s["layers"]:
            k = "x".join(map(str, layer["kernel_shape"]))
            print(f"  {layer['name']:<40} {layer['op']:<13} {layer['c_in']:>5} -> {layer['c_out']:<5} "
                  f"g={layer['group']:<4} {k:<5} s={layer['stride'][-1]} d={layer['dilation'][-1]} "
                  f"{_n(layer['kernels']):>10} kernels" + ("" if layer["prunable"] else "  (frozen)"))


def print_selection(r: dict, verbose: bool = False) -> None:
    k = r["kernels"]
    red = k["removed_by_redundancy"]
    rows = [
        ("model", r["model"]),
        ("method", r["method"]),
        ("kernels requested", f"{_n(k['requested'])} / {_n(k['total'])} ({100 * k['keep_requested']:.2f} %)"),
        ("kernels kept", f"{_n(k['kept'])} ({100 * k['keep_achieved']:.2f} %)"),
        ("  from paths", _n(k["from_paths"])),
        ("  from fallback", _n(k["from_fallback"])),
        ("  removed as redundant", f"{_n(red['forward'])} forward, {_n(red['backward'])} backward"),
        ("paths", f"{_n(k['paths']['count'])}, longest {k['paths']['longest_edges']} kernels "
                  f"(product {k['paths']['longest_product']:.4g})"),
        ("time", ", ".join(f"{name} {sec:.2f} s" for name, sec in r["timings_s"].items())),
    ]
    print(_table(rows))
    if verbose:
        print("\nlayers:")
        for layer in r["layers"]:
            print(f"  {layer['name']:<40} {layer['kept']:>8} / {layer['kernels']:<8}"
                  + ("" if layer["prunable"] else "  (frozen)"))


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def print_prune(r: dict, verbose: bool = False) -> None:
    """The before/after table of `lean-onnx IN OUT --keep R`."""
    k = r["kernels"]

    def ratio(before, after):
        return f"{100 * after / before:.1f} %" if before else "-"

    rows = [
        ("", "original", "pruned", "ratio"),
        ("kernels (LEAN's count)", f"{k['total']:,}", f"{k['kept']:,}", ratio(k["total"], k["kept"])),
        ("kernels in the model", f"{k['in_original_model']:,}", f"{k['in_pruned_model']:,}",
         ratio(k["in_original_model"], k["in_pruned_model"])),
        ("conv channels", f"{r['channels']['before']:,}", f"{r['channels']['after']:,}",
         ratio(r["channels"]["before"], r["channels"]["after"])),
        ("parameters", _si(r["params"]["before"]), _si(r["params"]["after"]),
         ratio(r["params"]["before"], r["params"]["after"])),
        ("MACs", _si(r["flops"]["before"]), _si(r["flops"]["after"]), ratio(r["flops"]["before"], r["flops"]["after"])),
        ("file size", _size(r["input"]["bytes"]), _size(r["output"]["bytes"]),
         ratio(r["input"]["bytes"], r["output"]["bytes"])),
    ]
    budget = r.get("budget")
    if budget:  # a budget was set: what it was set in comes first
        rows.insert(1, rows.pop(5))
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(widths[0]) if c == 0 else cell.rjust(widths[c]) for c, cell in enumerate(row)))
    shapes = ", ".join(f"{n}={'x'.join(map(str, v))}" for n, v in r["flops"]["at_input_shapes"].items())
    if budget:
        latency = (f", measured latency {budget['latency_ratio']:.3f} of the original's "
                   f"({'met' if budget['met'] else 'NOT met'}, {len(budget['search'])} timed steps)"
                   if budget["kind"] == "latency" else "")
        print(f"\nbudget: {budget['kind']} {budget['target']:g}, method {r['method']} at channel granularity "
              f"(every prunable layer keeps >= {budget['min_channels']:g} of its channels; allocated by "
              f"{budget['allocate']}): MACs "
              f"{budget['achieved_macs_ratio']:.3f} of the original's{latency}; {k['kept']:,} kernels kept")
    else:
        print(f"\nmethod {r['method']}: requested {k['requested']:,} kernels ({100 * r['keep_requested']:.2f} %), "
              f"kept "
              f"{k['kept']:,} ({100 * k['keep_achieved']:.2f} %): {k['from_paths']:,} from {k['paths']['count']:,} "
              f"paths (longest {k['paths']['longest_edges']}), {k['from_fallback']:,} from the fallback; "
              f"{sum(k['removed_by_redundancy'].values()):,} removed as redundant")
    if r.get("residual_sums_bypassed"):
        print(f"{len(r['residual_sums_bypassed'])} residual branches removed whole (y = x + f(x) became y = x, "
              "or y = x + c where f left a constant c)"
              + (f" of the {r['budget']['branches']} that --drop-blocks {r['budget']['drop_blocks']:g} could remove"
                 if budget and "branches" in budget else ""))
    print(f"MACs at {shapes}; time " + ", ".join(f"{n} {t:.2f} s" for n, t in r["timings_s"].items()))
    if r["channels"]["dead_nonzero_bias"]:
        fate = ("they keep that constant (--fold-constants)" if r.get("fold_constants") else
                "the masked model defines them as zero (DESIGN.md section 2; --fold-constants keeps the constant)")
        print(f"{r['channels']['dead_nonzero_bias']} kept channels lost every input kernel and had a non-zero bias: "
              + fate)
    extra = [f"{r[key]} {what}" for key, what in (("head_channels_dropped", "constant channels left a linear head"),
                                                   ("gathers_inserted", "convs read their input through a Gather"),
                                                   ("concat_inputs_dropped", "Concat inputs dropped"),
                                                   ("concat_reads_merged", "repeated Concat reads merged into the "
                                                    "convs after them"))
             if r.get(key)]
    if extra:
        print("; ".join(extra))
    if verbose:
        print()
        for layer in r["layers"]:
            print(f"  {layer['name']:<44} {layer['op']:<13} channels {layer['channels']['before']:>5} -> "
                  f"{layer['channels']['after']:<5} kernels {layer['kernels']['kept']:>8} / {layer['kernels']['total']}")
