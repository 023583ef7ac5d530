"""Fidelity of lean-channel against l1-channel at equal MACs, with enough crops to tell them apart.

    python tools/bench_fidelity.py [--targets 0.5,0.25] [--crops 200] [--calibrate 64] [--only mobilenet]
        [--json R.json] [--write docs/benchmarks.md]

The budget benchmark (tools/bench_budget.py) measures fidelity on 24 crops: one crop is 0.04 of top-1
agreement there, so it cannot say which of two methods keeps more of the original. This one measures only
fidelity, on `--crops` random crops (and flips) of the scikit-image photos (tools/third_party.py), for
lean-onnx `--target-macs` with `--method lean` and `--method l1` (everything else the defaults: channel
granularity, `--allocate time`), each with `--drop-blocks 1` (the default: both methods then remove the same
residual branches, chosen by LEAN's block gain, select/blocks.py) and `--drop-blocks 0` (channels only: the
selection is the method's alone; left out where the default removed no branch: the same model). Each
pruned model one-shot and after `--calibrate-data` on `--calibrate` other crops of the same photos
(reconstruction, the default `--calibrate-method`; 64 is the CLI's default `--calibrate-samples`). Per
model: top-1 agreement with the original (classifiers) and the centred cosine of all outputs
(tools/bench_budget.fidelity). Per pair lean/l1 on the same crops: the difference of top-1 agreement with
its paired standard error (the crops where exactly one of the two agrees decide it).
Trained networks: torchvision's ImageNet MobileNetV2, the PP-LCNet orientation classifier and the YOLOv8n
detector (tools/third_party.py).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import third_party  # noqa: E402
from bench_budget import fidelity, log, outputs, photo_inputs, session  # noqa: E402
from mdsection import write_section  # noqa: E402

from lean_onnx.rewrite.pruner import Pruner  # noqa: E402
from lean_onnx.train.reconstruct import reconstruct  # noqa: E402

HEADING = "## Fidelity: lean-channel against l1-channel on many crops (tools/bench_fidelity.py, issue 17)"
METHODS = ("lean", "l1")


def networks():
    """(name, ONNX path, input shape, kind, input normalisation)."""
    yield "MobileNetV2 (trained)", third_party.mobilenet_v2(), (1, 3, 224, 224), "classifier", "imagenet"
    yield "PP-LCNet orientation classifier (trained)", third_party.orientation_classifier(), \
        third_party.ORIENTATION_SHAPE, "classifier", "imagenet"
    yield "YOLOv8n (trained)", third_party.yolov8n(), third_party.YOLO_SHAPE, "regression", "unit"


def agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> np.ndarray:
    """Per crop: does the top-1 class agree with the original's."""
    return reference[0].argmax(1) == other[0].argmax(1)


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of a - b (per-crop 0/1 agreements) and its paired standard error."""
    d = a.astype(float) - b.astype(float)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def bench_network(name, path, shape, kind, normalise, targets, crops, calibrate) -> list[dict]:
    pruner = Pruner(str(path), input_shapes={None: shape})
    inputs = photo_inputs(shape, crops, seed=0, normalise=normalise)
    calibration = photo_inputs(shape, calibrate, seed=5, normalise=normalise)
    reference = outputs(session(pathlib.Path(path).read_bytes()), inputs)
    rows = []
    for target in targets:
        for drop in (None, 0.0):
            agree = {}
            for method in METHODS:
                if drop == 0 and not any(r["target"] == target and r["method"] == method and r["branches_removed"]
                                         for r in rows):
                    continue  # the default removed no branch here: --drop-blocks 0 is the same model
                start = time.perf_counter()
                result = pruner.prune(target_macs=target, method=method, drop_blocks=drop, masked=False)
                rebuilt = reconstruct(pruner, result, calibration)[0]
                row = {"network": name, "target": target, "drop_blocks": 1.0 if drop is None else drop,
                       "method": method, "macs_ratio": result.report["budget"]["achieved_macs_ratio"],
                       "branches_removed": len(result.report["residual_sums_bypassed"])}
                for how, model in (("one_shot", result.model_bytes), ("calibrated", rebuilt.model_bytes)):
                    got = outputs(session(model), inputs)
                    row[how] = {k: v for k, v in fidelity(reference, got, kind).items() if k != "max_rel_err"}
                    if kind == "classifier":
                        agree[method, how] = agreement(reference, got)
                row["seconds"] = time.perf_counter() - start
                rows.append(row)
                log(f"{name} @ {target:g} drop {row['drop_blocks']:g} {method}: {row['calibrated']}")
            if kind == "classifier" and len(agree) == 2 * len(METHODS):
                for how in ("one_shot", "calibrated"):
                    rows[-1][f"lean_minus_l1_{how}"] = paired_difference(agree["lean", how], agree["l1", how])
    return rows


def _cell(f: dict) -> str:
    top1 = f"top-1 {f['top1_agreement']:.3f}, " if "top1_agreement" in f else ""
    return f"{top1}cosine {f['cosine']:.3f}"


def render(rows: list[dict], args) -> str:
    lines = [HEADING, "",
             f"`python tools/bench_fidelity.py --targets {args.targets} --crops {args.crops} --calibrate "
             f"{args.calibrate}` (fidelity against the original on {args.crops} photo crops; `--calibrate-data` on "
             f"{args.calibrate} other crops of the same photos). *lean - l1*: top-1 agreement of lean less l1's "
             "on the same crops, +- its paired standard error.", "",
             "| network | MACs target | --drop-blocks | method | MACs ratio | branches removed | one-shot | "
             "`--calibrate-data` | lean - l1 (one-shot / calibrated) |",
             "|---|---:|---:|---|---:|---:|---|---|---|"]
    for row in rows:
        diff = ""
        if "lean_minus_l1_calibrated" in row:
            diff = " / ".join(f"{row[f'lean_minus_l1_{h}'][0]:+.3f} +- {row[f'lean_minus_l1_{h}'][1]:.3f}"
                              for h in ("one_shot", "calibrated"))
        lines.append(f"| {row['network']} | {row['target']:g} | {row['drop_blocks']:g} | {row['method']} | "
                     f"{row['macs_ratio']:.3f} | {row['branches_removed']} | {_cell(row['one_shot'])} | "
                     f"{_cell(row['calibrated'])} | {diff} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.5,0.25")
    parser.add_argument("--crops", type=int, default=200, help="photo crops the fidelity is measured on")
    parser.add_argument("--calibrate", type=int, default=64, help="photo crops for --calibrate-data")
    parser.add_argument("--only", help="comma-separated substrings of network names")
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--write", help="markdown file whose section to replace")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    rows = []
    for name, path, shape, kind, normalise in networks():
        if args.only and not any(s.lower() in name.lower() for s in args.only.split(",")):
            continue
        if path is None:
            log(f"{name}: not available offline, skipped")
            continue
        rows += bench_network(name, path, shape, kind, normalise, targets, args.crops, args.calibrate)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    text = render(rows, args)
    print(text)
    if args.write:
        write_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
