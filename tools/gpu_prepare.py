"""Prepare what tools/gpu_check.sh needs on a bare GPU machine (run here, on CPU, before the device call).

The device has no network. Its image (KINDS.md of the device tool, read 2026-11) holds Python 3.12,
torch 2.11 with CUDA, onnx, the CPU build of onnxruntime 1.30, numpy, numba, networkx and scipy, but not
onnx-graphsurgeon or this package; the models are pruned here and carried, so the check needs only
torch, onnx and onnxruntime there:

    python tools/gpu_prepare.py [--models mobilenet_v2,msd,unet4,resnet18] [--keeps 0.5,0.1,0.02]

writes `.cache/gpu_models/<model>/{original,keep0.5,...}.onnx` (git-ignored) and prints the total
size, which must fit the device tool's carry limit (64 MiB per call; ResNet-50 alone is 100 MB, so it
goes in a second call or not at all). Optionally `--ort-gpu-wheel PATH` splits an onnxruntime-gpu wheel
into 60 MB pieces under `.cache/gpu_wheels/` for successive carries (ignored folders stay on a warm
machine between back-to-back calls).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {"msd": 256, "unet4": 256}  # segmentation nets at the paper's image size; classifiers at 224


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet_v2,msd,unet4")
    ap.add_argument("--keeps", default="0.5,0.1,0.02")
    ap.add_argument("--out", default=str(ROOT / ".cache" / "gpu_models"))
    ap.add_argument("--ort-gpu-wheel", help="split this wheel into 60 MB pieces under .cache/gpu_wheels")
    args = ap.parse_args(argv)
    from lean_onnx.io.save import save_model_atomic
    from lean_onnx.rewrite.pruner import Pruner
    from models.zoo import cached_export

    total = 0
    for name in args.models.split(","):
        folder = pathlib.Path(args.out) / name
        folder.mkdir(parents=True, exist_ok=True)
        source = cached_export(name, fold_bn=True, image_size=SIZES.get(name, 224))
        original = folder / "original.onnx"
        original.write_bytes(pathlib.Path(source).read_bytes())
        pruner = Pruner(str(original))
        for keep in (float(k) for k in args.keeps.split(",")):
            result = pruner.prune(keep, masked=False)
            save_model_atomic(result.model_bytes, str(folder / f"keep{keep:g}.onnx"))
        size = sum(p.stat().st_size for p in folder.iterdir())
        total += size
        print(f"{name}: {size / 2**20:.1f} MiB in {folder}", flush=True)
    print(f"total {total / 2**20:.1f} MiB (carry limit 64 MiB per call)")
    if args.ort_gpu_wheel:
        wheels = ROOT / ".cache" / "gpu_wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        data = pathlib.Path(args.ort_gpu_wheel).read_bytes()
        piece = 60 * 2**20
        for k in range(0, len(data), piece):
            (wheels / f"{pathlib.Path(args.ort_gpu_wheel).name}.part{k // piece:02d}").write_bytes(data[k:k + piece])
        print(f"{len(data) / 2**20:.0f} MiB wheel in {-(-len(data) // piece)} pieces under {wheels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
