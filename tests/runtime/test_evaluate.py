"""`lean-onnx eval` and its metrics: hand-computed values, real ONNX models, real ORT sessions."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lean_onnx.cli import main
from lean_onnx.errors import LeanOnnxError
from lean_onnx.runtime.datasets import normalise
from lean_onnx.runtime.evaluate import Accumulator, confusion_matrix, evaluate, global_accuracy, miou, mse, psnr, top1
from tests.helpers import assert_one_line_error, save, text_model

ROOT = pathlib.Path(__file__).resolve().parents[2]

IDENTITY = """
g (float[N,3,2,2] x) => (float[N,3,2,2] y) {
  y = Identity (x)
}"""
#: logits = per-channel means: the class is the channel with the largest mean
POOL = """
g (float[N,3,H,W] x) => (float[N,3] y) {
  p = GlobalAveragePool (x)
  y = Flatten (p)
}"""
POOL_FIXED_BATCH = POOL.replace("float[N,3,H,W] x", "float[2,3,4,4] x").replace("float[N,3] y", "float[2,3] y")

#: two 2x2 label maps over 3 classes, and the predictions (argmax) the test logits encode
TARGET_MAPS = np.array([[[0, 0], [1, 1]], [[2, 2], [0, 1]]])
PRED_MAPS = np.array([[[0, 1], [1, 1]], [[2, 0], [0, 1]]])
#: rows = target, columns = prediction, counted by hand from the two maps above
CONFUSION = np.array([[2, 1, 0], [0, 3, 0], [1, 0, 1]])
#: correct 6 of 8 pixels; IoU 0: 2/(3+3-2), 1: 3/(3+4-3), 2: 1/(2+1-1)
ACCURACY, MIOU = 6 / 8, (2 / 4 + 3 / 4 + 1 / 2) / 3

#: 7 items for top1: the hot channel of each item, and labels that agree on 5 of them
HOT = np.array([0, 1, 2, 2, 1, 0, 1])
LABELS = np.array([0, 1, 2, 0, 1, 0, 2])
TOP1 = 5 / 7


def one_hot_logits(pred_maps: np.ndarray, classes: int = 3) -> np.ndarray:
    return np.moveaxis(np.eye(classes, dtype=np.float32)[pred_maps], -1, 1)  # (N, classes, H, W)


def hot_images(hot: np.ndarray, size: int = 4) -> np.ndarray:
    images = np.full((len(hot), 3, size, size), 0.1, np.float32)
    images[np.arange(len(hot)), hot] = 0.9
    return images


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def eval_json(capsys, *args):
    code, out, err = run_cli(capsys, "eval", *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    paths = {"identity": save(text_model(IDENTITY), folder / "identity.onnx"),
             "pool": save(text_model(POOL), folder / "pool.onnx"),
             "pool2": save(text_model(POOL_FIXED_BATCH), folder / "pool2.onnx"),
             "seg": str(folder / "seg.npz"), "cls": str(folder / "cls.npz"), "img": str(folder / "img.npz"),
             "folder": folder}
    np.savez(paths["seg"], inputs=one_hot_logits(PRED_MAPS), targets=TARGET_MAPS)
    np.savez(paths["cls"], inputs=hot_images(HOT), targets=LABELS)
    outputs = np.zeros((2, 3, 2, 2), np.float32)
    targets = outputs.copy()
    targets[0, 0, 0, 0], targets[1, 2, 1, 1] = 0.5, 1.0  # squared errors 0.25 and 1.0 over 24 values
    np.savez(paths["img"], inputs=outputs, targets=targets)
    return paths


# ----------------------------------------------------------------------------- metric functions


def test_top1_by_hand():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert top1(logits, np.array([1, 1, 1])) == pytest.approx(2 / 3)
    assert top1(logits[:, :, None, None], np.array([1, 0, 1])) == 1.0  # (N, K, 1, 1) classifier heads


def test_confusion_matrix_accuracy_and_miou_by_hand():
    confusion = confusion_matrix(PRED_MAPS, TARGET_MAPS, 3)
    assert confusion.tolist() == CONFUSION.tolist()
    assert global_accuracy(confusion) == pytest.approx(0.75)
    assert miou(confusion) == pytest.approx(0.5833333333)  # differs from the pixel accuracy
    # a 4th class that appears nowhere is not averaged; one that is only predicted counts with IoU 0
    assert miou(confusion_matrix(PRED_MAPS, TARGET_MAPS, 4)) == pytest.approx(MIOU)
    pred = PRED_MAPS.copy()
    pred[0, 0, 0] = 3
    assert miou(confusion_matrix(pred, TARGET_MAPS, 4)) == pytest.approx((1 / 4 + 3 / 4 + 1 / 2 + 0) / 4)


def test_global_accuracy_is_over_pixels_not_a_mean_of_images():
    """With void pixels (255, ignored) images count differently: 4 of 5 pixels, not (0/1 + 4/4) / 2."""
    target = np.array([[[0, 255], [255, 255]], [[1, 1], [0, 0]]])
    pred = np.array([[[1, 0], [0, 0]], [[1, 1], [0, 0]]])
    assert global_accuracy(confusion_matrix(pred, target, 2)) == pytest.approx(4 / 5)


def test_mse_and_psnr_by_hand():
    output = np.array([[0.0, 0.5], [1.0, 1.0]])
    target = np.array([[0.0, 0.0], [1.0, 0.5]])
    assert mse(output, target) == pytest.approx(0.125)
    assert psnr(output, target) == pytest.approx(10 * math.log10(8))  # 9.0309 dB
    assert psnr(output, target, data_range=2.0) == pytest.approx(10 * math.log10(32))
    assert psnr(target, target) == math.inf


def test_streaming_equals_the_whole_split():
    rng = np.random.default_rng(1)
    logits, maps = rng.standard_normal((7, 4, 3, 3)), rng.integers(0, 4, (7, 3, 3))
    for metric in ("global-accuracy", "miou"):
        acc = Accumulator(metric)
        for lo in range(0, 7, 3):
            acc.update(logits[lo:lo + 3], maps[lo:lo + 3])
        whole = confusion_matrix(logits.argmax(1), maps, 4)
        assert acc.value() == pytest.approx(global_accuracy(whole) if metric == "global-accuracy" else miou(whole))
    acc = Accumulator("psnr", data_range=2.0)
    images = rng.standard_normal((7, 3, 4, 4))
    for lo in range(0, 7, 2):
        acc.update(images[lo:lo + 2], np.zeros((len(images[lo:lo + 2]), 3, 4, 4)))
    assert acc.value() == pytest.approx(psnr(images, np.zeros_like(images), 2.0))


def test_normalise_per_channel():
    x = np.ones((1, 2, 1, 1), np.float32)
    assert normalise(x, [0.5, 0.0], [0.25, 2.0]).ravel().tolist() == [2.0, 0.5]
    assert normalise(x, [1.0], None).ravel().tolist() == [0.0, 0.0]
    with pytest.raises(LeanOnnxError, match="3 values for 2 channels"):
        normalise(x, [0.1, 0.2, 0.3], None)


# ---------------------------------------------------------------------------------- CLI and library


@pytest.mark.parametrize("metric, expected", [("global-accuracy", ACCURACY), ("miou", MIOU)])
def test_segmentation_metrics_end_to_end(capsys, files, metric, expected):
    result = eval_json(capsys, files["identity"], "--data", files["seg"], "--metric", metric)
    assert set(result) == {"model", "data", "metric", "value", "count", "provider", "seconds"}
    assert result["value"] == pytest.approx(expected)
    assert (result["count"], result["metric"], result["data"]) == (2, metric, files["seg"])
    assert result["provider"] == "CPUExecutionProvider" and result["seconds"] >= 0


def test_mse_and_psnr_end_to_end(capsys, files):
    expected_mse = (0.25 + 1.0) / 24
    result = eval_json(capsys, files["identity"], "--data", files["img"], "--metric", "mse", "--batch", "1")
    assert result["value"] == pytest.approx(expected_mse)
    result = eval_json(capsys, files["identity"], "--data", files["img"], "--metric", "psnr", "--data-range", "2")
    assert result["value"] == pytest.approx(10 * math.log10(4 / expected_mse))
    np.savez(files["folder"] / "same.npz", inputs=np.ones((1, 3, 2, 2), np.float32),
             targets=np.ones((1, 3, 2, 2), np.float32))
    result = eval_json(capsys, files["identity"], "--data", files["folder"] / "same.npz", "--metric", "psnr")
    assert result["value"] == "inf"


@pytest.mark.parametrize("model, batch", [("pool", "1"), ("pool", "3"), ("pool", "8"), ("pool2", "1")])
def test_top1_does_not_depend_on_batching(capsys, files, model, batch):
    """7 items in batches of 1, 3 (the last one short) and 8; pool2 has its batch fixed at 2 (padded)."""
    result = eval_json(capsys, files[model], "--data", files["cls"], "--metric", "top1", "--batch", batch)
    assert result["value"] == pytest.approx(TOP1) and result["count"] == 7


def test_table_output(capsys, files):
    code, out, err = run_cli(capsys, "eval", files["pool"], "--data", files["cls"], "--metric", "top1")
    assert code == 0, err
    assert "top1" in out and f"{TOP1:.6g}" in out and "(7 items)" in out and "CPUExecutionProvider" in out


def test_image_folder(capsys, files):
    """Folders sort as a_red, b_green, c_blue = classes 0, 1, 2 = the RGB channel that is brightest."""
    from skimage import io

    root = files["folder"] / "images"
    colours = {"a_red": [0, 1], "b_green": [1], "c_blue": [2]}  # a green image filed under a_red: 3 of 4
    for name, channels in colours.items():
        (root / name).mkdir(parents=True)
        for k, channel in enumerate(channels):
            image = np.full((5, 6, 3), 30, np.uint8)
            image[:, :, channel] = 220
            io.imsave(root / name / f"{k}.png", image, check_contrast=False)
    result = eval_json(capsys, files["pool"], "--data", root, "--metric", "top1", "--batch", "3")
    assert result["value"] == pytest.approx(3 / 4) and result["count"] == 4
    result = eval_json(capsys, files["pool"], "--data", root, "--metric", "top1", "--resize", "3x3",
                       "--mean", "0.5,0.5,0.5", "--std", "0.25")
    assert result["value"] == pytest.approx(3 / 4)
    io.imsave(root / "c_blue" / "odd.png", np.zeros((4, 4, 3), np.uint8), check_contrast=False)
    code, out, err = run_cli(capsys, "eval", files["pool"], "--data", root, "--metric", "top1")
    assert_one_line_error(code, err, 2, "differ in shape", "--resize")
    assert eval_json(capsys, files["pool"], "--data", root, "--metric", "top1", "--resize", "4x4")["count"] == 5


def test_library_evaluate_takes_arrays_and_protos():
    result = evaluate(text_model(POOL), hot_images(HOT), LABELS, "top1", batch=4, provider="cpu")
    assert result["value"] == pytest.approx(TOP1) and result["count"] == 7 and result["warnings"] == []
    result = evaluate(text_model(IDENTITY), one_hot_logits(PRED_MAPS), TARGET_MAPS.astype(np.float32), "miou")
    assert result["value"] == pytest.approx(MIOU)


@pytest.mark.parametrize("case, needles", [
    ("missing-data", ("missing.npz", "no such file")),
    ("no-targets", ("no array named 'targets'",)),
    ("not-npz", ("not a readable .npz",)),
    ("item-shape", ("data items have shape 3x4x4", "3x2x2")),
    ("count", ("same number",)),
    ("metric", ("--metric", "invalid choice")),
    ("folder-metric", ("only --metric top1",)),
    ("float-labels", ("integer class labels",)),
    ("missing-model", ("nope.onnx", "no such file")),
])
def test_errors_are_one_line_and_exit_2(capsys, files, case, needles):
    folder = files["folder"]
    np.savez(folder / "no_targets.npz", inputs=np.zeros((2, 3, 2, 2), np.float32))
    np.savez(folder / "big.npz", inputs=np.zeros((2, 3, 4, 4), np.float32), targets=np.zeros((2, 3, 4, 4)))
    np.savez(folder / "count.npz", inputs=np.zeros((2, 3, 2, 2), np.float32), targets=np.zeros(3, np.int64))
    np.savez(folder / "soft.npz", inputs=np.zeros((2, 3, 2, 2), np.float32), targets=np.full((2, 2, 2), 0.5))
    (folder / "text.npz").write_text("not an archive")
    (folder / "cls_folder" / "a").mkdir(parents=True, exist_ok=True)
    model, data, metric = files["identity"], files["seg"], "miou"
    data, model, metric = {
        "missing-data": (folder / "missing.npz", model, metric), "no-targets": (folder / "no_targets.npz", model, metric),
        "not-npz": (folder / "text.npz", model, metric), "item-shape": (folder / "big.npz", model, "mse"),
        "count": (folder / "count.npz", model, "mse"), "metric": (data, model, "top5"),
        "folder-metric": (folder / "cls_folder", model, "miou"), "float-labels": (folder / "soft.npz", model, metric),
        "missing-model": (data, folder / "nope.onnx", metric)}[case]
    code, out, err = run_cli(capsys, "eval", model, "--data", data, "--metric", metric)
    assert_one_line_error(code, err, 2, *needles)
    assert out == ""


def test_python_dash_m_end_to_end(files):
    proc = subprocess.run([sys.executable, "-m", "lean_onnx", "eval", files["identity"], "--data", files["seg"],
                           "--metric", "global-accuracy", "--json", "--provider", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["value"] == pytest.approx(ACCURACY)
    assert "Traceback" not in proc.stderr
