"""`lean-onnx sweep IN --keep 0.5,0.2,0.05,0.01 --out-dir D`: one model per keep, and their Pareto table.

Choosing a keep is a trade of latency against error, and both are only known after pruning. A sweep
builds the channel graph and the operator norms once (one `Pruner`), prunes to every keep, writes each
model atomically to `D/<stem>_keep<keep>.onnx`, checks it against its masked model (DESIGN.md section 2:
a mismatch is a lean-onnx bug, exit 1), measures its error against the original on the same inputs and
times it with `bench.benchmark` (the original is timed once). A row is on the Pareto front when no other
model (the original included) is both at least as fast and at least as accurate, one of them strictly.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import LeanOnnxError
from ..report import _si, tool_versions
from ..select.budget import DEFAULT_ALLOCATE
from .bench import _size

SCHEMA_VERSION = 1
DEFAULT_KEEPS = "0.5,0.2,0.05,0.01"


class ContractBroken(LeanOnnxError):
    """pruned != masked for some keep: a lean-onnx bug, so exit 1 like any other internal error."""

    exit_code = 1


@dataclass
class TimingOptions:
    """How latency is measured; `None` in place of this object means no timing (`--no-bench`)."""

    provider: str = "auto"
    threads: int = 2
    runs: int = 20
    warmup: int = 5


@dataclass
class SweepResult:
    report: dict
    results: list = field(default_factory=list)  # PruneResults, only with keep_results=True (memory)


def parse_keeps(text: str, flag: str = "--keep") -> list[float]:
    """`0.5,0.2,0.05` -> [0.5, 0.2, 0.05]; each in (0, 1], no repeats (they would share a file name)."""
    from ..select.budget import check_fraction
    from ..select.selection import check_keep

    keeps = []
    for item in str(text).split(","):
        try:
            keep = float(item.strip())
        except ValueError:
            raise LeanOnnxError(f"{flag} {text!r}: expected comma-separated fractions such as 0.5,0.2,0.05") from None
        if not math.isfinite(keep):
            raise LeanOnnxError(f"{flag} {text!r}: {item.strip()} is not a finite number")
        check_keep(keep) if flag == "--keep" else check_fraction(keep, flag)
        if keep_label(keep) in {keep_label(k) for k in keeps}:
            raise LeanOnnxError(f"{flag} {text!r}: {keep:g} appears twice")
        keeps.append(keep)
    return keeps


def keep_label(keep: float, kind: str = "keep") -> str:
    return f"{kind}{keep:g}"


def output_paths(model_path: str, keeps: list[float], out_dir: str, kind: str = "keep") -> list[str]:
    """`D/<stem>_keep<keep>.onnx` per keep (`D/<stem>_macs<target>.onnx` per MACs target); refuses a name
    that is the input file itself."""
    stem = os.path.splitext(os.path.basename(model_path))[0] or "model"
    paths = [os.path.join(out_dir, f"{stem}_{keep_label(k, kind)}.onnx") for k in keeps]
    source = os.path.realpath(model_path)
    for path in paths:
        if os.path.realpath(path) == source:
            raise LeanOnnxError(f"{path}: would overwrite the input; lean-onnx never overwrites its input "
                                "(choose another --out-dir)")
    return paths


def make_folder(path: str, flag: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise LeanOnnxError(f"{path}: {flag} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise LeanOnnxError(f"{path}: cannot create {flag} ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK):
        raise LeanOnnxError(f"{path}: {flag} is not writable")


# ------------------------------------------------------------------------------------- measuring


class Fidelity:
    """Errors of each pruned model against the original and its masked model on fixed inputs; the
    original's outputs are computed once for the whole sweep."""

    def __init__(self, original, input_shapes: dict, samples: int, data: str | None, threads: int):
        from ..rewrite.contract import session
        from .validate import validation_inputs

        self.threads = threads
        self.feeds = validation_inputs(original, input_shapes, samples, 0, data)
        self.reference = self._run(session(original, threads))

    def _run(self, sess) -> list[np.ndarray]:
        runs = [sess.run(None, f) for f in self.feeds]
        return [np.concatenate([r[i] for r in runs]) if runs[0][i].ndim else np.stack([r[i] for r in runs])
                for i in range(len(runs[0]))]

    def measure(self, pruned_bytes: bytes, masked) -> dict:
        import onnx

        from ..rewrite.contract import masked_error, session, with_logits
        from .validate import argmax_agreement, output_errors, task_of

        pruned_view, logits = with_logits(onnx.load_from_string(pruned_bytes))
        pruned = self._run(session(pruned_view, self.threads))
        masked_out = self._run(session(with_logits(masked)[0], self.threads))
        count = len(self.reference)
        result = {"max_rel_err_vs_original": max(output_errors(a, b)["max_rel"] for a, b in zip(self.reference, pruned)),
                  "max_rel_err_vs_masked": masked_error(masked_out, pruned, logits, count)}
        for ref, out in zip(self.reference, pruned):
            task = task_of(ref)
            if task:
                key = "top1_agreement" if task == "classification" else "pixel_agreement"
                result[key] = argmax_agreement(ref, out)
                break
        return result


def time_models(models: list, input_shapes: dict, timing: TimingOptions | None, log) -> list[dict | None]:
    """Median and p90 latency of every model (the original first), all timed together in paired rounds
    (bench.paired_benchmark): each pruned model's speed-up is then a ratio of the same rounds. Timing the
    original first and every pruned model after its pruning, as until session 21, compared timings minutes
    apart on a shared machine whose load comes and goes (docs/budgets.md, "How speed is measured")."""
    from .bench import paired_benchmark

    if timing is None:
        return [None] * len(models)
    entries = paired_benchmark(models, provider=timing.provider, input_shapes=input_shapes, threads=timing.threads,
                               runs=timing.runs, warmup=timing.warmup)
    for w in dict.fromkeys(w for e in entries for w in e["warnings"]):
        log("W", w)
    return [{"median": e["latency_ms"]["median"], "p90": e["latency_ms"]["p90"], "provider": e["provider"]}
            for e in entries]


# ----------------------------------------------------------------------------------------- sweep


def sweep(source, keeps: list[float], out_dir: str, *, exclude=(), input_shapes=None, norm_grid=None,
          **options) -> SweepResult:
    """One-shot form: build one Pruner for `source` (path or ModelProto), then `run_sweep`."""
    from ..rewrite.pruner import Pruner

    pruner = Pruner(source, exclude=exclude, input_shapes=input_shapes, norm_grid=norm_grid)
    return run_sweep(pruner, keeps, out_dir, **options)


def run_sweep(pruner, keeps: list[float], out_dir: str, *, method: str = "lean", round_channels: int = 16,
              fold_constants: bool = False, gather_below: float = 0.75, timing: TimingOptions | None = None,
              samples: int = 4, data: str | None = None, plot_dir: str | None = None,
              keep_results: bool = False, log=None, target_macs: bool = False,
              min_channels: float = 0.1, allocate: str = DEFAULT_ALLOCATE,
              drop_blocks: float | None = None) -> SweepResult:
    """Prune `pruner`'s model to every keep (graph and norms are already built: never rebuilt here),
    write the models, measure them and return the report; `log(level, message)` receives progress.
    `target_macs`: the values of `keeps` are MACs budgets (`--target-macs`, channel granularity)."""
    from ..io.save import save_model_atomic

    log = log or (lambda level, msg: None)
    source_path = pruner.loaded.path
    kind = "macs" if target_macs else "keep"
    paths = output_paths(source_path, keeps, out_dir, kind)
    make_folder(out_dir, "--out-dir")
    timings = dict(pruner.timings)
    start = time.perf_counter()
    original_source = source_path if os.path.isfile(source_path) else pruner.loaded.original
    shapes = pruner.loaded.input_shapes
    fidelity = Fidelity(pruner.loaded.original, shapes, samples, data, timing.threads if timing else 2)
    original = {"path": source_path, "params": pruner.cost_before["params"], "macs": pruner.cost_before["macs"],
                "file_bytes": os.path.getsize(source_path) if os.path.isfile(source_path) else
                len(pruner.loaded.original.SerializeToString()),
                "kernels": int(pruner.graph.prunable_edges.sum()), "latency_ms": None}
    timings["original"] = time.perf_counter() - start
    rows, results, plots = [], [], []
    for keep, path in zip(keeps, paths):
        start = time.perf_counter()
        options = dict(masked=True, round_channels=round_channels, fold_constants=fold_constants,
                       gather_below=gather_below)
        if target_macs:
            result = pruner.prune(target_macs=keep, method=method, min_channels=min_channels, allocate=allocate,
                                  drop_blocks=drop_blocks, **options)
        else:
            result = pruner.prune(keep, method, **options)
        save_model_atomic(result.model_bytes, path)
        row = sweep_row(result, path, fidelity.measure(result.model_bytes, result.masked))
        if target_macs:
            row["target_macs"] = keep
        if plot_dir:
            from .plots import plot_prune

            plots += plot_prune(result, plot_dir, label=keep_label(keep, kind))
        row["time_s"] = time.perf_counter() - start
        rows.append(row)
        log("I", describe_row(row))
        if not row["inputs_reach_outputs"]:
            log("W", f"{kind} {keep:g}: no chain of kept kernels leads from the inputs to the outputs (layer "
                     "collapse): that model computes a constant")
        if keep_results:
            results.append(result)
    timings["keeps"] = sum(r["time_s"] for r in rows)
    start = time.perf_counter()
    latencies = time_models([original_source] + paths, shapes, timing, log)
    original["latency_ms"] = latencies[0]
    for row, latency in zip(rows, latencies[1:]):
        row["latency_ms"] = latency
        row["speedup"] = speedup_of(original, latency)
    if timing is not None:
        timings["latency"] = time.perf_counter() - start
        log("I", f"timed the original and the {len(rows)} pruned models together in paired rounds: " + ", ".join(
            f"{keep_label(row.get('target_macs', row['keep_requested']), kind)} {row['speedup']:.2f}x"
            for row in rows))
    mark_pareto(rows, original)
    if plot_dir:
        from .plots import plot_sweep

        plots = plot_sweep(rows, plot_dir, original=original) + plots
    report = {"schema_version": SCHEMA_VERSION, "tool": tool_versions(), "input": {"path": source_path},
              "method": method, "keeps_requested": None if target_macs else list(keeps),
              "target_macs": list(keeps) if target_macs else None, "out_dir": out_dir,
              "options": {"round_channels": round_channels, "fold_constants": fold_constants,
                          "gather_below": gather_below, "samples": samples, "data": data,
                          "timing": None if timing is None else vars(timing)},
              "input_shapes": {k: list(v) for k, v in shapes.items()},
              "graph_builds": 1,  # this sweep made one Pruner: one graph build and one norm pass for all keeps
              "timings_s": timings, "pareto_axes": [cost_axis(rows), "max_rel_err_vs_original"],
              "original": original, "rows": rows, "failures": contract_failures(rows), "plots": plots}
    return SweepResult(report, results)


def sweep_row(result, path: str, errors: dict) -> dict:
    """One keep's row; its latency and speed-up come later, when all models are timed together."""
    r = result.report
    k = r["kernels"]
    return {"keep_requested": r["keep_requested"], "keep_achieved": k["keep_achieved"],
            "macs_ratio": r["flops"]["after"] / r["flops"]["before"] if r["flops"]["before"] else 1.0,
            "kernels": {"kept": k["kept"], "total": k["total"], "from_paths": k["from_paths"],
                        "from_fallback": k["from_fallback"]},
            "channels": r["channels"]["after"], "params": r["params"]["after"], "macs": r["flops"]["after"],
            "file_bytes": os.path.getsize(path), "path": path, "latency_ms": None, "speedup": None,
            **errors, "inputs_reach_outputs": r["inputs_reach_outputs"], "pareto": False}


def speedup_of(original: dict, latency: dict | None) -> float | None:
    """The original's median latency over this model's (None when either was not timed)."""
    if latency and original["latency_ms"] and latency["median"] > 0:
        return original["latency_ms"]["median"] / latency["median"]
    return None


def cost_axis(rows: list[dict]) -> str:
    """Latency when every model was timed, else MACs (`--no-bench`)."""
    return "latency_ms" if all(r["latency_ms"] for r in rows) else "macs"


def _cost(entry: dict, axis: str) -> float:
    return entry["latency_ms"]["median"] if axis == "latency_ms" else entry["macs"]


def mark_pareto(rows: list[dict], original: dict) -> None:
    """`pareto` = no other model (the original, error 0, included) is at least as good in cost and
    error and better in one: a pruned model slower than the original is never worth shipping."""
    axis = cost_axis(rows)
    points = [(_cost(r, axis), r["max_rel_err_vs_original"]) for r in rows]
    if axis == "macs" or original["latency_ms"]:
        points.append((_cost(original, axis), 0.0))
    def dominated(cost: float, err: float) -> bool:
        return any(c <= cost and e <= err and (c < cost or e < err) for c, e in points)

    for row, (cost, err) in zip(rows, points):
        row["pareto"] = not dominated(cost, err)
    original["pareto"] = len(points) > len(rows) and not dominated(*points[-1])


def contract_failures(rows: list[dict]) -> list[str]:
    from ..rewrite.contract import RTOL

    return [f"keep {r['keep_requested']:g}: pruned != masked, max relative error {r['max_rel_err_vs_masked']:.3g} "
            f"> {RTOL:g} (a lean-onnx bug: please report)" for r in rows if not r["max_rel_err_vs_masked"] <= RTOL]


# ----------------------------------------------------------------------------------------- table


def describe_row(row: dict) -> str:
    timing = (f", {row['latency_ms']['median']:.3f} ms ({row['speedup']:.2f}x)"
              if row["latency_ms"] and row["speedup"] else "")
    return (f"keep {row['keep_requested']:g}: {row['kernels']['kept']:,} kernels ({100 * row['keep_achieved']:.2f} %), "
            f"wrote {row['path']} ({_size(row['file_bytes'])}){timing}, error vs original "
            f"{row['max_rel_err_vs_original']:.3g}")


COLUMNS = (("keep", lambda r: f"macs {r['target_macs']:g}" if "target_macs" in r else f"{r['keep_requested']:g}"),
           ("achieved", lambda r: f"{100 * r['keep_achieved']:.2f} %"),
           ("kernels", lambda r: f"{r['kernels']['kept']:,}"),
           ("params", lambda r: _si(r["params"])),
           ("MACs", lambda r: f"{_si(r['macs'])} ({100 * r.get('macs_ratio', 1.0):.1f} %)"),
           ("file", lambda r: _size(r["file_bytes"])),
           ("median ms", lambda r: f"{r['latency_ms']['median']:.3f}" if r["latency_ms"] else "-"),
           ("speedup", lambda r: f"{r['speedup']:.2f}x" if r.get("speedup") else "-"),
           ("err vs original", lambda r: f"{r['max_rel_err_vs_original']:.3g}"),
           ("pareto", lambda r: "*" if r["pareto"] else ""))


def print_sweep(report: dict) -> None:
    """The Pareto table: the original first, then one row per keep in the requested order."""
    o = report["original"]
    original = {"keep_requested": 1.0, "keep_achieved": 1.0, "kernels": {"kept": o["kernels"]}, "params": o["params"],
                "macs": o["macs"], "file_bytes": o["file_bytes"], "latency_ms": o["latency_ms"],
                "speedup": 1.0 if o["latency_ms"] else None, "max_rel_err_vs_original": 0.0,
                "pareto": o.get("pareto", False)}
    rows = [[name for name, _ in COLUMNS], [cell(original) for _, cell in COLUMNS]]
    rows[1][0] = "original"
    rows += [[cell(r) for _, cell in COLUMNS] for r in report["rows"]]
    widths = [max(len(r[c]) for r in rows) for c in range(len(COLUMNS))]
    for r in rows:
        print("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))))
    timing = report["options"]["timing"]
    when = (f"{timing['provider']} ({report['original']['latency_ms']['provider']}), {timing['threads']} threads, "
            f"median of at least {timing['runs']} runs, all models in paired rounds"
            if timing and report["original"]["latency_ms"] else "not timed")
    graph_s = report["timings_s"].get("graph", 0.0) + report["timings_s"].get("norms", 0.0)
    print(f"(method {report['method']}; latency {when}; error = max |pruned - original| / max |original| over "
          f"{report['options']['samples']} batches; pareto * = not dominated in ({report['pareto_axes'][0]}, error); "
          f"graph and norms built once in {graph_s:.2f} s)")
