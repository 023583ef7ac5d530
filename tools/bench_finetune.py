"""Fine-tuning speed on CPU: narrow convolutions computed taps first (issue 5).

Times forward + backward (median of --runs after 2 warm-ups, one torch thread) of
(a) single 3x3 convolutions, torch's conv2d against `conv_ops.conv_taps_first`;
(b) the fine-tuning bridge on `models/msd_cs.onnx` and on a pruned copy (keep 0.1), batch 5 of 64x64 crops
    (and of full 256x256 images for the pruned copy), with and without the taps-first path
    (`conv_ops._taps_first_pays`), and taps first with autograd's backward of the shifted-window sum
    instead of `conv_ops._WindowSum`'s, and taps first with the symmetric padding's Slice and Concat nodes
    run one by one instead of as `lean_onnx.train.ops.SliceConcat`;
(c) `tools/train.py`'s step on `models.msd.MSD`: `forward` against `forward_taps`, batch 4 of 128x128.

    python tools/bench_finetune.py --runs 7 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np
import onnx
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mdsection import write_section  # noqa: E402  (tools/ is on sys.path for a script)

from lean_onnx.rewrite.pruner import Pruner  # noqa: E402
from lean_onnx.train.bridge import to_torch  # noqa: E402
from lean_onnx.train.ops import conv as conv_ops  # noqa: E402
from models.msd import MSD  # noqa: E402

HEADING = "## Fine-tuning on CPU: narrow convolutions taps first (issue 5)"
#: (c_out, c_in, side) for (a)
CONVS = [(1, 1, 64), (1, 16, 64), (1, 50, 128), (2, 50, 64), (4, 50, 128), (4, 16, 128), (8, 128, 64)]


def median_ms(step, runs: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def conv_rows(runs: int) -> list[str]:
    rows = ["| conv (batch 5, 3x3, dilation 3) | taps first chosen | conv2d ms | taps first ms | ratio |",
            "|---|---|---:|---:|---:|"]
    for c_out, c_in, side in CONVS:
        x = torch.randn(5, c_in, side, side, requires_grad=True)
        w, b = torch.randn(c_out, c_in, 3, 3, requires_grad=True), torch.randn(c_out, requires_grad=True)

        def direct():
            F.conv2d(x, w, b, dilation=3).sum().backward()

        def taps():
            conv_ops.conv_taps_first(x, w, b, [3, 3]).sum().backward()

        a, t = median_ms(direct, runs), median_ms(taps, runs)
        chosen = "yes" if conv_ops._taps_first_pays(w) else "no"
        rows.append(f"| {c_in}x{side}x{side} -> {c_out} | {chosen} | {a:.1f} | {t:.1f} | {a / t:.2f}x |")
    return rows


def _plain_window_sum(taps, windows):
    """The shifted-window sum with autograd's own backward (before conv_ops._WindowSum)."""
    out = taps[:, :, 0, windows[0][0], windows[0][1]]
    for t in range(1, len(windows)):
        out = out + taps[:, :, t, windows[t][0], windows[t][1]]
    return out


def bridge_rows(runs: int) -> list[str]:
    original = onnx.load(str(ROOT / "models" / "msd_cs.onnx"))
    pruned = Pruner(original, exclude=["/final/*"]).prune(0.1, round_channels=1, masked=False).model
    rows = ["| model | batch 5 of | kernels (3x3 and final 1x1) | conv2d everywhere ms | taps first, autograd's "
            "window backward ms | taps first, padding's Slices unfused ms | taps first ms | ratio conv2d / taps "
            "first |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, model, side in (("msd_cs.onnx", original, 64), ("msd_cs.onnx pruned to keep 0.1", pruned, 64),
                              ("msd_cs.onnx pruned to keep 0.1", pruned, 256)):
        x, y = torch.randn(5, 1, side, side), torch.randint(0, 5, (5, side, side))
        unfused, module = to_torch(model, fuse_slices=False), to_torch(model)

        def step(module=module):
            module.train()
            module.zero_grad()
            F.cross_entropy(module(x), y).backward()

        chooser, window_sum = conv_ops._taps_first_pays, conv_ops._WindowSum.apply
        try:
            conv_ops._taps_first_pays = lambda w: False
            off = median_ms(step, runs)
            conv_ops._taps_first_pays, conv_ops._WindowSum.apply = chooser, _plain_window_sum
            plain = median_ms(step, runs)
        finally:
            conv_ops._taps_first_pays, conv_ops._WindowSum.apply = chooser, window_sum
        slices = median_ms(lambda: step(unfused), runs)
        on = median_ms(step, runs)
        kernels = sum(int(np.prod(p.shape[:2])) for k, p in module.named_parameters() if p.dim() == 4)
        rows.append(f"| {name} | {side}x{side} | {kernels} | {off:.0f} | {plain:.0f} | {slices:.0f} | {on:.0f} | "
                    f"{off / on:.2f}x |")
    return rows


def msd_row(runs: int) -> list[str]:
    torch.manual_seed(0)
    model = MSD(input_mean=0.17, input_std=1.04)
    x, y = torch.randn(4, 1, 128, 128), torch.randint(0, 5, (4, 128, 128))
    times = {}
    for name in ("forward", "forward_taps"):
        forward = getattr(model, name)

        def step():
            model.zero_grad()
            F.cross_entropy(forward(x), y).backward()

        times[name] = median_ms(step, runs)
    return ["| training step | forward ms | forward_taps ms | ratio |", "|---|---:|---:|---:|",
            f"| MSD (depth 50), batch 4 x 128x128 | {times['forward']:.0f} | {times['forward_taps']:.0f} | "
            f"{times['forward'] / times['forward_taps']:.2f}x |"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--write", metavar="MD", help="replace this section of the markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)  # as fine-tuning runs
    text = "\n".join([
        HEADING, "",
        f"Command: `python tools/bench_finetune.py --runs {args.runs}` (torch {torch.__version__}, one thread, "
        f"forward + backward, median of {args.runs} runs after 2 warm-ups; ratio = conv2d / taps first).", "",
        "A convolution with few output channels costs torch's CPU kernels about as much as one with many: the "
        "k*k shifted reads of every input channel dominate. Taps first mixes the input channels once into the "
        "k*k taps of each output channel (a 1x1 convolution), pads those few channels and adds the k*k shifted "
        "windows: the same function up to rounding. The bridge chooses it for a 2-D, group-1, stride-1 Conv with "
        "one output channel, or up to 4 when the inputs are at least 12 times as many (the `chosen` column). The "
        "backward of the windows' sum writes each tap's window once into one zero tensor (`conv_ops._WindowSum`, "
        "the same bits as autograd's backward, which writes a whole taps-sized zero tensor per tap and adds them): "
        "the model table shows both. The rule was set before that backward existed; with it, the two `no` "
        "convolutions above now favour taps first too, but a sweep of padded, undilated convolutions (the machine "
        "shared with a training run) was mixed from 8 output channels on, so the rule stays as it was. MS-D's "
        "symmetric padding is exported as Slice, flipping Slice and Concat nodes; the bridge runs each such Concat "
        "as one `lean_onnx.train.ops.SliceConcat`, whose backward copies x's part of the gradient once and adds the slices' "
        "parts into it, where autograd fills an x-sized zero tensor per Slice and adds them (same bits for "
        "padding): the `unfused` column.", "",
        *conv_rows(args.runs), "", *bridge_rows(args.runs), "", *msd_row(args.runs), ""])
    print(text)
    if args.write:
        write_section(args.write, HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
