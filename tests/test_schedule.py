"""The iterative schedule (issue 5): steps lower the training loss, keep the contract, and resume exactly."""

import json

import numpy as np
import onnx
import pytest

from lean_onnx.contract import session
from lean_onnx.data import first_images
from lean_onnx.schedule import ScheduleConfig, run_schedule, step_keeps
from tests.helpers import zoo_path
from tests.test_cli import cli

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
    from lean_onnx import schedule
    from lean_onnx.prune import Pruner

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
                            "--epochs-per-step", "1", "--batch", "2", "--report", report)
    assert code == 0, err
    onnx.checker.check_model(str(out), full_check=True)
    state = json.loads(report.read_text())
    assert len(state["steps"]) == 2 and state["steps"][1]["finetune"][0]["epoch"] == 1
    assert {row["finetune_device"] for row in state["steps"]} == {"cuda" if torch.cuda.is_available() else "cpu"}
    assert (tmp_path / "out.onnx.steps" / "step_02.onnx").exists()
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
