"""Pruned vs original: the main command's end-to-end time, and size / MACs / ONNX Runtime CPU latency.

    python tools/bench_rewrite.py [--repeats 5] [--rounds 20] [--configs 2,1,1e] [--write docs/benchmarks.md]

1. End to end: `lean-onnx IN OUT --keep 0.1 --report R -q` on ResNet-50 (random weights, BN folded,
   1x3x224x224), each run a fresh process (interpreter start, imports and numba's JIT cache load
   included). Wall time of the process (median of --repeats), each stage of the report's `timings_s`
   (median), the time outside the stages (interpreter, imports, sha256, printing) and peak RSS.
2. For each zoo model (BN folded; msd and unet4 at 256x256) the original and the pruned models at each
   --keeps (method lean, one `Pruner` per model): parameters, MACs, kernels (LEAN's count and the
   kernels physically left in the model), and ONNX Runtime CPU latency at batch 1 for each
   config in --configs (intra_op_num_threads; `e` = without the NCHWc layout optimisation). Every variant of a model (original + each keep) gets its own
   session (inter_op 1, sequential, thread spinning off, default graph optimisations); after warm-up
   runs the variants are timed round-robin, the order rotated each round, so a noisy neighbour hits
   all of them alike. Median and p90 per variant; speed-up = median(original) / median(pruned),
   shown next to the MACs ratio (the theoretical speed-up). Each pruned model is also checked
   against its masked model on one random input (the contract pruned(x) == masked(x)).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_rewrite_report import HEADING, MODELS, STAGES, config_label, git_state, load_average, parse_config, render  # noqa: E402
from mdsection import write_section  # noqa: E402  (tools/ is on sys.path for a script)

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMAGE_SIZE = {"msd": 256, "unet4": 256}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def pct(values, q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    data = sorted(values)
    k = max(0, min(len(data) - 1, math.ceil(q / 100 * len(data)) - 1))
    return data[k]


def zoo_path(name: str) -> str:
    from models.zoo import cached_export

    return str(cached_export(name, fold_bn=True, image_size=IMAGE_SIZE.get(name)))


# ---------------------------------------------------------------------------------------------- part 1


def lean_onnx_command() -> list[str]:
    exe = pathlib.Path(sys.executable).with_name("lean-onnx")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("lean-onnx")
    return [found] if found else [sys.executable, "-m", "lean_onnx"]


def end_to_end(model: str, keep: float, repeats: int, workdir: str) -> dict:
    """`lean-onnx IN OUT --keep R` in fresh processes: wall time, report stages, peak RSS (wait4)."""
    out, rep = os.path.join(workdir, "e2e.onnx"), os.path.join(workdir, "e2e.json")
    cmd = lean_onnx_command() + [model, out, "--keep", str(keep), "--report", rep, "-q"]
    imports = [sys.executable, "-c", "import lean_onnx.cli, lean_onnx.rewrite.pruner, lean_onnx.select.selection"]
    runs, import_s = [], []
    for i in range(repeats):
        start = time.perf_counter()
        subprocess.run(imports, check=True)
        import_s.append(time.perf_counter() - start)
        with open(os.path.join(workdir, "e2e.err"), "w+") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            err.seek(0)
            stderr = err.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {stderr.strip()[-500:]}")
        timings = json.loads(pathlib.Path(rep).read_text())["timings_s"]
        runs.append({"wall_s": wall, "timings_s": timings, "rss_mb": usage.ru_maxrss / 1024})
        log(f"e2e run {i + 1}/{repeats}: {wall:.2f} s " + " ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    stages = {s: statistics.median(r["timings_s"].get(s, 0.0) for r in runs) for s in STAGES}
    outside = statistics.median(r["wall_s"] - sum(r["timings_s"].values()) for r in runs)
    return {"command": "lean-onnx IN OUT --keep {} --report R -q".format(keep), "runs": runs,
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "wall_min_s": min(r["wall_s"] for r in runs), "wall_max_s": max(r["wall_s"] for r in runs),
            "stages_s": stages, "outside_stages_s": outside, "imports_s": statistics.median(import_s),
            "rss_mb": statistics.median(r["rss_mb"] for r in runs)}


# ---------------------------------------------------------------------------------------------- part 2


def session(path: str, threads: int, layout: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not layout:  # everything but the layout transformers (NCHWc)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning worker threads of one session would steal the 2 cores from the next one in the round.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def feed_for(sess, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    feed = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def check_masked(pruned_path: str, masked_path: str) -> tuple[float, bool]:
    """(max |pruned(x) - masked(x)| / max |masked(x)| on one random input, whether pruned(x) ignores x)."""
    import numpy as np

    a, b = session(pruned_path, 1), session(masked_path, 1)
    feed = feed_for(a, seed=1)
    ya, yb = a.run(None, feed), b.run(None, feed)
    worst = 0.0
    for u, v in zip(ya, yb):
        if u.shape != v.shape:
            return float("inf"), False
        worst = max(worst, float(np.max(np.abs(u - v))) / max(float(np.max(np.abs(v))), 1e-12))
    other = a.run(None, feed_for(a, seed=2))
    constant = all(np.array_equal(u, w) for u, w in zip(ya, other))
    return worst, constant


def nchwc_block() -> int:
    """MLAS's NCHWc block: 16 channels with AVX-512F, 8 with AVX2 (MlasNchwcGetBlockSize)."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if "avx512f" in flags else 8


def nchwc_layout(path: str, workdir: str) -> dict:
    """What ORT's default optimisation (ORT_ENABLE_ALL) makes of the convs: the optimised graph as ORT
    itself writes it (optimized_model_filepath), counting convs moved to the NCHWc blocked layout
    (com.microsoft.nchwc Conv), convs left in NCHW (Conv / FusedConv) and layout reorder nodes."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT warns that the written graph is hardware specific
    out = os.path.join(workdir, "optimised.onnx")
    so.optimized_model_filepath = out
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    try:
        graph = onnx.load(out, load_external_data=False).graph
    finally:
        for f in pathlib.Path(workdir).glob("optimised.onnx*"):
            f.unlink()
    ops = [(n.domain, n.op_type) for n in graph.node]
    return {"nchwc_convs": ops.count(("com.microsoft.nchwc", "Conv")),
            "nchw_convs": sum(op in ("Conv", "FusedConv") and dom in ("", "ai.onnx", "com.microsoft")
                              for dom, op in ops),
            "reorders": sum(dom == "com.microsoft.nchwc" and op.startswith("Reorder") for dom, op in ops)}


def latency(paths: dict[str, str], config: str, min_rounds: int, budget_s: float, warmup: int) -> dict:
    """Round-robin timing of all variants (order rotated each round); ms per run."""
    threads, layout = parse_config(config)
    names = list(paths)
    sessions = {n: session(p, threads, layout) for n, p in paths.items()}
    feed = feed_for(next(iter(sessions.values())))
    for n in names:  # the pruned models keep the input and output shapes
        assert [i.name for i in sessions[n].get_inputs()] == list(feed), n
    start = time.perf_counter()
    for _ in range(warmup):
        for n in names:
            sessions[n].run(None, feed)
    per_round = (time.perf_counter() - start) / max(warmup, 1)
    rounds = max(min_rounds, min(200, int(budget_s / max(per_round, 1e-6))))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t = time.perf_counter()
            sessions[n].run(None, feed)
            times[n].append((time.perf_counter() - t) * 1e3)
    base = times[names[0]]
    out = {"config": config, "threads": threads, "layout": layout, "rounds": rounds, "warmup": warmup, "variants": {}}
    for n in names:
        ms = times[n]
        out["variants"][n] = {
            "median_ms": statistics.median(ms), "p90_ms": pct(ms, 90), "min_ms": min(ms),
            "speedup": statistics.median(base) / statistics.median(ms),
            # per-round ratio original/variant: the same round saw the same machine load
            "paired_speedup": statistics.median(b / v for b, v in zip(base, ms)),
        }
    return out


def model_bench(name: str, keeps: list[float], configs: list[str], args, workdir: str) -> dict:
    import gc

    import onnx

    from lean_onnx.io.save import save_model_atomic
    from lean_onnx.rewrite.prune_report import pruned_kernels
    from lean_onnx.rewrite.pruner import Pruner

    path = zoo_path(name)
    original = onnx.load(path, load_external_data=False)
    result = {"model": name, "path": os.path.relpath(path, ROOT),
              "input": [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in original.graph.input],
              "original": {"kernels_in_model": pruned_kernels(original)}, "keeps": {}}
    del original
    result["original"]["layout"] = nchwc_layout(path, workdir)
    start = time.perf_counter()
    try:
        pruner = Pruner(path)
    except Exception as exc:  # report, never fix, the pruner
        result["error"] = f"Pruner(): {type(exc).__name__}: {exc}"
        log(f"{name}: {result['error']}")
        return result
    result["analysis_s"] = time.perf_counter() - start
    paths = {"original": path}
    for spec in keeps:  # "0.1" or "0.1r16": keep 0.1 with --round-channels 16
        keep_text, _, rounding = spec.partition("r")
        keep = float(keep_text)
        entry: dict = {}
        result["keeps"][spec] = entry
        start = time.perf_counter()
        try:
            r = pruner.prune(keep, method="lean", round_channels=int(rounding or 1))
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            log(f"{name} keep {keep}: {entry['error']}")
            continue
        entry["prune_s"] = time.perf_counter() - start
        rep = r.report
        entry.update(kernels=rep["kernels"], params=rep["params"], flops=rep["flops"],
                     timings_s=rep["timings_s"], channels=rep["channels"])
        result["original"].update(params=rep["params"]["before"], macs=rep["flops"]["before"],
                                  lean_kernels=rep["kernels"]["in_original_model"])
        out = os.path.join(workdir, f"{name}_k{spec}.onnx")
        masked = os.path.join(workdir, f"{name}_k{spec}_masked.onnx")
        save_model_atomic(r.model, out)
        save_model_atomic(r.masked, masked)
        del r
        try:
            entry["masked_rel_diff"], entry["constant_output"] = check_masked(out, masked)
        except Exception as exc:
            entry["masked_rel_diff"] = None
            entry["ort_error"] = f"{type(exc).__name__}: {exc}"
            log(f"{name} keep {keep}: ORT: {entry['ort_error']}")
            continue
        os.unlink(masked)
        entry["layout"] = nchwc_layout(out, workdir)
        paths[f"keep {spec}"] = out
        k = rep["kernels"]
        log(f"{name} keep {keep}: kept {k['kept']:,}/{k['total']:,} (in model {k['in_pruned_model']:,}), "
            f"MACs {rep['flops']['after'] / rep['flops']['before']:.3f}, {entry['prune_s']:.1f} s, "
            f"masked diff {entry['masked_rel_diff']:.2e}")
    del pruner
    gc.collect()
    result["latency"] = []
    for config in configs:
        lat = latency(paths, config, args.rounds, args.budget_s, args.warmup)
        result["latency"].append(lat)
        log(f"{name} {config_label(config)}, {lat['rounds']} rounds: " + ", ".join(
            f"{n} {v['median_ms']:.1f} ms" for n, v in lat["variants"].items()))
    return result


# ---------------------------------------------------------------------------------------------- output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh-process runs of the main command")
    parser.add_argument("--e2e-keep", type=float, default=0.1)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--keeps", default="0.5,0.1,0.02",
                        help="comma-separated keeps; '0.1r16' = keep 0.1 with --round-channels 16")
    parser.add_argument("--configs", default="2,1,1e",
                        help="ORT configs, comma separated: N = intra_op_num_threads N with all graph optimisations; "
                             "Ne = N threads, ORT_ENABLE_EXTENDED (no NCHWc layout transformation)")
    parser.add_argument("--rounds", type=int, default=20, help="minimum timed rounds per model and thread count")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up rounds")
    parser.add_argument("--budget-s", type=float, default=12.0,
                        help="fast models get more rounds, up to about this many seconds")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--from-json", help="render from a previous --json file instead of measuring")
    parser.add_argument("--write", help="replace (or append) the section in this markdown file")
    args = parser.parse_args()
    args.keep_list = args.keeps.split(",")
    args.block = nchwc_block()

    if args.from_json:
        data = json.loads(pathlib.Path(args.from_json).read_text())
        e2e, models, meta = data["e2e"], data["models"], data["meta"]
        for k, v in meta.get("args", {}).items():  # render the command that measured the data
            setattr(args, k, v)
        args.keep_list = args.keeps.split(",")
    else:
        meta = {"load_start": load_average(), "git": git_state(), "args": {k: getattr(args, k) for k in (
            "repeats", "e2e_keep", "models", "keeps", "configs", "rounds", "warmup", "budget_s", "block")}}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench_rewrite.") as workdir:
            e2e = None
            if not args.skip_e2e:
                e2e = end_to_end(zoo_path("resnet50"), args.e2e_keep, args.repeats, workdir)
            models = []
            for name in args.models.split(","):
                models.append(model_bench(name, args.keep_list, args.configs.split(","), args, workdir))
                for f in pathlib.Path(workdir).glob(f"{name}_k*.onnx"):
                    f.unlink()
        meta.update(load_end=load_average(), elapsed_s=time.perf_counter() - t0)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({"e2e": e2e, "models": models, "meta": meta}, indent=1))
    text = render(e2e, models, args, meta)
    print(text)
    if args.write:
        write_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
