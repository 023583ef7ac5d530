"""Training data a user has: a folder of photos (no labels) for `lean-onnx finetune --teacher ... --data DIR`.

`load_image_folder(folder, model, ...)` finds every .jpg/.jpeg/.png/.bmp under the folder (recursively,
sorted paths; hidden files and folders are left out), decodes each once with Pillow into memory as uint8
(EXIF orientation applied; larger photos downscaled so the shorter side is at most twice the input
size, which bounds memory), and skips broken or non-image files by name (`ImageFolder.skipped`).
The `ImageFolder` it returns is what the training loop reads (finetune.py): `len()` samples per
epoch, `order(rng)` the epoch's image indices, `batch(indices, rng)` float inputs of the model's layout:

* with `augment` (training): a random resized crop (area 0.25..1 of the image, aspect ratio 3/4..4/3
  times the input's) and a horizontal flip with probability 0.5, drawn from the numpy Generator the
  loop is seeded with, so the same seed gives the same crops;
* without (and always for validation, `rng=None`): the shorter side resized to size / 0.875 and the
  centre crop (the usual ImageNet evaluation transform).

Pixels go to [0, 1], then (x - mean) / std per channel with mean and std in RGB order (ImageNet's by
default), then to BGR if the model wants it; 1-channel models get grayscale (mean/std averaged over
the three values given). The layout, channel count and size come from the model's input shape
(`input_geometry`): NCHW or NHWC by the axis of size 1 or 3.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..errors import LeanOnnxError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CENTRE_FRACTION = 0.875  # evaluation: resize the shorter side to size / 0.875, then centre crop
SCALE = (0.25, 1.0)  # random resized crop: fraction of the image area
RATIO = (3 / 4, 4 / 3)  # ... and aspect ratio (times the input's aspect ratio)


class ImageFolder:
    """Decoded photos and how to turn them into model inputs (see the module docstring)."""

    targets = None  # photos carry no labels: distillation only

    def __init__(self, folder: str, images: list[np.ndarray], names: list[str], size: tuple[int, int],
                 layout: str = "NCHW", mean=IMAGENET_MEAN, std=IMAGENET_STD, channel_order: str = "rgb",
                 augment: bool = False, samples_per_epoch: int | None = None, skipped=()):
        self.folder, self.images, self.names = folder, images, names
        self.size, self.layout, self.channel_order, self.augment = tuple(size), layout, channel_order, augment
        self.channels = images[0].shape[2]
        self.samples = samples_per_epoch or len(images)
        self.skipped = list(skipped)  # (name, reason)
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        if self.channels == 1:
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return self.samples

    def order(self, rng: np.random.Generator) -> np.ndarray:
        """The epoch's image indices: shuffled passes over all images, cut to the samples per epoch."""
        passes = -(-self.samples // len(self.images))
        return np.concatenate([rng.permutation(len(self.images)) for _ in range(passes)])[:self.samples]

    def batch(self, indices, rng: np.random.Generator | None, part: slice | None = None):
        """(inputs float32 in the model's layout, None): augmented when `augment` and `rng` is given.
        `part`: decode only indices[part] (a data-parallel rank's share, distributed.py); the augmentation
        of the whole batch is drawn all the same, so every rank's generator stays in step."""
        rng = rng if self.augment else None
        crops = [self._crop(int(k), rng) for k in indices]
        chosen = list(zip(indices, crops))[part or slice(None)]
        return np.stack([self._render(int(k), *crop) for k, crop in chosen]), None

    def sample(self, k: int, rng: np.random.Generator | None) -> np.ndarray:
        return self._render(k, *self._crop(k, rng))

    def _crop(self, k: int, rng: np.random.Generator | None) -> tuple:
        """(box, flip) of image k: random with an rng, else the centre crop."""
        image = self.images[k % len(self.images)]
        height, width = image.shape[:2]
        out_h, out_w = self.size
        if rng is not None:
            box = _random_box(rng, height, width, out_w / out_h)
            return box, rng.random() < 0.5
        scale = max(out_h / height, out_w / width) / CENTRE_FRACTION  # the shorter side to size / 0.875
        crop_h, crop_w = min(out_h / scale, height), min(out_w / scale, width)
        top, left = (height - crop_h) / 2, (width - crop_w) / 2
        return (left, top, left + crop_w, top + crop_h), False

    def _render(self, k: int, box: tuple, flip: bool) -> np.ndarray:
        from PIL import Image

        image = self.images[k % len(self.images)]
        out_h, out_w = self.size
        picture = Image.fromarray(image[:, :, 0] if self.channels == 1 else image)
        pixels = np.asarray(picture.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box), np.float32)
        pixels = pixels.reshape(out_h, out_w, self.channels)
        if flip:
            pixels = pixels[:, ::-1]
        pixels = (pixels / 255.0 - self.mean) / self.std
        if self.channel_order == "bgr" and self.channels == 3:
            pixels = pixels[:, :, ::-1]
        if self.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels, dtype=np.float32)


def _random_box(rng: np.random.Generator, height: int, width: int, aspect: float) -> tuple:
    """(left, top, right, bottom) of a random crop: area SCALE of the image, aspect RATIO x `aspect`
    (log-uniform, as torchvision's RandomResizedCrop; ten tries, then the largest centred crop)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        ratio = aspect * math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    w, h = (width, width / aspect) if width / height < aspect else (height * aspect, height)
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h


# ------------------------------------------------------------------------------------------- loading
def input_geometry(model, path: str, input_size: tuple[int, int] | None = None):
    """(layout "NCHW" | "NHWC", channels 1 | 3, (H, W)) of the model's one image input; H, W from
    `input_size` when given (it must match static dims), else the input's static dims."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise LeanOnnxError(f"{path}: image folders need a model with one input, not {[i.name for i in inputs]}")
    info = inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    shown = "x".join("?" if d is None else str(d) for d in dims)
    if len(dims) != 4:
        raise LeanOnnxError(f"{path}: input {info.name!r} has shape [{shown}]; image folders need a 4-D image input")
    if dims[1] in (1, 3):
        layout, channels, spatial = "NCHW", dims[1], dims[2:4]
    elif dims[3] in (1, 3):
        layout, channels, spatial = "NHWC", dims[3], dims[1:3]
    else:
        raise LeanOnnxError(f"{path}: input {info.name!r} has shape [{shown}]: no channel axis of size 1 or 3 "
                            "(axis 1 for NCHW, 3 for NHWC), so it does not take images")
    if input_size is not None:
        static = [d for d in spatial if d is not None]
        if any(d is not None and d != s for d, s in zip(spatial, input_size)):
            raise LeanOnnxError(f"{path}: --input-size {input_size[0]},{input_size[1]} differs from the input's "
                                f"static size {static} (shape [{shown}])")
        return layout, channels, tuple(input_size)
    if None in spatial:
        raise LeanOnnxError(f"{path}: input {info.name!r} has a dynamic height/width (shape [{shown}]): "
                            "give --input-size H,W")
    return layout, channels, tuple(spatial)


def load_image_folder(folder: str, model, path: str = "<model>", flag: str = "--data", *,
                      input_size: tuple[int, int] | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      channel_order: str = "rgb", augment: bool = False,
                      samples_per_epoch: int | None = None) -> ImageFolder:
    """Every image under `folder`, decoded for `model`'s input (see the module docstring); broken and
    non-image files are listed in `.skipped`; no readable image at all is one LeanOnnxError."""
    try:
        from PIL import Image  # noqa: F401
    except ImportError:
        raise LeanOnnxError("image folders need Pillow (pip install 'lean-onnx[train]')") from None
    check_normalisation(mean, std)
    if channel_order not in ("rgb", "bgr"):
        raise LeanOnnxError(f"--channel-order {channel_order!r}: choose rgb or bgr")
    layout, channels, size = input_geometry(model, path, input_size)
    if not os.path.isdir(folder):
        raise LeanOnnxError(f"{folder}: {flag}: no such folder")
    images, names, skipped = [], [], []
    for name in _files(folder):
        if not name.lower().endswith(IMAGE_SUFFIXES):
            skipped.append((name, f"not an image file (expected {', '.join(IMAGE_SUFFIXES)})"))
            continue
        try:
            images.append(_decode(os.path.join(folder, name), channels, 2 * max(size)))
            names.append(name)
        except Exception as exc:  # noqa: BLE001 - any undecodable file is skipped the same way
            skipped.append((name, f"not a readable image ({' '.join(str(exc).split())[:160] or type(exc).__name__})"))
    if not images:
        found = f"; skipped {len(skipped)} unreadable or non-image file(s)" if skipped else ""
        raise LeanOnnxError(f"{folder}: {flag}: no readable image ({', '.join(IMAGE_SUFFIXES)}) in the folder "
                            f"or below it{found}")
    return ImageFolder(folder, images, names, size, layout, mean, std, channel_order, augment,
                       samples_per_epoch, skipped)


def _files(folder: str) -> list[str]:
    """Paths below `folder`, relative to it, sorted; hidden files and folders left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files if not f.startswith(".")]
    return sorted(found)


def _decode(path: str, channels: int, shorter_max: int) -> np.ndarray:
    """(H, W, channels) uint8, the shorter side at most `shorter_max`."""
    from PIL import Image, ImageOps

    with Image.open(path) as picture:
        if picture.format == "JPEG":  # decode large JPEGs at a reduced scale directly (never below the bound)
            scale = shorter_max / min(picture.size)
            if scale < 1:
                picture.draft("RGB" if channels == 3 else "L",
                              (math.ceil(picture.size[0] * scale), math.ceil(picture.size[1] * scale)))
        picture.load()
        picture = ImageOps.exif_transpose(picture)
        picture = picture.convert("RGB" if channels == 3 else "L")
    width, height = picture.size
    if min(width, height) > shorter_max:
        scale = shorter_max / min(width, height)
        picture = picture.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                 Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(picture, np.uint8).reshape(picture.size[1], picture.size[0], channels)


# ------------------------------------------------------------------------------------------- options
def parse_floats(flag: str, text: str, count: int = 3) -> tuple[float, ...]:
    """`count` comma-separated floats, or one LeanOnnxError naming the flag."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise LeanOnnxError(f"{flag} {text!r}: expected {count} comma-separated numbers in 0..1 units, e.g. "
                            f"{','.join(map(str, IMAGENET_MEAN if 'mean' in flag else IMAGENET_STD))}")
    return values


def check_normalisation(mean, std) -> None:
    """Mean in [0, 1] and std in (0, 1]: pixel values are in 0..1 units (0..255 values are the usual slip)."""
    if len(mean) != 3 or not all(0 <= m <= 1 for m in mean):
        raise LeanOnnxError(f"--mean {','.join(f'{m:g}' for m in mean)}: expected 3 values in [0, 1] (pixels are "
                            "in 0..1 units; divide 0..255 values by 255)")
    if len(std) != 3 or not all(0 < s <= 1 for s in std):
        raise LeanOnnxError(f"--std {','.join(f'{v:g}' for v in std)}: expected 3 values in (0, 1] (pixels are in 0..1 "
                            "units; divide 0..255 values by 255)")


def parse_size(text: str) -> tuple[int, int]:
    """`H,W` (or `HxW`, or one number for a square) -> (H, W) positive integers."""
    parts = text.lower().replace("x", ",").split(",")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise LeanOnnxError(f"--input-size {text!r}: expected H,W with positive integers, e.g. 224,224")
    return int(parts[0]), int(parts[1])
