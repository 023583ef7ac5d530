"""Four-level U-Net (milesial/Pytorch-UNet layout, 4 downs and 4 ups), the LEAN paper's ``UNet4``.

``inc``: DoubleConv(c_in -> base); ``down{1..4}``: 2x2 pool (max or avg) + DoubleConv doubling the
channels; ``up{1..4}``: ConvTranspose2d 2x2 stride 2 (C -> C/2), ``cat([skip, up], dim=1)``, DoubleConv
(C -> C/2); ``outc``: 1x1 conv with bias to ``n_classes`` logits. DoubleConv = (3x3 conv pad 1 without
bias, BatchNorm, ReLU) x 2. Spatial sizes must be divisible by 16.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet4", "DoubleConv"]


class DoubleConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, pool: str):
        if pool == "max":
            p = nn.MaxPool2d(2)
        elif pool == "avg":
            p = nn.AvgPool2d(2)
        else:
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        super().__init__(p, DoubleConv(c_in, c_out))


class Up(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_in // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(c_in, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet4(nn.Module):
    def __init__(self, c_in: int = 1, n_classes: int = 5, base: int = 16, pool: str = "max"):
        super().__init__()
        b = int(base)
        self.pool = pool
        self.inc = DoubleConv(c_in, b)
        self.down1 = Down(b, 2 * b, pool)
        self.down2 = Down(2 * b, 4 * b, pool)
        self.down3 = Down(4 * b, 8 * b, pool)
        self.down4 = Down(8 * b, 16 * b, pool)
        self.up1 = Up(16 * b, 8 * b)
        self.up2 = Up(8 * b, 4 * b)
        self.up3 = Up(4 * b, 2 * b)
        self.up4 = Up(2 * b, b)
        self.outc = nn.Conv2d(b, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)
