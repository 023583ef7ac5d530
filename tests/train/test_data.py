"""Circle-Square generator (lean-spec.md section 8): pinned values so the stream cannot drift."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lean_onnx.train.circle_square import first_images, generate_circle_square, load_split, shape_templates

SQUARE_AREA, DISC_AREA = 32 * 32, 740  # pixels of the 32x32 templates (hole included in labels)


@pytest.fixture(scope="module")
def image0():
    data = first_images(1)
    return data["inputs"][0, 0], data["noiseless"][0, 0], data["targets"][0]


def test_arrays_have_the_documented_layout():
    data = first_images(2, image_size=64)
    assert data["inputs"].shape == (2, 1, 64, 64) and data["inputs"].dtype == np.float32
    assert data["noiseless"].shape == (2, 1, 64, 64) and data["noiseless"].dtype == np.float32
    assert data["targets"].shape == (2, 64, 64) and data["targets"].dtype == np.int64


def test_image0_pixels_are_pinned(image0):
    """Values produced by the generator after checking it line by line against the spec."""
    noisy, clean, label = image0
    np.testing.assert_array_equal(noisy[0, :4], np.array([-0.4170644, -0.017007036, -1.2241453, -1.8008399],
                                                           np.float32))
    assert noisy[100, 200] == np.float32(1.2553871)
    assert noisy[255, 255] == np.float32(-1.7061325)
    assert label.sum() == 49512
    assert float(noisy.astype(np.float64).sum()) == pytest.approx(10456.078835311853, rel=1e-9)
    assert float(clean.astype(np.float64).sum()) == pytest.approx(10496.969242811203, rel=1e-9)


def test_first_object_follows_the_spec(image0):
    """Object 0: one random(2) -> box corner floor(U * 224), one random() -> v = 0.2 + 0.8 U; filled square."""
    _, clean, label = image0
    rng = np.random.RandomState(12345)
    x, y = (rng.random_sample(2) * 224).astype(int)
    value = 0.2 + 0.8 * rng.random_sample()
    assert (x, y) == (208, 70)
    assert np.all(label[x:x + 32, y:y + 32] == 1)
    assert np.all(clean[x:x + 32, y:y + 32] == np.float32(value))


def test_six_objects_of_each_class(image0):
    noisy, clean, label = image0
    counts = np.bincount(label.ravel(), minlength=5)
    assert counts[1:].tolist() == [6 * SQUARE_AREA, 6 * SQUARE_AREA, 6 * DISC_AREA, 6 * DISC_AREA]
    templates = shape_templates(32)
    assert templates[2].sum() == DISC_AREA and templates[1].sum() == SQUARE_AREA - 16 * 16
    assert templates[3].sum() < DISC_AREA  # the ring's hole is background in the image, class 4 in labels
    # holes: labelled as the object, but dark in the image
    assert np.sum((label == 2) & (clean == 0)) == 6 * 16 * 16
    assert np.sum((label == 4) & (clean == 0)) == 6 * (DISC_AREA - int(templates[3].sum()))
    values = clean[label > 0]
    assert values[values > 0].min() >= 0.2 and values.max() <= 1.0
    noise = (noisy.astype(np.float64) - clean)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


def test_splits_come_from_one_stream_in_order(tmp_path):
    """train, val, test are images 0.., 500.., 600.. of the same stream (the test split needs 600 first)."""
    stream = first_images(601)
    paths = generate_circle_square(str(tmp_path), sizes=(500, 100, 1))
    splits = {name: load_split(path) for name, path in paths.items()}
    for name, index in (("train", 0), ("val", 0), ("test", 0)):
        position = {"train": 0, "val": 500, "test": 600}[name] + index
        for key in ("inputs", "targets", "noiseless"):
            np.testing.assert_array_equal(splits[name][key][index], stream[key][position])
    assert len(splits["train"]["inputs"]) == 500 and len(splits["val"]["inputs"]) == 100


def test_module_cli_writes_the_three_files(tmp_path):
    out = tmp_path / "cs"
    subprocess.run([sys.executable, "-m", "lean_onnx.train.circle_square", str(out), "--sizes", "2,1,1", "--image-size", "64"],
                   check=True, capture_output=True)
    sizes = {name: load_split(str(out / f"{name}.npz"))["inputs"].shape[0] for name in ("train", "val", "test")}
    assert sizes == {"train": 2, "val": 1, "test": 1}
    bad = subprocess.run([sys.executable, "-m", "lean_onnx.train.circle_square", str(out), "--sizes", "2,1"], capture_output=True)
    assert bad.returncode == 2
