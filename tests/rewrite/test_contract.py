"""The contract's measurement (rewrite/contract.py): an output a Sigmoid makes is compared on the Sigmoid's input."""

import numpy as np
import pytest

from lean_onnx.rewrite.contract import RTOL, masked_error, max_rel_error, run, with_logits
from lean_onnx.runtime.validate import fidelity
from tests.helpers import text_model

SCORES = """
g (float[1,2,4,4] x) => (float[1,16,2] scores, float[1,2,4,4] plain) {
  a = Conv (x, w, b)
  s = Sigmoid (a)
  r = Reshape (s, shape)
  scores = Transpose <perm = [0, 2, 1]> (r)
  plain = Conv (x, w)
}"""


def scores_model(bias: float):
    """Class scores of a detector on noise: logits about `bias` (far below 0), scores about 1e-4."""
    w = np.full((2, 2, 1, 1), 0.1, np.float32)
    return text_model(SCORES, {"w": w, "b": np.full(2, bias, np.float32), "shape": np.array([1, 2, 16], np.int64)})


def test_with_logits_finds_the_sigmoid_through_reshape_and_transpose():
    model = scores_model(-9.0)
    view, logits = with_logits(model)
    assert logits == {0: 2} and [o.name for o in view.graph.output] == ["scores", "plain", "a"]
    assert len(model.graph.output) == 2  # the model itself is left as it is
    plain = text_model('g (float[1,2,4,4] x) => (float[1,2,4,4] y) { y = Conv (x, w) }',
                       {"w": np.ones((2, 2, 1, 1), np.float32)})
    assert with_logits(plain) == (plain, {})


@pytest.mark.parametrize("shift,holds", [(4.5e-5, True), (4.5e-4, False)])
def test_scores_near_zero_are_compared_on_their_logits(shift, holds):
    """Logits of -9 moved by 4.5e-5 (5e-6 of their magnitude: float32 noise of a different summation order)
    move scores of 1.2e-4 by 4.5e-5 of their own magnitude: the outputs alone would count a violation. On
    the logits it holds; a 10x larger move (5e-5) is still one."""
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32) * 0.01}
    masked, pruned = with_logits(scores_model(-9.0)), with_logits(scores_model(-9.0 + shift))
    a, b = run(masked[0], feeds), run(pruned[0], feeds)
    assert max_rel_error(a[:2], b[:2]) > RTOL  # the scores' own relative error
    assert (masked_error(a, b, masked[1], 2) <= RTOL) == holds
    report = fidelity(scores_model(-9.0), scores_model(-9.0 + shift), scores_model(-9.0), [feeds], threads=1)
    first = report["outputs"][0]["vs_masked"]
    assert first["measured_on"] == "a" and (report["max_rel_err_vs_masked"] <= RTOL) == holds


def test_with_logits_keeps_the_element_type():
    """A float16 score output: its logits are exposed as float16, and the view runs."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"]), helper.make_node("Sigmoid", ["a"], ["s"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT16, [1, 2, 4, 4])],
        [numpy_helper.from_array(np.full((2, 2, 1, 1), 0.1, np.float16), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    view, logits = with_logits(model)
    assert logits == {0: 1} and view.graph.output[1].type.tensor_type.elem_type == TensorProto.FLOAT16
    out = run(view, {"x": np.ones((1, 2, 4, 4), np.float16)})
    assert out[1].dtype == np.float16 and np.allclose(out[1], 0.2, atol=1e-3)
