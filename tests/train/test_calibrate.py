"""Label-free statistics calibration after pruning (train/calibrate.py, `--calibrate-data`)."""

import subprocess
import sys

import numpy as np
import onnx
import pytest

from lean_onnx.errors import LeanOnnxError
from lean_onnx.rewrite.contract import check_contract
from lean_onnx.rewrite.pruner import Pruner
from lean_onnx.train.bridge import to_torch
from lean_onnx.train.calibrate import MAX_SCALE, _targets, calibrate
from tests.helpers import zoo_path

pytestmark = pytest.mark.usefixtures("one_thread")


def _stats(model, tensors, inputs):
    """Per-channel mean and std of `tensors` when `model` runs on `inputs` (through the torch bridge)."""
    import torch

    found = {}

    def hook(ctx, outputs, results):
        for name, value in zip(outputs, results):
            if name in tensors:
                flat = value.detach().transpose(0, 1).reshape(value.shape[1], -1).double()
                found[name] = (flat.mean(1).numpy(), flat.std(1, unbiased=False).numpy())
        return results

    module = to_torch(model)
    module.node_hook = hook
    with torch.no_grad():
        module(torch.from_numpy(inputs))
    return found


@pytest.fixture(scope="module")
def pruned(zoo_cache):
    pruner = Pruner(zoo_path("mobilenet_v2", True, zoo_cache))
    inputs = np.random.default_rng(3).standard_normal((12, 3, 64, 64)).astype(np.float32)
    return pruner, pruner.prune(target_macs=0.5), inputs


def test_kept_channels_get_the_originals_statistics(pruned):
    """After calibration every corrected channel has, on the calibration inputs, the mean and spread the
    same channel has in the original (where the scale was not capped); before it, they differ."""
    pruner, result, inputs = pruned
    calibrated, info = calibrate(pruner, result, inputs)
    targets = _targets(pruner._base().graph, result)
    assert info["tensors"] == len(targets) > 10 and info["samples"] == 12
    original = _stats(pruner.loaded.original, targets, inputs)
    before = _stats(result.model, targets, inputs)
    after = _stats(calibrated.model, targets, inputs)
    moved = 0
    for name, (kept, alive, _) in targets.items():
        m0, s0 = original[name][0][kept], original[name][1][kept]
        m, s = after[name]
        ok = alive & (before[name][1] > 1e-3 * s0) & (s0 / np.maximum(before[name][1], 1e-30) < MAX_SCALE)
        assert np.array_equal(m[~alive], before[name][0][~alive])  # dead channels are left as they are
        scale = np.abs(m0[ok]).max(initial=0) + s0[ok].max(initial=0) + 1e-12
        assert np.abs(m[ok] - m0[ok]).max(initial=0) <= 1e-3 * scale, name
        assert np.abs(s[ok] - s0[ok]).max(initial=0) <= 1e-3 * scale, name
        moved += int((np.abs(before[name][0] - m0) > 1e-2 * scale).any())
    assert moved > 5  # pruning had shifted them


def test_calibrated_pruned_still_equals_masked_and_the_input_is_kept(pruned):
    pruner, result, inputs = pruned
    before = pruner.loaded.original.SerializeToString()
    calibrated, _ = calibrate(pruner, result, inputs)
    check_contract(pruner.loaded.original, calibrated, pruner.loaded.input_shapes, np.random.default_rng(0))
    assert pruner.loaded.original.SerializeToString() == before
    assert calibrated.report["calibration"]["channels"] > 0
    shapes = lambda m: {t.name: tuple(t.dims) for t in m.graph.initializer}  # noqa: E731
    assert shapes(calibrated.model) == shapes(result.model)  # the same architecture, other values
    changed = [t.name for t, u in zip(calibrated.model.graph.initializer, result.model.graph.initializer)
               if t.raw_data != u.raw_data]
    assert changed


def test_calibration_brings_the_output_closer_to_the_originals(pruned):
    """On the calibration inputs, the calibrated model's outputs are closer to the original's."""
    import onnxruntime as ort

    pruner, result, inputs = pruned
    calibrated, _ = calibrate(pruner, result, inputs)
    def run(model):  # the zoo model has batch 1: one input at a time
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: inputs[i:i + 1]})[0] for i in range(len(inputs))])

    reference = run(pruner.loaded.original)
    assert np.abs(run(calibrated.model) - reference).mean() < np.abs(run(result.model) - reference).mean()


def test_too_few_inputs_is_an_error(pruned):
    pruner, result, inputs = pruned
    with pytest.raises(LeanOnnxError, match="at least 2 inputs"):
        calibrate(pruner, result, inputs[:1])


def test_cli_calibrate_data(pruned, tmp_path):
    """`--calibrate-data` with an .npz: exit 0, the report's calibration section, pruned == masked (--validate);
    a missing source is one [E] line and exit 2, with nothing written."""
    pruner, _, inputs = pruned
    np.savez(tmp_path / "cal.npz", inputs=inputs)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "lean_onnx", pruner.loaded.path, str(out), "--target-macs", "0.5",
           "--calibrate-data", str(tmp_path / "cal.npz"), "--calibrate-samples", "8", "--validate",
           "--report", str(report)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    import json

    data = json.loads(report.read_text())
    assert data["calibration"]["samples"] == 8
    assert data["validation"]["max_rel_err_vs_masked"] <= 1e-5 and "PASSED" in run.stdout
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    missing = subprocess.run(cmd[:4] + [str(tmp_path / "other.onnx"), "--target-macs", "0.5", "--calibrate-data",
                                        str(tmp_path / "nope.npz")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("[E]") and "nope.npz" in missing.stderr
    assert not (tmp_path / "other.onnx").exists()
