"""MACs budgets on trained and deployment networks: achieved MACs, ORT CPU speed-up, one-shot fidelity.

    pip install --no-deps torch-pruning      # the peer, for this benchmark only
    python tools/bench_budget.py [--targets 0.75,0.5,0.25] [--rounds 30] [--repeats 3] [--target-latency 0.6]
        [--same-process] [--json R.json] [--write docs/benchmarks.md]

Networks: torchvision's trained ImageNet MobileNetV2 (tools/third_party.py), the PP-OCRv4 text detector and
the PP-OCR direction classifier (Paddle exports, trained), a trained YOLOv8n and a trained PP-PicoDet layout
detector (Split/Concat necks) and a trained PP-LCNet classifier (wheels, tools/third_party.py), torchvision
ResNet-50 (random weights) and a YOLO-like detector with CSP Split/Concat blocks and an FPN neck
(tools/bench_budget_torch.py, random weights).
For each network and target: lean-onnx `--target-macs` with `--method lean` and `--method l1` (channel
granularity, `--allocate time` and `--drop-blocks 1`, the defaults), `--method lean --allocate macs` (value
alone), `--method lean --drop-blocks 0` (channels only: no residual branch removed whole) and, on the trained
networks, `--method lean --calibrate-data` (`--calibrate` crops; fidelity only, its shapes are the uncalibrated
model's), with `--calibrate-method statistics` and with the default, reconstruction, and on the
torch-exportable ones Torch-Pruning's `MagnitudePruner` (L1, uniform per-layer
ratio) searched to the same MACs and exported to ONNX. Per pruned model: MACs ratio (lean-onnx's count on
the ONNX model for every row), median latency at batch 1, 2 threads, CPU, timed in paired rounds by the
product's timer (runtime/bench.paired_benchmark: every model of a network in each round, a block of runs
each, at least 30 ms each, ORT's default spinning threads as deployed; `--repeats` times, each in a fresh
process unless `--same-process`, the median speed-up), speed-up =
original / pruned and its ratio to the MACs speed-up (1 / MACs ratio); the original timed a second time in
the same rounds is the noise control (its speed-up should be 1.00); fidelity vs the original on crops of
natural photos (scikit-image): top-1 agreement for classifiers, and for every network the centred cosine
(per crop, all outputs flattened, both centred on the original's mean over the crops: 1 = the same, 0 = a
constant or unrelated output; a collapsed model scores 0 here while its mean error can look small), max and
mean relative error of the outputs (to the original's largest magnitude) (and, for the text detector,
agreement of the map binarised at 0.3).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import third_party  # noqa: E402
from mdsection import write_section  # noqa: E402

from lean_onnx.errors import LeanOnnxError  # noqa: E402
from lean_onnx.graph.cost import model_cost  # noqa: E402
from lean_onnx.graph.load import load_model  # noqa: E402
from lean_onnx.rewrite.pruner import Pruner  # noqa: E402
from lean_onnx.runtime.bench import paired_benchmark  # noqa: E402

HEADING = "## MACs budgets on trained networks (tools/bench_budget.py, issue 17)"
CONTROL = "the original again (noise control)"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def photo_inputs(shape: tuple, count: int = 24, seed: int = 0, photos: list[np.ndarray] | None = None,
                 normalise: str = "imagenet") -> np.ndarray:
    """`count` random crops (and flips) of `photos` (H, W, 3 uint8; default the scikit-image photos of
    tools/third_party.py), resized to `shape` (N, 3, H, W), ImageNet-normalised (`normalise="unit"`: RGB in
    [0, 1], as Ultralytics models take it)."""
    import skimage.transform

    rng = np.random.default_rng(seed)
    if photos is None:
        photos = [np.asarray(third_party._load_image(n))[..., :3] for n in third_party.IMAGES]
    photos = [p for p in photos if p.ndim == 3]
    out = []
    for k in range(count):
        img = photos[k % len(photos)]
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = skimage.transform.resize(img[top:top + ch, left:left + cw], shape[2:], anti_aliasing=True,
                                        preserve_range=True) / 255.0
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if normalise == "imagenet":
            crop = (crop - third_party.IMAGENET_MEAN) / third_party.IMAGENET_STD
        out.append(crop.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def session(model: bytes):
    """A session for the fidelity outputs (timing is paired_latency's)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def outputs(sess, inputs: np.ndarray) -> list[np.ndarray]:
    name = sess.get_inputs()[0].name
    runs = [sess.run(None, {name: inputs[i:i + 1]}) for i in range(len(inputs))]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


def fidelity(reference: list[np.ndarray], other: list[np.ndarray], kind: str) -> dict:
    scale = max(float(np.abs(r).max()) for r in reference) or 1.0
    result = {"max_rel_err": max(float(np.abs(r - o).max()) for r, o in zip(reference, other)) / scale,
              "mean_rel_err": float(np.mean([np.abs(r - o).mean() for r, o in zip(reference, other)])) / scale}
    # a collapsed output (near 0 or constant) has a small mean error but no cosine: per sample, every output
    # flattened and concatenated, centred on the original's mean over the samples
    ref = np.concatenate([r.reshape(len(r), -1) for r in reference], 1).astype(np.float64)
    oth = np.concatenate([o.reshape(len(o), -1) for o in other], 1).astype(np.float64)
    centre = ref.mean(0)
    ref, oth = ref - centre, oth - centre
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(oth, axis=1)
    result["cosine"] = float(np.mean(np.where(norms > 0, (ref * oth).sum(1) / np.maximum(norms, 1e-300), 0.0)))
    if kind == "classifier":
        result["top1_agreement"] = float((reference[0].argmax(1) == other[0].argmax(1)).mean())
    if kind == "text-detector":
        result["map_agreement"] = float(((reference[0] > 0.3) == (other[0] > 0.3)).mean())
    return result


def timed_medians(models: list[bytes], input_name: str, shape: tuple, runs: int, spinning: bool) -> list[float]:
    """One paired timing (runtime/bench.paired_benchmark): each model's median latency (ms), in order."""
    timed = paired_benchmark(models, provider="cpu", input_shapes={input_name: list(shape)}, threads=2, runs=runs,
                             warmup=5, spinning=spinning)
    return [t["latency_ms"]["median"] for t in timed]


def paired_latency(models: dict[str, bytes], shape: tuple, runs: int, repeats: int = 1,
                   spinning: bool = True, fresh: bool = True) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(per model the median latency in ms, per model its speed-up in each repeat): paired rounds timed by the
    product's own timer (runtime/bench.paired_benchmark: every model in each round, blocks of runs, ORT's
    default spinning, as deployed), the original first. With `repeats` > 1 the whole timing is repeated and
    each model gets the original's median over the repeats divided by its median speed-up (each speed-up from
    one repeat). `fresh`: each repeat in a new Python process (spawned), so that repeats share no allocator
    state and spread in time: this shared machine has fast and slow periods in which every model is slower
    (the same files: YOLOv8n 5.7 / 2.2 ms or 7.8 / 3.6 ms, original / pruned at 0.25, docs/budgets.md "How
    speed is measured"), and each repeat's ratio is kept."""
    import multiprocessing

    name = onnx.load_from_string(next(iter(models.values()))).graph.input[0].name
    speedups, originals = {k: [] for k in models}, []
    for _ in range(repeats):
        arguments = (list(models.values()), name, shape, runs, spinning)
        if fresh:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                medians = pool.apply(timed_medians, arguments)
        else:
            medians = timed_medians(*arguments)
        originals.append(medians[0])
        for key, median in zip(models, medians):
            speedups[key].append(medians[0] / median)
    original = statistics.median(originals)
    return {k: original / statistics.median(v) for k, v in speedups.items()}, speedups


def networks():
    """(name, ONNX path or bytes, input shape, fidelity kind, torch module or None, input normalisation)."""
    import torch
    import torchvision
    from bench_budget_torch import TinyDetector, export_bytes

    weights = third_party.extract_from_wheel(third_party.MOBILENET_WHEEL, third_party.MOBILENET_WEIGHTS)
    mobilenet = torchvision.models.mobilenet_v2()
    mobilenet.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50().eval()
    detector = TinyDetector().eval()
    net = "imagenet"
    yield "MobileNetV2 (trained)", export_bytes(mobilenet, (1, 3, 224, 224)), (1, 3, 224, 224), "classifier", \
        mobilenet, net
    yield "PP-OCRv4 detector (trained)", third_party.ocr_detector(), (1, 3, 320, 320), "text-detector", None, net
    yield "PP-OCR classifier (trained)", third_party.ocr_classifier(), (1, 3, 48, 192), "classifier", None, net
    yield "YOLOv8n (trained)", third_party.yolov8n(), third_party.YOLO_SHAPE, "regression", None, "unit"
    yield "PP-PicoDet layout detector (trained)", third_party.layout_detector(), third_party.LAYOUT_SHAPE, \
        "regression", None, net
    yield "PP-LCNet orientation classifier (trained)", third_party.orientation_classifier(), \
        third_party.ORIENTATION_SHAPE, "classifier", None, net
    yield "ResNet-50 (random)", export_bytes(resnet, (1, 3, 224, 224)), (1, 3, 224, 224), "regression", resnet, net
    yield "YOLO-like detector (random)", export_bytes(detector, (1, 3, 320, 320)), (1, 3, 320, 320), "regression", \
        detector, net


def bench_network(name, source, shape, kind, module, targets, rounds, latency_target=None,
                  failures: list | None = None, normalise: str = "imagenet", calibrate_samples: int = 0,
                  repeats: int = 1, spinning: bool = True, fresh: bool = True) -> list[dict]:
    from bench_budget_torch import export_bytes, torch_pruning_at

    model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    input_name = model.graph.input[0].name
    pruner = Pruner(model, input_shapes={input_name: shape})
    macs_before = pruner.cost_before["macs"]
    inputs = photo_inputs(shape, normalise=normalise)
    original = model.SerializeToString()
    reference = outputs(session(original), inputs)
    variants, rows, calibrated_models = {"original": original}, [], {}
    calibration = None
    if calibrate_samples and "(trained)" in name:  # other crops of the same photos than the fidelity's
        from lean_onnx.train.calibrate import calibrate
        from lean_onnx.train.reconstruct import reconstruct

        calibration = photo_inputs(shape, calibrate_samples, seed=5, normalise=normalise)
    failures = [] if failures is None else failures
    for target in targets:
        for method, allocate, drop in (("lean", "time", None), ("lean", "macs", None), ("l1", "time", None),
                                       ("lean", "time", 0.0)):
            label = (f"lean-onnx --method {method}" + (" --allocate macs" if allocate == "macs" else "")
                     + (" --drop-blocks 0" if drop == 0 else ""))
            start = time.perf_counter()
            try:
                result = pruner.prune(target_macs=target, method=method, allocate=allocate, masked=False,
                                      drop_blocks=drop)
            except LeanOnnxError as exc:  # below the floor: refused, as the CLI refuses it
                failures.append(f"{name} at {target:g}: {label} refused ({exc})")
                log(failures[-1])
                continue
            seconds = time.perf_counter() - start
            key = f"lean-onnx {method} {allocate}{'' if drop is None else ' channels only'} @ {target:g}"
            variants[key] = result.model_bytes
            rows.append({"network": name, "target": target, "pruner": label, "key": key,
                         "macs_ratio": result.report["flops"]["after"] / macs_before, "seconds": seconds,
                         "branches_removed": len(result.report["residual_sums_bypassed"])})
            if calibration is not None and allocate == "time" and drop is None:  # the same model, calibrated both ways
                timed = rows[-1]["macs_ratio"]
                for how, fn, suffix in (("statistics", calibrate, " --calibrate-method statistics"),
                                        ("reconstruct", reconstruct, "")):  # reconstruct: the default
                    calibrated_models[f"{key} {how}"] = (fn(pruner, result, calibration)[0].model_bytes, key)
                    rows.append({"network": name, "target": target, "pruner": label + " --calibrate-data" + suffix,
                                 "key": f"{key} {how}", "macs_ratio": timed, "seconds": None, "timed_as": key})
        for round_to in ((None, 16) if module is not None else ()):
            label = "Torch-Pruning MagnitudePruner (L1)" + (f", round_to={round_to}" if round_to else "")
            try:
                pruned, _, _ = torch_pruning_at(module, shape, target, round_to=round_to)
            except Exception as exc:  # noqa: BLE001 - the peer's failure is a result, recorded as such
                failures.append(f"{name} at {target:g}: {label} failed ({type(exc).__name__}: {exc})")
                log(failures[-1])
                continue
            key = f"Torch-Pruning round_to {round_to} @ {target:g}"
            variants[key] = export_bytes(pruned, shape)
            macs = model_cost(load_model(onnx.load_from_string(variants[key]), {None: shape}))["macs"]
            rows.append({"network": name, "target": target, "pruner": label, "key": key,
                         "macs_ratio": macs / macs_before, "seconds": None})
        log(f"{name}: target {target:g} pruned")
    if latency_target and kind == "classifier" and module is not None:
        from lean_onnx.runtime.latency_budget import prune_to_latency

        start = time.perf_counter()
        result, info = prune_to_latency(pruner, latency_target, min_channels=0.1, runs=rounds, log=log)
        key = f"lean-onnx --target-latency {latency_target:g}"
        variants[key] = result.model_bytes
        rows.append({"network": name, "target": f"latency {latency_target:g}", "pruner": key, "key": key,
                     "macs_ratio": result.report["flops"]["after"] / macs_before,
                     "seconds": time.perf_counter() - start, "search": info["search"]})
    variants[CONTROL] = original
    rows.append({"network": name, "target": "-", "pruner": CONTROL, "key": CONTROL, "macs_ratio": 1.0, "seconds": None})
    latency, per_repeat = paired_latency(variants, shape, rounds, repeats, spinning, fresh)
    for key, (model, timed_as) in calibrated_models.items():  # same shapes as the uncalibrated model: not timed
        variants[key], latency[key], per_repeat[key] = model, latency[timed_as], per_repeat[timed_as]
    for row in rows:
        row["latency_ms"], row["original_ms"] = latency[row["key"]], latency["original"]
        row["speedup_per_repeat"] = per_repeat[row["key"]]
        row["speedup"] = latency["original"] / latency[row["key"]]
        row["speedup_over_macs"] = row["speedup"] * row["macs_ratio"]
        row.update(fidelity(reference, outputs(session(variants[row["key"]]), inputs), kind))
    return rows


def selection_seconds(source: bytes, shape: tuple, repeats: int = 3) -> dict[str, float]:
    """Median end-to-end seconds (load, graph, norms, selection, plan, rewrite; no masked model, no
    validation) of `--keep 0.3` (kernel LEAN) and of `--target-macs 0.5` (channel LEAN, its scores and MACs
    model included), each on a fresh Pruner, alternating."""
    times = {"keep 0.3": [], "target-macs 0.5": []}
    for _ in range(repeats):
        for mode, options in (("keep 0.3", {"keep": 0.3}), ("target-macs 0.5", {"target_macs": 0.5})):
            start = time.perf_counter()
            model = onnx.load_from_string(source)
            Pruner(model, input_shapes={model.graph.input[0].name: shape}).prune(masked=False, **options)
            times[mode].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def summary(rows: list[dict]) -> list[str]:
    """The issue's targets, read off the rows: lean-onnx's speed-up / MACs at 0.5 and 0.25 per network
    (`--allocate time`, the default, beside `--allocate macs` from the same paired rounds)."""
    lines, ratios = [], []
    variants = {"--allocate macs": {}, "--drop-blocks 0": {}}
    for row in rows:
        for flag, found in variants.items():
            if row["pruner"] == f"lean-onnx --method lean {flag}":
                found[(row["network"], row["target"])] = row["speedup_over_macs"]
    for row in rows:
        if row["pruner"] == "lean-onnx --method lean" and row["target"] in (0.5, 0.25):
            ratios.append(row["speedup_over_macs"])
            key = (row["network"], row["target"])
            others = "; ".join(f"{flag}: {found[key]:.2f}" for flag, found in variants.items() if key in found)
            lines.append(f"- {row['network']} at {row['target']:g}: speed-up / MACs {row['speedup_over_macs']:.2f}"
                         + (f" ({others})" if others else ""))
    if ratios:
        lines.append(f"- mean over these: {statistics.mean(ratios):.2f}; smallest {min(ratios):.2f}")
    for flag, found in variants.items():
        others = [found[(r["network"], r["target"])] for r in rows if r["pruner"] == "lean-onnx --method lean"
                  and r["target"] in (0.5, 0.25) and (r["network"], r["target"]) in found]
        if others:
            lines.append(f"- with {flag}: mean {statistics.mean(others):.2f}; smallest {min(others):.2f}")
    return lines


def render(rows: list[dict], args, timing: dict | None = None) -> str:
    command = (f"python tools/bench_budget.py --targets {args.targets} --rounds {args.rounds} --repeats {args.repeats}"
               + (" --spinning off" if args.spinning == "off" else "")
               + (" --same-process" if args.same_process else ""))
    lines = [HEADING, "", f"`{command}` "
             f"(this 2-core machine, shared; batch 1, 2 threads, ORT CPU with "
             f"{'its default spinning threads' if args.spinning == 'on' else 'thread spinning off'}, paired "
             f"rounds of blocks{'' if args.same_process else ', each repeat in a fresh process'}; latency: the "
             f"original's median over the repeats / the median speed-up; fidelity on "
             f"24 photo crops). *speed-up / MACs* = measured speed-up x MACs ratio: 1.0 means the model got "
             "as much faster as it got smaller.", "",
             "| network | target | pruner | MACs ratio | latency ms (original) | speed-up | speed-up / MACs | "
             "fidelity |", "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        fid = ", ".join(f"{k.replace('_', ' ')} {r[k]:.3f}" for k in ("top1_agreement", "cosine", "max_rel_err",
                                                                        "mean_rel_err", "map_agreement") if k in r)
        removed = f" ({r['branches_removed']} branches removed whole)" if r.get("branches_removed") else ""
        lines.append(f"| {r['network']} | {r['target']} | {r['pruner']}{removed} | {r['macs_ratio']:.3f} | "
                     f"{r['latency_ms']:.2f} ({r['original_ms']:.2f}){' (same shapes)' if r.get('timed_as') else ''} | "
                     f"{r['speedup']:.2f}x | "
                     f"{r['speedup_over_macs']:.2f} | {fid} |")
    lines += ["", "lean-onnx (`--method lean`) against the issue's targets (speed-up / MACs >= 0.8 at 0.5 and 0.25):"]
    lines += summary(rows)
    for r in rows:
        if "search" in r:
            steps = "; ".join(f"MACs {s['macs_ratio']:.3f} -> {s['latency_ratio']:.3f}" for s in r["search"])
            lines += ["", f"{r['network']}, `{r['pruner']}` search (MACs ratio -> measured latency ratio): {steps}."]
    if timing:
        lines += ["", f"End-to-end prune of ResNet-50 (fresh Pruner, median of 3, no masked model): `--keep 0.3` "
                  f"{timing['keep 0.3']:.2f} s, `--target-macs 0.5` {timing['target-macs 0.5']:.2f} s "
                  f"(budget selection adds {timing['target-macs 0.5'] - timing['keep 0.3']:+.2f} s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.75,0.5,0.25")
    parser.add_argument("--rounds", type=int, default=30, help="timed runs per model in one paired timing")
    parser.add_argument("--repeats", type=int, default=1, help="paired timings per network (median speed-up)")
    parser.add_argument("--spinning", choices=("on", "off"), default="on",
                        help="ORT's intra-op thread spinning while timing (on: its default, as deployed)")
    parser.add_argument("--same-process", action="store_true",
                        help="time every repeat in this process (before session 20) instead of a fresh one each")
    parser.add_argument("--only", help="comma-separated substrings of network names")
    parser.add_argument("--write", help="markdown file whose section to replace")
    parser.add_argument("--target-latency", type=float, default=0.6,
                        help="also --target-latency F on the torch-exportable classifiers (0: no)")
    parser.add_argument("--calibrate", type=int, default=16, metavar="N",
                        help="also lean-onnx --method lean with --calibrate-data on N photo crops (trained networks; "
                             "fidelity only: same shapes, so its latency is the uncalibrated model's); 0: no")
    parser.add_argument("--json", help="write every row (and the latency search steps) here, after each network")
    parser.add_argument("--resume", action="store_true", help="with --json: keep the networks already in it")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    rows, timing, failures = [], None, []
    if args.resume and args.json and pathlib.Path(args.json).exists():  # networks already measured stay
        saved = json.loads(pathlib.Path(args.json).read_text())
        rows, timing, failures = saved["rows"], saved["timing"], saved["failures"]
    done = {row["network"] for row in rows}
    for name, source, shape, kind, module, normalise in networks():
        if args.only and not any(s.lower() in name.lower() for s in args.only.split(",")) or name in done:
            continue
        if source is None:
            log(f"{name}: not available offline, skipped")
            continue
        rows += bench_network(name, source, shape, kind, module, targets, args.rounds, args.target_latency, failures,
                              normalise, args.calibrate, args.repeats, args.spinning == "on", not args.same_process)
        if name.startswith("ResNet-50"):
            timing = selection_seconds(source, shape)
            log(f"{name}: end-to-end seconds {timing}")
        if args.json:  # after every network, so a crash or a stop loses one network at most (--resume)
            pathlib.Path(args.json).write_text(json.dumps({"rows": rows, "timing": timing, "failures": failures},
                                                          indent=1) + "\n")
    text = render(rows, args, timing) + "".join(f"\n- {f}" for f in failures) + ("\n" if failures else "")
    print(text)
    if args.write:
        write_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
