"""Label-free statistics calibration after pruning (train/calibrate.py, `--calibrate-data`)."""

import subprocess
import sys

import numpy as np
import onnx
import pytest

from lean_onnx.errors import LeanOnnxError
from lean_onnx.rewrite.contract import check_contract
from lean_onnx.rewrite.pruner import Pruner
from lean_onnx.train.calibrate import MAX_SCALE, _match, _targets, calibrate
from tests.helpers import bridge_tensors, without_kept_channel_record, zoo_path

pytestmark = pytest.mark.usefixtures("one_thread")


def _stats(model, tensors, inputs):
    """Per-channel mean and std of `tensors` when `model` runs on `inputs` (through the torch bridge)."""
    found = {}
    for name, value in bridge_tensors(model, inputs, tensors).items():
        flat = value.transpose(0, 1).reshape(value.shape[1], -1).double()
        found[name] = (flat.mean(1).numpy(), flat.std(1, unbiased=False).numpy())
    return found


@pytest.fixture(scope="module")
def pruned(zoo_cache):
    pruner = Pruner(zoo_path("mobilenet_v2", True, zoo_cache))
    inputs = np.random.default_rng(3).standard_normal((12, 3, 64, 64)).astype(np.float32)
    # 0.4: at 0.5 removing all ten residual branches meets the budget (0.508) and no kept layer is thinned
    return pruner, pruner.prune(target_macs=0.4), inputs


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
    # the scales as the layer-by-layer pass found them: a channel's spread there (after the layers before it were
    # corrected) is not the uncorrected model's, and a scale capped at MAX_SCALE cannot reach the original's
    scales = {name: c[0] for name, c in _match(pruner.loaded.original, result.model, targets, inputs, "m").items()}
    moved = 0
    for name, (kept, alive, _, _) in targets.items():
        m0, s0 = original[name][0][kept], original[name][1][kept]
        m, s = after[name]
        ok = alive & (before[name][1] > 1e-3 * s0) & (scales[name] < MAX_SCALE)
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


def _ort(model, inputs):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: inputs[i:i + 1]})[0] for i in range(len(inputs))])


def test_calibrating_the_pruned_model_alone_to_the_teacher_equals_calibrating_at_prune_time(pruned):
    """`calibrate_to_teacher` (what `finetune --teacher` does, from the pruned model's kept-channel record)
    gives the model `calibrate` gives at prune time, and keeps the record."""
    from lean_onnx.rewrite.channel_map import read
    from lean_onnx.train.calibrate import calibrate_to_teacher

    pruner, result, inputs = pruned
    at_prune, info = calibrate(pruner, result, inputs)
    alone, info_alone = calibrate_to_teacher(result.model, pruner.loaded.original, inputs)
    assert info_alone["tensors"] == info["tensors"] and info_alone["channels"] == info["channels"]
    reference, uncalibrated = _ort(at_prune.model, inputs), _ort(result.model, inputs)
    scale = np.abs(reference).max()
    assert np.abs(_ort(alone, inputs) - reference).max() <= 1e-4 * scale
    assert np.abs(uncalibrated - reference).max() > 1e-2 * scale  # calibration did change the model
    assert read(alone).keys() == read(result.model).keys()


def test_conv_transpose_outputs_are_calibrated_along_their_output_channels(zoo_cache):
    """The U-Net's ConvTranspose weights hold output channels on axis 1: after calibration (at prune time and
    from the record) their outputs have the original's statistics too."""
    from lean_onnx.train.calibrate import calibrate_to_teacher

    pruner = Pruner(zoo_path("unet4", True, zoo_cache))
    result = pruner.prune(target_macs=0.5)
    inputs = np.random.default_rng(1).standard_normal((8, 1, 32, 32)).astype(np.float32)
    targets = _targets(pruner._base().graph, result)
    producer = {n.output[0]: n.op_type for n in result.model.graph.node}
    transposed = {name: t for name, t in targets.items() if producer.get(name) == "ConvTranspose"}
    assert transposed and all(t[3] == 1 for t in transposed.values())
    original = _stats(pruner.loaded.original, transposed, inputs)
    for model in (calibrate(pruner, result, inputs)[0].model,
                  calibrate_to_teacher(result.model, pruner.loaded.original, inputs)[0]):
        after = _stats(model, transposed, inputs)
        for name, (kept, alive, _, _) in transposed.items():
            s0 = original[name][1][kept][alive]
            np.testing.assert_allclose(after[name][1][alive], s0, rtol=1e-3, atol=1e-6, err_msg=name)


def test_calibration_to_a_teacher_needs_the_record_and_the_right_teacher(pruned):
    from lean_onnx.train.calibrate import calibrate_to_teacher

    pruner, result, inputs = pruned
    bare = without_kept_channel_record(result.model)
    with pytest.raises(LeanOnnxError, match="no lean-onnx kept-channel record"):
        calibrate_to_teacher(bare, pruner.loaded.original, inputs, path="p.onnx")
    with pytest.raises(LeanOnnxError, match="not the model it was pruned from"):
        calibrate_to_teacher(result.model, result.model, inputs, path="p.onnx", teacher_path="t.onnx")


def test_cli_finetune_with_a_teacher_calibrates_first(pruned, tmp_path):
    """`finetune P OUT --teacher IN`: one line and the report's section for the reconstruction (the default, with
    its learning rate) or the statistics calibration; `--no-calibrate` skips it; a model without a record is
    trained all the same after a [W] line."""
    import json

    pruner, result, inputs = pruned
    np.savez(tmp_path / "train.npz", inputs=inputs)
    onnx.save(result.model, tmp_path / "p.onnx")
    onnx.save(without_kept_channel_record(result.model), tmp_path / "bare.onnx")

    def finetune(model, *extra):
        report = tmp_path / "r.json"
        run = subprocess.run([sys.executable, "-m", "lean_onnx", "finetune", str(tmp_path / model),
                              str(tmp_path / "out.onnx"), "--teacher", pruner.loaded.path, "--data",
                              str(tmp_path / "train.npz"), "--epochs", "1", "--threads", "1", "--report", str(report),
                              *extra], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stderr, json.loads(report.read_text())

    err, report = finetune("p.onnx", "--calibrate-samples", "6")  # the default: reconstruction
    assert "reconstructed" in err and "to the teacher's outputs on 6 training inputs" in err
    assert report["calibration"]["method"] == "reconstruct" and report["calibration"]["samples"] == 6
    assert report["calibration"]["convs"] > 10 and report["settings"]["calibrate_method"] == "reconstruct"
    assert report["settings"]["lr"] == 5e-5  # train/distill.py RECONSTRUCTED_LR
    err, report = finetune("p.onnx", "--calibrate-samples", "6", "--calibrate-method", "statistics", "--lr", "2e-4")
    assert "calibrated" in err and "to the teacher's statistics on 6 training inputs" in err
    assert report["calibration"]["samples"] == 6 and report["calibration"]["channels"] > 0
    assert report["calibration"]["method"] == "statistics" and report["settings"]["lr"] == 2e-4
    assert report["settings"]["calibrate"] is True and report["settings"]["detector_loss"] == "split"
    err, report = finetune("p.onnx", "--no-calibrate", "--detector-loss", "whole")
    assert "calibrated" not in err and report["calibration"] is None and report["settings"]["calibrate"] is False
    assert report["settings"]["detector_loss"] == "whole"
    err, report = finetune("bare.onnx")
    assert "[W] not calibrated:" in err and "no lean-onnx kept-channel record" in err and report["calibration"] is None
    assert report["settings"]["lr"] == 1e-4  # not reconstructed: the distillation default
