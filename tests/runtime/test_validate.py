"""`--validate` and its gates (issue 4): fidelity numbers, latency, exit 3 when a gate fails, 0 when it holds."""

import json

import numpy as np
import pytest

from lean_onnx.rewrite.pruner import Pruner
from lean_onnx.runtime.validate import argmax_agreement, output_errors, task_of, validate
from tests.cli.test_cli import cli
from tests.helpers import zoo_path


def test_output_errors_and_agreement_by_hand():
    ref = np.array([[1.0, -4.0], [2.0, 0.0]])
    other = np.array([[1.5, -4.0], [2.0, 3.0]])
    e = output_errors(ref, other)  # |diff| = [[0.5, 0], [0, 3]], max |ref| = 4
    assert e == {"max_abs": 3.0, "max_rel": 0.75, "mean_abs": 0.875}
    assert task_of(ref) == "classification" and task_of(np.zeros((2, 3, 4, 4))) == "segmentation"
    assert task_of(np.zeros((2, 1, 4, 4))) is None
    assert argmax_agreement(ref, other) == 0.5  # row 0 agrees (class 0), row 1 does not (0 vs 1)
    assert argmax_agreement(np.zeros((1, 3, 2, 2)), np.zeros((1, 3, 2, 2))) == 1.0


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "msd", "unet4"])
def test_validate_on_the_zoo(name, zoo_cache):
    pruner = Pruner(zoo_path(name, False, zoo_cache))
    result = pruner.prune(0.1, masked=True)
    v = validate(pruner.loaded.original, result.model_bytes, result.masked, pruner.loaded.input_shapes,
                 runs=3, warmup=1, samples=2)
    assert v["max_rel_err_vs_masked"] <= 1e-5 and v["passed"] and v["provider"] == "CPUExecutionProvider"
    assert v["latency_ms"]["original"]["median"] > 0 and v["speedup"] > 0
    key = "top1_agreement" if name in ("resnet18", "mobilenet_v2") else "pixel_agreement"
    assert all(0 <= o[key] <= 1 for o in v["outputs"])


def test_gates_exit_3_when_they_fail_and_0_when_they_hold(tmp_path, zoo_cache):
    model = zoo_path("resnet18", False, zoo_cache)
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    code, stdout, err = cli(model, out, "--keep", "0.1", "--max-error", "1e-6", "--min-speedup", "100",
                            "--runs", "3", "--warmup", "1", "--report", report)
    assert code == 3, err
    assert stdout.strip().splitlines()[-1].startswith("FAILED: --max-error") and "--min-speedup" in stdout
    assert out.exists() and "Traceback" not in err  # the output is still written
    v = json.loads(report.read_text())["validation"]
    assert not v["passed"] and not v["gates"]["max_error"]["passed"] and not v["gates"]["min_speedup"]["passed"]
    out.unlink()
    code, stdout, err = cli(model, out, "--keep", "0.1", "--max-error", "10", "--min-speedup", "0.01",
                            "--runs", "3", "--warmup", "1", "--report", report)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == "PASSED" and out.exists()
    v = json.loads(report.read_text())["validation"]
    assert v["passed"] and v["gates"]["max_error"]["passed"] and v["gates"]["min_speedup"]["passed"]
    assert v["max_rel_err_vs_masked"] <= 1e-5


def test_validate_data_from_an_npz(tmp_path, zoo_cache):
    model = zoo_path("msd", False, zoo_cache)
    data = tmp_path / "d.npz"
    np.savez(data, inputs=np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32))
    code, stdout, err = cli(model, tmp_path / "q.onnx", "--keep", "0.5", "--validate", "--validate-data", data,
                            "--runs", "2", "--warmup", "0", "--input-shape", "input=1x1x32x32")
    assert code == 0, err
    assert f"validation on CPUExecutionProvider ({data}" in stdout and stdout.strip().endswith("PASSED")
    np.savez(data, other=np.zeros(3))
    code, _, err = cli(model, tmp_path / "p.onnx", "--keep", "0.5", "--validate", "--validate-data", data)
    assert code == 2 and err.strip().startswith("[E]") and "'inputs'" in err and "Traceback" not in err
    assert not (tmp_path / "p.onnx").exists()  # refused before any work
