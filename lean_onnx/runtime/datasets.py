"""Evaluation data a user has: an `.npz` (`inputs`, `targets`) or an image folder DATA/<class>/*.png|jpg,
normalised per channel with --mean/--std."""

from __future__ import annotations

import os

import numpy as np

from ..errors import LeanOnnxError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """`inputs` (N, C, H, W) and `targets` (N,) labels, (N, H, W) label maps or images like the output."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("inputs", "targets") if k not in data.files]
            if missing:
                raise LeanOnnxError(f"{path}: no array named {' or '.join(map(repr, missing))} "
                                    f"(arrays: {', '.join(data.files) or 'none'})")
            return data["inputs"], data["targets"]
    except LeanOnnxError:
        raise
    except Exception as exc:
        raise LeanOnnxError(f"{path}: not a readable .npz file ({str(exc).strip().splitlines()[0][:200]})") from None


def load_image_folder(path: str, resize: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DATA/<class name>/*.png|jpg|jpeg; class index = position of the folder in sorted order; images as
    float32 in [0, 1], CHW (grayscale gets C = 1, an alpha channel is dropped), resized only on request."""
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    files = [(os.path.join(path, c, f), k) for k, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(path, c))) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise LeanOnnxError(f"{path}: no images in class folders (expected {path}/<class>/*.png|jpg)")
    images = [_read_image(f, resize) for f, _ in files]
    shapes = {img.shape for img in images}
    if len(shapes) > 1:
        raise LeanOnnxError(f"{path}: images differ in shape ({', '.join(sorted(map(str, shapes)))[:200]}); "
                            "use --resize HxW")
    return np.stack(images), np.array([k for _, k in files], dtype=np.int64)


def _read_image(path: str, resize: tuple[int, int] | None) -> np.ndarray:
    try:
        from skimage import io, transform, util
    except ImportError:
        raise LeanOnnxError("image folders need scikit-image (pip install scikit-image)") from None
    try:
        image = util.img_as_float32(io.imread(path))
    except Exception as exc:
        raise LeanOnnxError(f"{path}: not a readable image ({str(exc).strip().splitlines()[0][:200]})") from None
    if image.ndim == 2:
        image = image[:, :, None]
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    if resize:
        image = transform.resize(image, resize, order=1, anti_aliasing=True, preserve_range=True)
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def normalise(inputs: np.ndarray, mean: list[float] | None, std: list[float] | None) -> np.ndarray:
    """(x - mean[c]) / std[c] along axis 1; one value applies to every channel."""
    if mean is None and std is None:
        return inputs
    channels = inputs.shape[1] if inputs.ndim >= 2 else 1
    shape = (1, -1) + (1,) * max(inputs.ndim - 2, 0)
    values = []
    for flag, given, default in (("--mean", mean, 0.0), ("--std", std, 1.0)):
        given = given if given is not None else [default]
        if len(given) not in (1, channels):
            raise LeanOnnxError(f"{flag}: {len(given)} values for {channels} channels (give 1 or {channels})")
        values.append(np.asarray(given, np.float32).reshape(shape))
    if np.any(values[1] == 0):
        raise LeanOnnxError("--std: values must be non-zero")
    return ((inputs.astype(np.float32) - values[0]) / values[1]).astype(np.float32)


def load_data(path: str, resize=None, mean=None, std=None) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.exists(path):
        raise LeanOnnxError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        inputs, targets = load_image_folder(path, resize)
    else:
        inputs, targets = load_npz(path)
    return normalise(inputs, mean, std), targets
