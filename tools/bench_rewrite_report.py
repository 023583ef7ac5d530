"""The markdown section of tools/bench_rewrite.py: turns its measurements into the tables and notes of
docs/benchmarks.md (with the machine, the git state and the command line they were taken with)."""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADING = "## Pruned vs original (tools/bench_rewrite.py)"
MODELS = ("resnet50", "mobilenet_v2", "msd", "unet4")
STAGES = ("load", "graph", "norms", "select", "rewrite", "check", "save")


def parse_config(text: str) -> tuple[int, bool]:
    """'2' -> 2 threads, all graph optimisations; '1e' -> 1 thread, ORT_ENABLE_EXTENDED (no NCHWc layout)."""
    return int(text.rstrip("e")), not text.endswith("e")


def config_label(text: str) -> str:
    threads, layout = parse_config(text)
    return f"{threads}T" + ("" if layout else " no-NCHWc")


def fmt_m(x: float) -> str:
    if x < 1e5:
        return f"{x:,.0f}"
    return f"{x / 1e9:.2f} G" if x >= 1e9 else f"{x / 1e6:.2f} M"


def git_state() -> str:
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "lean_onnx")
    return head + (" with uncommitted changes in lean_onnx/" if dirty else "")


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def lay_s(lay: dict) -> str:
    return f"{lay.get('nchwc_convs', '?')}/{lay.get('nchw_convs', '?')} with {lay.get('reorders', '?')} reorder nodes"


def command_line(args) -> str:
    cmd = "python tools/bench_rewrite.py"
    for flag, key, default in (("--repeats", "repeats", 5), ("--models", "models", ",".join(MODELS)),
                               ("--keeps", "keeps", "0.5,0.1,0.02"), ("--configs", "configs", "2,1,1e"),
                               ("--rounds", "rounds", 20), ("--warmup", "warmup", 3), ("--budget-s", "budget_s", 12.0)):
        if getattr(args, key) != default:
            cmd += f" {flag} {getattr(args, key)}"
    return cmd + " --write docs/benchmarks.md"


def render(e2e: dict | None, models: list[dict], args, meta: dict) -> str:
    import numpy
    import onnx
    import onnxruntime

    configs = args.configs.split(",")
    lines = [
        HEADING, "",
        f"Command: `{command_line(args)}` (took {meta['elapsed_s'] / 60:.1f} min).",
        "",
        f"Machine: {os.cpu_count()} shared cores ({cpu_name()}, AVX-512: NCHWc block {args.block}), no GPU; "
        f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__} (CPUExecutionProvider), "
        f"onnx {onnx.__version__}, numpy {numpy.__version__}; lean-onnx at {meta.get('git', '?')}. Load average (1/5/15 min) at start "
        f"{meta['load_start']}, at end {meta['load_end']}: other jobs shared the two cores, so every figure "
        "is a median under noise and only the ratios between variants timed in the same rounds are robust.",
        "",
    ]
    obs = []
    if e2e is not None:
        st = e2e["stages_s"]
        lines += [
            f"### End to end: `lean-onnx IN OUT --keep {args.e2e_keep}` on ResNet-50",
            "",
            f"ResNet-50, random weights, BN folded, 1x3x224x224: `{e2e['command']}`, each run a fresh process, "
            f"medians of {len(e2e['runs'])} runs. Target: at most 3 s.",
            "",
            "| wall s (min-max) | " + " | ".join(STAGES) + " | outside stages | python + imports | peak RSS MB |",
            "|" + "---|" * (len(STAGES) + 4),
            f"| **{e2e['wall_s']:.2f}** ({e2e['wall_min_s']:.2f}-{e2e['wall_max_s']:.2f}) | "
            + " | ".join(f"{st[s]:.2f}" for s in STAGES)
            + f" | {e2e['outside_stages_s']:.2f} | {e2e.get('imports_s', float('nan')):.2f} | {e2e['rss_mb']:.0f} |",
            "",
            "*outside stages* = wall time minus the report's `timings_s`: interpreter start, imports, the two "
            "sha256 of the report, printing. *python + imports* = a separate fresh `python -c \"import "
            "lean_onnx.cli, lean_onnx.rewrite.pruner, lean_onnx.select.selection\"` (onnx, numpy, numba), timed in the same loop. "
            "Each column is its own median.",
            "",
        ]
        load_to_save = sum(st[k] for k in ("load", "graph", "norms", "select", "rewrite", "check", "save"))
        verdict = "within" if load_to_save <= 3.0 else "over"
        obs.append(
            f"End to end, `lean-onnx IN OUT --keep {args.e2e_keep}` on ResNet-50: the stages from load to save add "
            f"up to {load_to_save:.2f} s ({', '.join(f'{k} {st[k]:.2f}' for k in ('load', 'graph', 'norms', 'select', 'rewrite', 'check', 'save'))}; "
            f"medians), {verdict} the 3 s target for load to save; the whole process takes {e2e['wall_s']:.2f} s "
            f"(median, min {e2e['wall_min_s']:.2f} s) with Python start-up and imports "
            f"({e2e.get('imports_s', float('nan')):.2f} s measured apart) and the report's sha256 hashes on top.")
    head_cells = ["model", "variant", "kernels kept (LEAN)", "kernels in model", "params", "MACs", "theor. x",
                  "convs NCHWc/NCHW, reorders"]
    for c in configs:
        head_cells += [f"ORT {config_label(c)} ms, median (p90)", f"x {config_label(c)}"]
    lines += [
        "### Size, MACs and ONNX Runtime latency",
        "",
        f"BN folded, random weights, method lean, batch 1; msd and unet4 at 256x256, the others 224x224. "
        "Latency: ONNX Runtime CPU, one session per variant, `inter_op_num_threads` 1, sequential, thread "
        "spinning off (an idle spinning pool would steal the cores from the next session of the round); "
        f"`NT` = `intra_op_num_threads` N with all graph optimisations (the default); `no-NCHWc` = "
        f"`ORT_ENABLE_EXTENDED`, i.e. without the NCHWc layout transformer. {args.warmup} warm-up rounds, then "
        f"at least {args.rounds} timed rounds (more for fast models, up to ~{args.budget_s:.0f} s per model "
        "and config); all variants of a model run round-robin in each round, order rotated. "
        "*x* = median(original) / median(pruned), the measured speed-up; *theor. x* = MACs(original) / "
        "MACs(pruned). *kernels kept* = LEAN's selection after redundancy pruning; *kernels in model* = "
        "c_out x c_in/group summed over the written model's convs: a kernel leaves the dense model only "
        "when its whole output or input channel goes. *convs NCHWc/NCHW, reorders* = in the graph ORT "
        "optimises and runs (default level, written with `optimized_model_filepath`): convs in the blocked "
        f"NCHWc layout (block {args.block} channels) / convs left in plain NCHW, and the layout reorder nodes "
        "between them. `=` = the written model has exactly the original's shapes (no channel removed): an A/A test of the timing. ‡ = the pruned model's output does not depend on its input (two random inputs "
        "give identical outputs).",
        "",
        "| " + " | ".join(head_cells) + " |",
        "|" + "---|" * len(head_cells),
    ]
    slower, constant, realised, unphysical, same, lost_layout = [], [], [], [], [], []
    for m in models:
        if "error" in m:
            lines.append(f"| {m['model']} | **error** | {m['error']} |" + " |" * (len(head_cells) - 3))
            obs.append(f"{m['model']}: the pruner failed: {m['error']}.")
            continue
        o = m["original"]
        lat = {x["config"]: x["variants"] for x in m.get("latency", [])}
        variants = [("original", None)] + [(f"keep {k}", m["keeps"][str(k)]) for k in args.keep_list]
        for label, e in variants:
            if e is not None and ("error" in e or "ort_error" in e):
                err = e.get("error") or e.get("ort_error")
                lines.append(f"| {m['model']} | {label} | **error**: {err} |" + " |" * (len(head_cells) - 3))
                obs.append(f"{m['model']} {label}: {'pruner' if 'error' in e else 'ONNX Runtime'} error: {err}.")
                continue
            lay = (e or o).get("layout", {})
            if e is None:
                cells = [f"{o.get('lean_kernels', 0):,}", f"{o['kernels_in_model']:,}", fmt_m(o.get("params", 0)),
                         fmt_m(o.get("macs", 0)), "1.00"]
            else:
                k = e["kernels"]
                theor = e["flops"]["before"] / max(e["flops"]["after"], 1)
                cells = [f"{k['kept']:,} ({100 * k['keep_achieved']:.1f} %)",
                         f"{k['in_pruned_model']:,} ({100 * k['in_pruned_model'] / o['kernels_in_model']:.1f} %)",
                         f"{fmt_m(e['params']['after'])} ({100 * e['params']['after'] / e['params']['before']:.1f} %)",
                         f"{fmt_m(e['flops']['after'])} ({100 * e['flops']['after'] / e['flops']['before']:.1f} %)",
                         f"{theor:.2f}"]
                identical = (k["in_pruned_model"] == o["kernels_in_model"] and e["params"]["after"] == e["params"]["before"]
                             and e["flops"]["after"] == e["flops"]["before"])
                if identical:
                    label += " =" if not e.get("constant_output") else ""
                if e.get("constant_output"):
                    label += " ‡"
                    constant.append(f"{m['model']} {label[:-2]} ({k['kept']:,} kernels kept, "
                                    f"{k['in_pruned_model']:,} in the model, {fmt_m(e['params']['after'])} params left)")
                if k["in_pruned_model"] > 1.5 * k["kept"] and not e.get("constant_output"):
                    unphysical.append(f"{m['model']} {label.rstrip(' =')} {100 * k['keep_achieved']:.1f} % -> "
                                      f"{100 * k['in_pruned_model'] / o['kernels_in_model']:.1f} %")
                if (lay.get("nchw_convs", 0) > o.get("layout", {}).get("nchw_convs", 0) and "1" in configs
                        and "1e" in configs and not e.get("constant_output")):
                    lost_layout.append((m["model"], label.rstrip(" ="), lay, o["layout"]))
            cells.append(f"{lay.get('nchwc_convs', '?')}/{lay.get('nchw_convs', '?')}, {lay.get('reorders', '?')}")
            for c in configs:
                v = lat.get(c, {}).get(label.rstrip(" ‡="))
                if v is None:
                    cells += ["-", "-"]
                    continue
                cells += [f"{v['median_ms']:.1f} ({v['p90_ms']:.1f})", "-" if e is None else f"**{v['speedup']:.2f}**"]
                if e is not None and identical:
                    same.append((f"{m['model']} {label.rstrip(' =')}", f"{v['speedup']:.2f} ({config_label(c)})"))
                elif e is not None and v["speedup"] < 0.95:
                    slower.append((m["model"], label.rstrip(" ‡"), c, v["speedup"], theor, lay, o.get("layout", {})))
            if e is not None and not e.get("constant_output") and configs[0] in lat:
                key = label.rstrip(" =")
                realised.append(f"{m['model']} {key} {lat[configs[0]][key]['speedup']:.2f}/{theor:.2f}")
            lines.append(f"| {m['model']} | {label} | " + " | ".join(cells) + " |")
    lines += [""]
    rounds = ", ".join(f"{m['model']} " + "/".join(str(x["rounds"]) for x in m.get("latency", []))
                       for m in models if "error" not in m)
    lines += [f"Timed rounds per model ({'/'.join(config_label(c) for c in configs)}): {rounds}."]
    diffs = [(m["model"], k, e.get("masked_rel_diff")) for m in models for k, e in m.get("keeps", {}).items()
             if e.get("masked_rel_diff") is not None]
    if diffs:
        worst = max(diffs, key=lambda x: x[2])
        lines += [f"Contract check, pruned(x) vs masked(x) on one random input: worst relative difference "
                  f"{worst[2]:.1e} ({worst[0]}, keep {worst[1]})."]
    prune_t = ", ".join(
        f"{m['model']} {m['analysis_s']:.1f} + " + "/".join(f"{e['prune_s']:.1f}" for e in m["keeps"].values()
                                                            if "prune_s" in e)
        for m in models if "analysis_s" in m)
    lines += [f"In-process pruning time, s (`Pruner` analysis once + `prune` per keep): {prune_t}.", ""]

    if realised:
        obs.append(f"Measured / theoretical speed-up ({config_label(configs[0])}, models whose output still "
                   "depends on the input): " + "; ".join(realised) + ".")
    if unphysical:
        obs.append("Kernel sparsity that the dense rewrite cannot remove (kept by LEAN -> still in the written "
                   "model): " + "; ".join(unphysical) + ". LEAN's fallback keeps kernels scattered over almost every "
                   "channel, and a Conv only shrinks when a whole output or input channel goes; the other pruned "
                   "kernels stay as zeros in the dense weights and cost full MACs.")
    if lost_layout:
        items = []
        for model, label, lay, lay0 in lost_layout:
            lat = {x["config"]: x["variants"] for m in models if m["model"] == model for x in m.get("latency", [])}
            items.append(f"{model} {label} ({lay['nchwc_convs']}/{lay['nchw_convs']} vs {lay0['nchwc_convs']}/"
                         f"{lay0['nchw_convs']}): x {lat['1'][label]['speedup']:.2f} at 1T vs "
                         f"{lat['1e'][label]['speedup']:.2f} without NCHWc")
        obs.append("Variants with more convs left in plain NCHW than the original (NCHWc/NCHW, pruned vs original) and their 1T speed-up with and "
                   "without the layout optimisation: " + "; ".join(items) + ". Where the second figure is clearly "
                   "higher, the pruned channel counts cost the blocked layout what the MACs cut gained.")
    if slower:
        parts, seen = [], {}
        for model, label, c, sp, theor, off, off0 in slower:
            seen.setdefault((model, label), []).append((c, sp, theor, off, off0))
        for (model, label), hits in seen.items():
            lat = {x["config"]: x["variants"] for m in models if m["model"] == model for x in m.get("latency", [])}
            plain = [f"{config_label(k)} x {lat[k][label]['speedup']:.2f}" for k in lat
                     if not parse_config(k)[1] and label in lat[k]]
            _, _, theor, off, off0 = hits[0]
            parts.append(f"{model} {label}: " + ", ".join(f"x {sp:.2f} at {config_label(c)}" for c, sp, *_ in hits)
                         + f" for theor. x {theor:.2f}; NCHWc/NCHW convs {lay_s(off)} vs {lay_s(off0)} in the "
                         "original" + (f" (same variant {', '.join(plain)})"
                                       if plain and all(parse_config(c)[1] for c, *_ in hits) else ""))
        lost = any(h[0][3].get("nchwc_convs", 0) < h[0][4].get("nchwc_convs", 0) for h in seen.values())
        obs.append("**Pruned slower than the original** (x < 0.95): " + "; ".join(parts) + "." + (
                   f" Removing a few channels leaves counts that are not multiples of {args.block} (e.g. 384 -> "
                   "379), so ORT's NCHWc transformer leaves those convs on the plain NCHW kernels and inserts "
                   "layout reorders around them: the original runs almost entirely in the blocked layout, the "
                   "pruned model falls out of it. The no-NCHWc figures in brackets time both with the same "
                   "plain NCHW kernels: where they are near or above 1, the layout, not the pruning, costs the "
                   "time." if lost else ""))
    if same:
        groups: dict = {}
        for key, text in same:
            groups.setdefault(key, []).append(text)
        obs.append("A/A (`=`, the written model has the original's shapes, so any difference is noise): "
                   + "; ".join(f"{k}: x {', '.join(v)}" for k, v in groups.items())
                   + ". That is the noise floor of these ratios on this machine.")
    if "1" in configs and "1e" in configs:
        worse = []
        for m in models:
            lat = {x["config"]: x["variants"] for x in m.get("latency", [])}
            if "original" in lat.get("1", {}) and "original" in lat.get("1e", {}):
                a, b = lat["1"]["original"]["median_ms"], lat["1e"]["original"]["median_ms"]
                worse.append((m["model"], a, b))
        gains = ", ".join(f"{n} {b / a:.2f}" for n, a, b in worse)
        obs.append(f"NCHWc layout gain on the originals (1T no-NCHWc / 1T): {gains}."
                   + "".join(f" For {n} the default level is *slower* than `ORT_ENABLE_EXTENDED` ({a:.0f} vs "
                             f"{b:.0f} ms), pruner aside: probably its convs have too few channels for the blocked "
                             "layout to pay for the reorders ORT inserts (see the reorders column)." for n, a, b in worse if a > 1.1 * b))
    if "2" in configs and "1" in configs:
        ratio = [(m["model"], lat["1"]["original"]["median_ms"] / lat["2"]["original"]["median_ms"])
                 for m in models if "latency" in m
                 for lat in [{x["config"]: x["variants"] for x in m["latency"]}]]
        obs.append("Two threads vs one, originals (median 1T / median 2T, 2 would be perfect scaling): "
                   + ", ".join(f"{n} {r:.2f}" for n, r in ratio) + "."
                   + (" The second core is shared with other jobs, so 2T gains little or loses."
                      if all(r < 1.2 for _, r in ratio) else ""))
    if constant:
        obs.append("‡ Degenerate results: " + "; ".join(constant) + ". With random weights LEAN finds few or "
                   "no chains with a norm product >= 1, the individual-norm fallback picks scattered kernels, "
                   "and redundancy pruning (no kept input -> remove; feeds nothing -> remove) then cuts every "
                   "input-to-output path: the model computes a constant from the biases. What the rewrite does not shrink stays "
                   "(the params left, e.g. a classifier Gemm fed by constant channels). Its latency (and its "
                   "huge 'speed-up') measures an almost empty graph, not a usable network.")
    if obs:
        lines += ["### Observations", ""] + [f"* {x}" for x in obs] + [""]
    lines += STATIC_NOTES
    return "\n".join(lines) + "\n"


STATIC_NOTES = [
    "Why MACs and latency part ways, in general:",
    "",
    "* Much of ONNX Runtime's CPU speed on wide convs comes from the NCHWc blocked layout (compare the `1T` and "
    "`1T no-NCHWc` columns of the originals). Channel counts that stop being multiples of the block push "
    "convs off that path, so a model with fewer MACs can run slower; rounding kept channels to the block "
    "(or to 8/16) would preserve it.",
    "* MACs follow resolution, not kernel counts: kernels at full resolution (U-Net's first and last "
    "stages, MS-D's every layer) weigh far more than those at 7x7, so the share of kernels and the share of "
    "MACs kept can differ widely.",
    "* Depthwise 3x3 convs and 1x1 convs on small feature maps are memory-bound: removing channels there "
    "saves bandwidth more than arithmetic, so MACs overstate the gain (MobileNet-V2 is built from them).",
    "* Layers the pruner does not touch (first conv, 1x1 heads, the classifier Gemm, pooling, Add/Concat) "
    "and ORT's fixed per-run and per-node costs set a floor: a pruned graph with the same nodes cannot go "
    "below it, which caps the speed-up of small or fast models.",
    "",
]
