"""Test-model zoo: random-weight CNNs exported to ONNX with BatchNorm folded or kept.

``build(name)`` gives an eval-mode torch module with random weights (torchvision ``weights=None``) and
randomised BatchNorm statistics/affines, so that folding BN into the convolutions is never an identity.
``export``/``cached_export`` write ONNX files with the legacy (TorchScript) exporter:

* ``fold_bn=True``: eval mode, ``do_constant_folding=True`` -> no ``BatchNormalization`` node remains
  (the exporter fuses every BN into the preceding Conv);
* ``fold_bn=False``: ``training=TrainingMode.PRESERVE``, ``do_constant_folding=False`` in eval mode ->
  every BN survives as a ``BatchNormalization`` node (``training_mode=0``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import tempfile
import warnings
from typing import Optional

import torch
from torch import nn

from .msd import MSD
from .unet import UNet4

__all__ = ["ZOO", "FAST", "build", "input_shape", "count_batchnorm", "export_module", "export", "cached_export", "default_cache_dir"]

ZOO = (
    "msd",
    "unet4",
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "squeezenet1_1",
    "vgg11_bn",
    "regnet_x_400mf",
    "shufflenet_v2_x0_5",
    "fcn_resnet50",
)
#: the subset exported by the non-slow tests
FAST = ("msd", "unet4", "resnet18", "mobilenet_v2")

_SMALL_INPUT = {"msd": 1, "unet4": 1}  # name -> input channels; everything else is 3-channel, 224 default
# The legacy exporter only handles AdaptiveAvgPool2d when the output size divides the input size; VGG's
# avgpool maps the (S/32)x(S/32) feature map to 7x7, so S must be a multiple of 224. input_shape() rounds
# the requested image size up for these models (the architecture stays the stock torchvision one).
_MULTIPLE_OF = {"vgg11_bn": 224}
_REPO = pathlib.Path(__file__).resolve().parent.parent


class _SegOut(nn.Module):
    """Unwrap torchvision segmentation models' ``{"out": ...}`` dict output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=gen))
                if m.affine:
                    m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=gen))
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def _construct(name: str) -> nn.Module:
    if name == "msd":
        # identity input scaler so the graph has the Sub/Div a trained model carries
        return MSD(c_in=1, n_classes=5, depth=50, width=1, dilations=range(1, 11), input_mean=0.0, input_std=1.0)
    if name == "unet4":
        return UNet4(c_in=1, n_classes=5, base=16, pool="max")
    import torchvision.models as tvm
    import torchvision.models.segmentation as tvs

    if name == "fcn_resnet50":
        return _SegOut(tvs.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=False))
    if name in ZOO:
        return getattr(tvm, name)(weights=None)
    raise KeyError(f"unknown zoo model {name!r}; choose from {ZOO}")


def build(name: str, seed: int = 0) -> nn.Module:
    """Random-weight model ``name`` in eval mode (deterministic for a given seed; global RNG untouched)."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; choose from {ZOO}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _construct(name)
    gen = torch.Generator().manual_seed(seed + 1)
    _randomise_bn(model, gen)
    return model.eval()


def count_batchnorm(model: nn.Module | str) -> int:
    """Number of BatchNorm layers in a module or zoo model name (0 for msd and squeezenet1_1)."""
    if isinstance(model, str):
        model = build(model)
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def input_shape(name: str, image_size: Optional[int] = None) -> tuple:
    """Export input shape (N=1). msd/unet4: (1, 1, S, S), default S=64; torchvision: (1, 3, S, S), default
    224. vgg11_bn rounds S up to a multiple of 224 (exporter limitation, see ``_MULTIPLE_OF``)."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; choose from {ZOO}")
    if name in _SMALL_INPUT:
        s = 64 if image_size is None else int(image_size)
        return (1, _SMALL_INPUT[name], s, s)
    s = 224 if image_size is None else int(image_size)
    if name in _MULTIPLE_OF:
        m = _MULTIPLE_OF[name]
        s = -(-s // m) * m
    return (1, 3, s, s)


@contextlib.contextmanager
def quiet_exporter():
    """Silence the legacy exporter's deprecation and tracer warnings (exports here are deliberate)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
        yield


def export_module(
    model: nn.Module,
    shape: tuple,
    path: os.PathLike | str,
    *,
    fold_bn: bool,
    opset: int = 17,
    dynamic_batch: bool = False,
    seed: int = 0,
) -> pathlib.Path:
    """Export an eval-mode ``model`` for input ``shape`` to ``path`` atomically (see module docstring)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    kwargs = dict(
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["output"],
    )
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    if fold_bn:
        kwargs.update(training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True)
    else:
        kwargs.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        with quiet_exporter(), torch.no_grad():
            torch.onnx.export(model, (x,), tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export(
    name: str,
    path: os.PathLike | str,
    *,
    fold_bn: bool,
    image_size: Optional[int] = None,
    opset: int = 17,
    dynamic_batch: bool = False,
) -> pathlib.Path:
    """Build zoo model ``name`` (seed 0) and export it to ``path``; returns the path."""
    return export_module(
        build(name), input_shape(name, image_size), path, fold_bn=fold_bn, opset=opset, dynamic_batch=dynamic_batch
    )


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get("LEAN_ONNX_ZOO_CACHE")
    return pathlib.Path(env) if env else _REPO / ".cache" / "zoo"


def _source_hash() -> str:
    h = hashlib.sha256()
    for f in ("msd.py", "unet.py", "zoo.py"):
        h.update((pathlib.Path(__file__).parent / f).read_bytes())
    return h.hexdigest()[:10]


def cached_export(
    name: str,
    *,
    fold_bn: bool,
    image_size: Optional[int] = None,
    cache_dir: Optional[os.PathLike | str] = None,
) -> pathlib.Path:
    """Export once into the cache (default ``<repo>/.cache/zoo`` or ``$LEAN_ONNX_ZOO_CACHE``) and reuse.

    The file name encodes the model, BN mode, image size, torch version and a hash of the model sources.
    """
    shape = input_shape(name, image_size)
    tv = torch.__version__.replace("+", "_")
    fname = f"{name}-{'bnfold' if fold_bn else 'bnkeep'}-s{shape[-1]}-torch{tv}-{_source_hash()}.onnx"
    path = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / fname
    if not path.exists():
        export(name, path, fold_bn=fold_bn, image_size=shape[-1])
    return path
