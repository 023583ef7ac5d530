"""The iterative schedule (issue 5): steps lower the training loss, keep the contract, and resume exactly."""

import json

import numpy as np
import onnx
import pytest

from lean_onnx.errors import LeanOnnxError
from lean_onnx.graph.cost import model_cost
from lean_onnx.graph.load import load_model
from lean_onnx.rewrite.contract import session
from lean_onnx.train.circle_square import first_images
from lean_onnx.train.schedule import ScheduleConfig, run_schedule, step_keeps
from tests.cli.test_cli import cli
from tests.helpers import zoo_path

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def data():
    images = first_images(4, image_size=32)
    return {"inputs": images["inputs"], "targets": images["targets"]}


@pytest.fixture(scope="module")
def msd(zoo_cache):
    return zoo_path("msd", False, zoo_cache)


def config(**kw):
    base = dict(keep=0.3, steps=2, epochs_per_step=2, batch=2, seed=3, input_shapes={"input": [1, 1, 32, 32]})
    base.update(kw)
    return ScheduleConfig(**base)


def cross_entropy(model: onnx.ModelProto, data: dict) -> float:
    sess = session(model)  # the zoo MS-D has a fixed batch of 1
    logits = np.concatenate([sess.run(None, {"input": x[None]})[0] for x in data["inputs"]]).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.take_along_axis(log_p, data["targets"][:, None], axis=1).mean())


def nonzero_kernels(model: onnx.ModelProto) -> int:
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return sum(int((np.abs(weights[n.input[1]]).reshape(*weights[n.input[1]].shape[:2], -1).max(-1) > 0).sum())
               for n in model.graph.node if n.op_type == "Conv")


def test_step_keeps_follow_the_paper():
    keeps = step_keeps(0.05, 15)
    assert keeps[-1] == 0.05 and len(keeps) == 15
    np.testing.assert_allclose(keeps[:3], [0.8190, 0.6707, 0.5493], atol=1e-4)  # lean-spec section 5


def test_small_schedule_lowers_the_loss_and_keeps_the_contract(tmp_path, msd, data, monkeypatch):
    from lean_onnx.rewrite.pruner import Pruner
    from lean_onnx.train import schedule

    before_finetune = {}
    original_prune = Pruner.prune

    def spy(self, *args, **kwargs):  # record each step's pruned model (before fine-tuning), unchanged
        result = original_prune(self, *args, **kwargs)
        before_finetune[len(before_finetune) + 1] = result.model
        return result

    monkeypatch.setattr(Pruner, "prune", spy)
    state = run_schedule(msd, config(), str(tmp_path), data)
    assert schedule.STATE in {p.name for p in tmp_path.iterdir()} and state["finished"]
    assert [round(r["keep_target"], 4) for r in state["steps"]] == [round(0.3 ** 0.5, 4), 0.3]
    for row in state["steps"]:
        step_model = onnx.load(tmp_path / row["model"])
        onnx.checker.check_model(step_model, full_check=True)
        assert row["max_rel_err_vs_masked"] <= 1e-5  # the contract, checked on every step's prune
        assert row["keep_achieved"] <= row["keep_target"] + 1e-9
        assert nonzero_kernels(step_model) <= row["kernels_kept"]  # pruned kernels stayed zero while training
        assert cross_entropy(step_model, data) < cross_entropy(before_finetune[row["step"]], data)


def test_interrupted_schedule_resumes_to_the_same_result(tmp_path, msd, data):
    whole = run_schedule(msd, config(), str(tmp_path / "a"), data)
    partial = run_schedule(msd, config(), str(tmp_path / "b"), data, stop_after=1)
    assert len(partial["steps"]) == 1 and not partial["finished"]
    resumed = run_schedule(msd, config(), str(tmp_path / "b"), data)
    assert resumed["finished"] and len(resumed["steps"]) == 2
    a, b = onnx.load(tmp_path / "a" / whole["steps"][-1]["model"]), onnx.load(tmp_path / "b" / "step_02.onnx")
    assert {t.name: t.raw_data for t in a.graph.initializer} == {t.name: t.raw_data for t in b.graph.initializer}
    with pytest.raises(Exception, match="other settings"):
        run_schedule(msd, config(seed=4), str(tmp_path / "b"), data)


def test_cli_schedule_writes_out_and_report(tmp_path, msd, data):
    np.savez(tmp_path / "train.npz", **data)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = cli(msd, out, "--keep", "0.5", "--steps", "2", "--finetune-data", tmp_path / "train.npz",
                            "--epochs-per-step", "1", "--batch", "2", "--carry-optimizer", "--report", report)
    assert code == 0, err
    onnx.checker.check_model(str(out), full_check=True)
    state = json.loads(report.read_text())
    assert len(state["steps"]) == 2 and state["steps"][1]["finetune"][0]["epoch"] == 1
    assert {row["finetune_device"] for row in state["steps"]} == {"cuda" if torch.cuda.is_available() else "cpu"}
    assert (tmp_path / "out.onnx.steps" / "step_02.onnx").exists()
    assert state["config"]["carry_optimizer"] and state["steps"][1]["optimizer_carried"] > 0
    assert (tmp_path / "out.onnx.steps" / "step_01.adam.pt").exists()
    code, _, err = cli(msd, out, "--keep", "0.5", "--steps", "3", "--finetune-data", tmp_path / "train.npz")
    assert code == 2 and err.strip().splitlines()[-1].startswith("[E]") and "other settings" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_schedule_missing_gpu_fails_before_pruning(tmp_path, msd, data):
    np.savez(tmp_path / "train.npz", **data)
    out = tmp_path / "out.onnx"
    code, _, err = cli(msd, out, "--keep", "0.5", "--steps", "2", "--finetune-data", tmp_path / "train.npz",
                       "--device", "cuda")
    assert code == 2 and err.strip().splitlines()[-1].startswith("[E]") and "no CUDA" in err
    assert not out.exists() and not (tmp_path / "out.onnx.steps").exists()


@pytest.mark.parametrize("name,fold_bn", [("msd", False), ("unet4", False), ("resnet18", False),
                                          ("mobilenet_v2", True), ("squeezenet1_1", False),
                                          ("shufflenet_v2_x0_5", False)])
def test_slice_like_cuts_arrays_as_the_rewrite_cuts_the_weights(zoo_cache, name, fold_bn):
    """Given the model's own weights, slice_like must return the pruned model's weights exactly: the
    moments of a carried Adam are cut by the very same rewrite (residuals, concats, BN, depthwise convs,
    Split, Gemm heads, Gathers)."""
    from lean_onnx.rewrite.pruner import Pruner

    path = zoo_path(name, fold_bn, zoo_cache)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT}
    pruner = Pruner(path)
    result = pruner.prune(0.2, masked=False, gather_below=0.75)
    pruned = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    cut = pruner.slice_like(result, weights)
    float_pruned = {n for n, v in pruned.items() if v.dtype == np.float32 and v.ndim >= 1 and v.size > 1}
    assert float_pruned - set(cut) <= {n for n in float_pruned if n not in weights and "__" not in n}
    assert any(cut[n].shape != weights[n].shape for n in cut if n in weights)  # something was cut
    for n, value in cut.items():
        assert value.shape == pruned[n].shape and np.array_equal(value, pruned[n]), n


def test_carried_optimizer_changes_the_steps_and_resumes_exactly(tmp_path, msd, data):
    from lean_onnx.train import schedule

    carry = config(carry_optimizer=True, epochs_per_step=1)
    whole = run_schedule(msd, carry, str(tmp_path / "a"), data)
    assert whole["finished"] and "optimizer_carried" not in whole["steps"][0]
    saved = torch.load(tmp_path / "a" / schedule.ADAM.format(1), weights_only=True)
    assert all(float(s["step"]) == 2 for s in saved.values())  # 4 images, batch 2, 1 epoch
    after = torch.load(tmp_path / "a" / schedule.ADAM.format(2), weights_only=True)
    assert all(float(s["step"]) == 4 for s in after.values())  # the count went on, it did not restart
    assert whole["steps"][1]["optimizer_carried"] == len(after) >= 20  # every trainable weight and bias

    fresh = run_schedule(msd, config(epochs_per_step=1), str(tmp_path / "f"), data)
    step2 = {t.name: t.raw_data for t in onnx.load(tmp_path / "a" / "step_02.onnx").graph.initializer}
    assert step2 != {t.name: t.raw_data for t in onnx.load(tmp_path / "f" / fresh["steps"][1]["model"]).graph.initializer}

    run_schedule(msd, carry, str(tmp_path / "b"), data, stop_after=1)
    resumed = run_schedule(msd, carry, str(tmp_path / "b"), data)
    assert resumed["finished"]
    assert {t.name: t.raw_data for t in onnx.load(tmp_path / "b" / "step_02.onnx").graph.initializer} == step2

    run_schedule(msd, carry, str(tmp_path / "c"), data, stop_after=1)
    (tmp_path / "c" / schedule.ADAM.format(1)).unlink()
    with pytest.raises(Exception, match="optimizer state"):
        run_schedule(msd, carry, str(tmp_path / "c"), data)


def test_a_folder_from_before_a_config_field_existed_still_resumes():
    from dataclasses import asdict

    from lean_onnx.train.schedule import settings_differ

    saved = asdict(config())
    del saved["carry_optimizer"]  # written before the field existed: it meant the default
    assert settings_differ({"input_sha256": "x", "config": saved}, "x", config()) == []
    assert settings_differ({"input_sha256": "x", "config": saved}, "x", config(carry_optimizer=True))


@pytest.fixture(scope="module")
def unet(zoo_cache):  # MS-D's layers are one channel wide: no channel can leave, so budgets use the U-Net
    return zoo_path("unet4", True, zoo_cache)


@pytest.fixture(scope="module")
def trained_unet(unet, tmp_path_factory):
    """The zoo U-Net trained a little on Circle-Square, so it is a teacher worth distilling from."""
    from lean_onnx.train.finetune import finetune

    images = first_images(8, image_size=32)
    model, _ = finetune(onnx.load(unet), images, epochs=6, lr=1e-2, batch=2, seed=0)
    path = tmp_path_factory.mktemp("teacher") / "unet_trained.onnx"
    onnx.save(model, path)
    return str(path), images


def test_budget_schedule_with_a_teacher(tmp_path, trained_unet):
    """--target-macs in steps (target^(t/steps) of the original's MACs), distilling from the original after
    every step on inputs only: the MACs follow the steps, the contract holds at every step, the distillation
    loss falls in every step, the teacher file is untouched, and fine-tuning keeps each step's architecture."""
    from lean_onnx.io.save import sha256

    path, images = trained_unet
    digest = sha256(path)
    budget = dict(keep=None, target_macs=0.5, min_channels=0.1, epochs_per_step=2)
    state = run_schedule(path, config(**budget), str(tmp_path / "d"), {"inputs": images["inputs"]},
                         teacher=onnx.load(path))
    assert state["finished"] and [row["target_kind"] for row in state["steps"]] == ["macs", "macs"]
    for row, target in zip(state["steps"], step_keeps(0.5, 2)):
        assert abs(row["macs_ratio"] - target) <= 0.05 and row["max_rel_err_vs_masked"] < 1e-4
        losses = [epoch["train_loss"] for epoch in row["finetune"]]
        assert len(losses) == 2 and losses[1] < losses[0]
    plain = run_schedule(path, config(**{**budget, "epochs_per_step": 0}), str(tmp_path / "p"), None)
    assert abs(plain["steps"][-1]["macs_ratio"] - 0.5) <= 0.05 and sha256(path) == digest
    distilled, pruned_only = (onnx.load(tmp_path / f / "step_02.onnx") for f in ("d", "p"))
    for model, run in ((distilled, state), (pruned_only, plain)):  # fine-tuning keeps the step's architecture
        assert model_cost(load_model(model))["macs"] == run["steps"][-1]["macs"]
    assert [t.raw_data for t in distilled.graph.initializer] != [t.raw_data for t in pruned_only.graph.initializer]


def test_cli_budget_schedule_with_teacher_resumes_and_refuses_another_teacher(tmp_path, unet, data, zoo_cache):
    """The main command: --target-macs with --steps and --teacher on inputs only, resumed, and refused with
    another teacher or a latency target."""
    np.savez(tmp_path / "inputs.npz", inputs=data["inputs"])
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    args = ["--target-macs", "0.6", "--steps", "2", "--finetune-data", tmp_path / "inputs.npz",
            "--epochs-per-step", "1", "--batch", "2", "--teacher", unet]
    code, stdout, err = cli(unet, out, *args, "--report", report)
    assert code == 0, err
    onnx.checker.check_model(str(out), full_check=True)
    state = json.loads(report.read_text())
    assert state["config"]["teacher"] and state["config"]["target_macs"] == 0.6
    assert abs(state["steps"][-1]["macs_ratio"] - 0.6) <= 0.05 and "MACs target" in stdout
    code, _, err = cli(unet, out, *args)  # the same run again: every step is there, nothing is redone
    assert code == 0 and "resuming after step 2/2" in err
    other = zoo_path("unet4", False, zoo_cache)  # another model as teacher: other settings, refused
    code, _, err = cli(unet, out, *args[:-1], other)
    assert code == 2 and err.strip().splitlines()[-1].startswith("[E]") and "other settings" in err
    code, _, err = cli(unet, out, "--target-latency", "0.6", "--steps", "2")
    assert code == 2 and "latency target" in err


def test_budget_schedule_calibrates_every_step(tmp_path, trained_unet):
    """`calibration` inputs: every step's pruned model gets its input model's channel statistics before the
    fine-tuning; the contract holds for the calibrated model, the steps' outputs are closer to the original's
    than without calibration, and a folder made with other calibration inputs is not resumed."""
    path, images = trained_unet
    budget = dict(keep=None, target_macs=0.4, min_channels=0.1, epochs_per_step=0)
    inputs = images["inputs"]
    calibrated = run_schedule(path, config(**budget), str(tmp_path / "c"), None, calibration=inputs)
    plain = run_schedule(path, config(**budget), str(tmp_path / "p"), None)
    assert calibrated["config"]["calibrate_data"] and plain["config"]["calibrate_data"] is None

    def run(model):  # the zoo U-Net has a fixed batch of 1
        sess = session(model)
        return np.concatenate([sess.run(None, {"input": x[None]})[0] for x in inputs])

    reference = run(onnx.load(path))

    def error(folder):  # mean squared error of the last step's output to the original's, on the inputs
        return float(((run(onnx.load(tmp_path / folder / "step_02.onnx")) - reference) ** 2).mean())

    for row, other in zip(calibrated["steps"], plain["steps"]):
        assert row["calibration"]["channels"] > 0 and row["calibration"]["samples"] == len(inputs)
        assert row["max_rel_err_vs_masked"] < 1e-4 and "calibration" not in other
        assert abs(row["macs_ratio"] - row["keep_target"]) <= 0.05
    # calibration changes values, never shapes: step 1 prunes the same original alike (step 2 prunes another)
    assert calibrated["steps"][0]["macs"] == plain["steps"][0]["macs"]
    assert error("c") < error("p")
    with pytest.raises(LeanOnnxError, match="other settings"):
        run_schedule(path, config(**budget), str(tmp_path / "c"), None, calibration=inputs[::-1].copy())


def test_cli_schedule_with_calibrate_data(tmp_path, unet, data):
    """`--calibrate-data` with `--steps`: every step is reconstructed (the default `--calibrate-method`; the
    state says so per step, and the contract holds) before its distillation; it was silently ignored by the
    schedule before."""
    np.savez(tmp_path / "inputs.npz", inputs=data["inputs"])
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, _, err = cli(unet, out, "--target-macs", "0.6", "--steps", "2", "--finetune-data", tmp_path / "inputs.npz",
                       "--epochs-per-step", "1", "--batch", "2", "--teacher", unet,
                       "--calibrate-data", tmp_path / "inputs.npz", "--report", report)
    assert code == 0, err
    assert "calibrating every step on 4 inputs" in err and "reconstructed" in err  # --calibrate-method's default
    state = json.loads(report.read_text())
    assert all(row["calibration"]["samples"] == 4 for row in state["steps"]) and len(state["steps"]) == 2
    assert all(row["calibration"]["method"] == "reconstruct" and row["max_rel_err_vs_masked"] < 1e-4
               for row in state["steps"])
    onnx.checker.check_model(str(out), full_check=True)
    code, _, err = cli(unet, out, "--target-macs", "0.6", "--steps", "2", "--calibrate-data", tmp_path / "no.npz")
    assert code == 2 and "no such file" in err
