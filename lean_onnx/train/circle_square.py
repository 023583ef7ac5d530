"""Circle-Square (CS) data: the LEAN paper's simulated segmentation set (lean-spec.md section 8).

The generator reproduces the reference script (`examples/generate_example_data.py`) exactly: one legacy
numpy stream seeded once with 12345 produces 500 train, 100 val and 50 test images, in that order. So
the test split can only be made by drawing the 600 images before it; `first_images(n)` draws only what
it needs for tests and quick experiments.

Image: 256 x 256, 24 objects of 32 x 32 whose type cycles filled square, hollow square, disc, ring.
Labels: 0 background, 1 square, 2 hollow square (whole square), 3 disc, 4 ring (whole disc).
Noisy input = noiseless + N(0, 1).

Run `python -m lean_onnx.train.circle_square OUT_DIR [--sizes 500,100,50]` to write `train.npz`, `val.npz`, `test.npz`
with `inputs` (N, 1, H, W) float32 noisy images, `targets` (N, H, W) int64 labels and `noiseless`
(N, 1, H, W) float32.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

SEED = 12345
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = (500, 100, 50)
IMAGE_SIZE = 256
OBJECTS_PER_IMAGE = 24
NUM_CLASSES = 5


def shape_templates(object_size: int) -> np.ndarray:
    """(4, s, s) float32: filled square, hollow square, disc, ring (the reference's `tmpl`)."""
    s = object_size
    templates = np.zeros((4, s, s), dtype=np.float32)
    templates[0] = 1
    templates[1] = 1
    templates[1][s // 4:-(s // 4), s // 4:-(s // 4)] = 0
    xx, yy = np.mgrid[-1:1:1j * s, -1:1:1j * s]  # = linspace(-1, 1, s) up to the last bit; as the reference
    radius2 = xx ** 2 + yy ** 2
    templates[2] = radius2 < 1
    templates[3] = radius2 < 1
    templates[3][radius2 < 0.25] = 0
    return templates


def generate_image(rng: np.random.RandomState, image_size: int = IMAGE_SIZE,
                   n_objects: int = OBJECTS_PER_IMAGE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (noisy float32, noiseless float32, label uint8) triple, drawing from `rng` exactly as the
    reference does: per object one `random(2)` per placement try, one `random()` for the grey value;
    then one `normal(size=(n, n))` for the noise. `im` is float32 before the noise is added (as in the
    reference), which fixes the last bit of every noisy pixel."""
    size = image_size // 8
    templates = shape_templates(size)
    noiseless = np.zeros((image_size, image_size), dtype=np.float32)
    label = np.zeros((image_size, image_size), dtype=np.uint8)
    for k in range(n_objects):
        kind = k % 4
        while True:  # retry until the box does not touch an earlier object
            x, y = (rng.random_sample(2) * (image_size - size)).astype(np.int64)
            if label[x:x + size, y:y + size].max() == 0:
                break
        value = rng.random_sample() * 0.8 + 0.2
        noiseless[x:x + size, y:y + size] = templates[kind] * value
        label[x:x + size, y:y + size] = templates[2 * (kind // 2)] * (kind + 1)  # hole counts as object
    noisy = noiseless + rng.normal(size=noiseless.shape)  # float32 + float64 -> float64, as the reference
    return noisy.astype(np.float32), noiseless, label


def first_images(n: int, image_size: int = IMAGE_SIZE, seed: int = SEED) -> dict[str, np.ndarray]:
    """The first `n` images of the stream (the first training images) as one split dict."""
    rng = np.random.RandomState(seed)
    return _stack([generate_image(rng, image_size) for _ in range(n)])


def generate_splits(sizes: tuple[int, ...] = DEFAULT_SIZES, image_size: int = IMAGE_SIZE,
                    seed: int = SEED) -> dict[str, dict[str, np.ndarray]]:
    """{split: {inputs, targets, noiseless}} for train/val/test, drawn from one stream in that order."""
    if len(sizes) != len(SPLITS) or any(int(n) < 0 for n in sizes):
        raise ValueError(f"sizes must be three non-negative counts (train, val, test), got {sizes}")
    rng = np.random.RandomState(seed)
    return {split: _stack([generate_image(rng, image_size) for _ in range(int(n))])
            for split, n in zip(SPLITS, sizes)}


def generate_circle_square(out_dir: str, sizes: tuple[int, ...] = DEFAULT_SIZES,
                           image_size: int = IMAGE_SIZE) -> dict[str, str]:
    """Write `{out_dir}/{train,val,test}.npz` (module docstring); returns {split: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, arrays in generate_splits(tuple(sizes), image_size).items():
        paths[split] = os.path.join(out_dir, f"{split}.npz")
        _save_npz_atomic(paths[split], arrays)
    return paths


def load_split(path: str) -> dict[str, np.ndarray]:
    """Read an `.npz` split into a plain dict (arrays loaded now, file closed)."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _stack(triples: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    if not triples:
        return {"inputs": np.zeros((0, 1, 0, 0), np.float32), "targets": np.zeros((0, 0, 0), np.int64),
                "noiseless": np.zeros((0, 1, 0, 0), np.float32)}
    noisy, clean, label = (np.stack(parts) for parts in zip(*triples))
    return {"inputs": noisy[:, None], "targets": label.astype(np.int64), "noiseless": clean[:, None]}


def _save_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Compressed (the int64 labels shrink ~50x), written beside `path` and renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary data files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _parse_sizes(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three counts TRAIN,VAL,TEST such as 500,100,50")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lean_onnx.train.circle_square", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for train.npz, val.npz, test.npz")
    parser.add_argument("--sizes", type=_parse_sizes, default=DEFAULT_SIZES, metavar="TRAIN,VAL,TEST",
                        help="images per split (default 500,100,50: the paper's; the stream is shared, "
                             "so other sizes give other val/test images)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="side in pixels (default 256)")
    args = parser.parse_args(argv)
    for split, path in generate_circle_square(args.out_dir, args.sizes, args.image_size).items():
        print(f"[I] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
