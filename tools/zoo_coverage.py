"""Write docs/coverage.md: what lean-onnx can prune in every zoo model, and why the rest is frozen.

    python tools/zoo_coverage.py            # exports the zoo at its default sizes into .cache/zoo (cached)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections import Counter

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lean_onnx.graph.build import build_channel_graph  # noqa: E402
from lean_onnx.graph.load import load_model  # noqa: E402
from lean_onnx.graph.summary import inspect_summary  # noqa: E402
from models.zoo import ZOO, cached_export  # noqa: E402

SIZES = {"msd": 256, "unet4": 256}


def summarize(name: str, fold_bn: bool) -> dict:
    path = cached_export(name, fold_bn=fold_bn, image_size=SIZES.get(name))
    return inspect_summary(build_channel_graph(load_model(str(path))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    args = parser.parse_args()
    rows, reasons = [], {}
    for name in ZOO:
        for fold_bn in (False, True):
            s = summarize(name, fold_bn)
            shape = "x".join(map(str, next(iter(s["input_shapes"].values()))))
            bn = "folded" if fold_bn else "kept"
            frozen = Counter(f["reason"].split(":")[0] for f in s["frozen"])
            reasons[(name, bn)] = frozen
            rows.append(f"| {name} | {bn} | {shape} | {len(s['layers'])} | {s['kernels']['total']:,} | "
                        f"{s['kernels']['prunable']:,} | {100 * s['coverage']:.1f} % | {len(s['coupling_groups'])} | "
                        f"{s['graph']['frozen_channels']:,} | {s['params'] / 1e6:.2f} M | {s['flops']['macs'] / 1e9:.3f} G |")
            print(rows[-1], file=sys.stderr)
    lines = [
        "# Coverage of the test zoo",
        "",
        "Made by `python tools/zoo_coverage.py` (random weights, torchvision architectures, exported with",
        "`torch.onnx.export(dynamo=False, opset_version=17)`, BN kept or folded by the exporter).",
        "*Coverage* = prunable kernels / all conv kernels. Kernels stay prunable next to frozen channels:",
        "masking a kernel is always exact; *frozen channels* are channels whose count lean-onnx will not",
        "change (graph inputs/outputs, channels around ops without a channel-flow rule, around grouped convs",
        "and channel shuffles, and tensors whose shape a Shape op reads). MACs are",
        "multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul at the input shape shown.",
        "",
        "| model | BN | input | conv layers | kernels | prunable | coverage | coupling groups | frozen channels | params | MACs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## Frozen parts and their reasons",
        "",
        "| model | BN | reason | count |",
        "|---|---|---|---|",
    ]
    for (name, bn), counter in reasons.items():
        for reason, count in sorted(counter.items()):
            lines.append(f"| {name} | {bn} | {reason} | {count} |")
        if not counter:
            lines.append(f"| {name} | {bn} | (nothing frozen besides the graph input) | 0 |")
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
