"""Keras models converted by tf2onnx (issue 19), the acceptance through the command line.

TensorFlow is not a dependency: `tools/tf_models.py --raw` writes the models into .cache/tf in an
environment of its own (its docstring has the two commands); without them these tests skip, saying so.
`_raw` models are converted with tf2onnx's optimizers off: every conv sits between a Transpose to NCHW and
one back to NHWC (214 Transposes in ResNet-50), the case that froze 98 % of the channel graph before."""

from __future__ import annotations

import collections
import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest

from lean_onnx.rewrite.contract import session

ROOT = pathlib.Path(__file__).resolve().parent.parent
TF = ROOT / ".cache" / "tf"

pytestmark = pytest.mark.slow


def tf_model(name: str) -> pathlib.Path:
    path = TF / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing: run tools/tf_models.py --raw in a TensorFlow environment (docstring)")
    return path


@pytest.mark.parametrize("name", ["resnet50_tf2onnx_raw", "resnet50_tf2onnx", "mobilenetv2_tf2onnx_raw"])
def test_tf2onnx_model_prunes_to_half_the_macs(name, tmp_path):
    source = tf_model(name)
    inspect = subprocess.run([sys.executable, "-m", "lean_onnx", "inspect", str(source), "--json"],
                             capture_output=True, text=True, timeout=600)
    assert inspect.returncode == 0, inspect.stderr
    graph = json.loads(inspect.stdout)["graph"]
    assert graph["frozen_share"] <= 0.05, graph
    out, masked, report = tmp_path / "out.onnx", tmp_path / "masked.onnx", tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "lean_onnx", str(source), str(out), "--target-macs", "0.5",
                          "--emit-masked", str(masked), "--report", str(report)], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr
    assert "[W]" not in run.stderr, run.stderr
    data = json.loads(report.read_text())
    assert abs(data["budget"]["achieved_macs_ratio"] - 0.5) <= 0.05
    assert data["inputs_reach_outputs"] and data["masked_graph"] == "input"
    original, m = onnx.load(str(source)), onnx.load(str(masked))
    ops = [collections.Counter(n.op_type for n in model.graph.node) for model in (m, original)]
    assert ops[0] == ops[1]
    assert sorted(tuple(n.output) for n in m.graph.node) == sorted(tuple(n.output) for n in original.graph.node)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 224, 224, 3)).astype(np.float32)
    pruned = session(onnx.load(str(out)))
    got, want = pruned.run(None, {"input": x})[0], session(m).run(None, {"input": x})[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    y = 3 * rng.standard_normal((1, 224, 224, 3)).astype(np.float32)
    reference = session(original)
    if np.abs(reference.run(None, {"input": y})[0] - reference.run(None, {"input": x})[0]).max() > 0:
        assert np.abs(pruned.run(None, {"input": y})[0] - got).max() > 0  # the output depends on the input
    else:  # Keras' MobileNetV2 with weights=None outputs exactly 1/1000 for every class whatever the input
        assert name.startswith("mobilenetv2")
