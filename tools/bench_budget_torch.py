"""The torch side of tools/bench_budget.py: the networks as torch modules, and Torch-Pruning's
`MagnitudePruner` (L1, per-layer uniform ratio, as its README's example) searched to a MACs ratio.

Torch-Pruning is a peer for the benchmark only (`pip install --no-deps torch-pruning`), never a dependency.
"""

from __future__ import annotations

import copy
import io

import torch
from torch import nn


class TinyDetector(nn.Module):
    """A YOLO-like detector (random weights): CSP blocks with channel Split/Concat, a stride-32 backbone,
    an FPN neck (Upsample + Concat) and two heads; about 0.9 GMACs at 320 x 320."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def cbr(cin, cout, k=3, s=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())

        self.stem = cbr(3, w, 3, 2)
        self.down = nn.ModuleList([cbr(w, 2 * w, 3, 2), cbr(2 * w, 4 * w, 3, 2), cbr(4 * w, 8 * w, 3, 2),
                                   cbr(8 * w, 16 * w, 3, 2)])
        self.csp = nn.ModuleList([CSP(2 * w, cbr), CSP(4 * w, cbr), CSP(8 * w, cbr), CSP(16 * w, cbr)])
        self.lateral = cbr(16 * w, 8 * w, 1)
        self.merge = CSP(16 * w, cbr)
        self.head_small = nn.Conv2d(16 * w, 3 * 85, 1)
        self.head_large = nn.Conv2d(8 * w, 3 * 85, 1)

    def forward(self, x):
        x = self.stem(x)
        feats = []
        for down, csp in zip(self.down, self.csp):
            x = csp(down(x))
            feats.append(x)
        top = self.lateral(feats[3])
        up = nn.functional.interpolate(top, scale_factor=2.0, mode="nearest")
        mid = self.merge(torch.cat([up, feats[2]], 1))
        return self.head_small(mid), self.head_large(top)


class CSP(nn.Module):
    """Split the channels in two halves, run one through two convs with a residual, concatenate back."""

    def __init__(self, c, cbr):
        super().__init__()
        self.a, self.b = cbr(c // 2, c // 2), cbr(c // 2, c // 2)
        self.out = cbr(c, c, 1)

    def forward(self, x):
        left, right = x.chunk(2, 1)
        return self.out(torch.cat([left, right + self.b(self.a(right))], 1))


def export_bytes(model: nn.Module, shape: tuple, names=("input",)) -> bytes:
    buf = io.BytesIO()
    model.eval()
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(shape),), buf, dynamo=False, opset_version=17,
                          input_names=list(names))
    return buf.getvalue()


def _macs(model: nn.Module, shape: tuple) -> float:
    import torch_pruning as tp

    return float(tp.utils.count_ops_and_params(model, torch.zeros(shape))[0])


def _ignored(model: nn.Module) -> list[nn.Module]:
    """Layers Torch-Pruning must not change: classifier/detector outputs (the interface stays)."""
    ignored = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features in (1000,):
            ignored.append(module)
        if isinstance(module, nn.Conv2d) and name.startswith("head"):
            ignored.append(module)
    return ignored


def magnitude_prune(model: nn.Module, shape: tuple, ratio: float, round_to: int | None = None):
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    example = torch.zeros(shape)
    pruner = tp.pruner.MagnitudePruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=_ignored(pruned), round_to=round_to)
    pruner.step()
    return pruned


def torch_pruning_at(model: nn.Module, shape: tuple, target_macs: float, tolerance: float = 0.02,
                     round_to: int | None = None):
    """Bisection on MagnitudePruner's channel ratio until the pruned model's MACs are `target_macs` of the
    original's (Torch-Pruning's own count); `round_to` N keeps channel counts multiples of N (as lean-onnx's
    default --round-channels 16). Returns (pruned module, its MACs ratio, the ratio used)."""
    base = _macs(model, shape)
    low, high, best = 0.0, 0.95, None
    for _ in range(12):
        ratio = (low + high) / 2
        pruned = magnitude_prune(model, shape, ratio, round_to)
        achieved = _macs(pruned, shape) / base
        if best is None or abs(achieved - target_macs) < abs(best[1] - target_macs):
            best = (pruned, achieved, ratio)
        if abs(achieved - target_macs) <= tolerance:
            break
        if achieved > target_macs:
            low = ratio
        else:
            high = ratio
    return best
