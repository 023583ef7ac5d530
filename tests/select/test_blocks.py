"""Residual branches removed whole under a budget (`--drop-blocks`): which sums have a branch
(graph/branches.py), their gains (select/blocks.py), and the bypass of a sum whose branch is gone
(rewrite/bypass.py): the branch's ops leave the model, pruned == masked holds."""

import numpy as np
import onnx
import pytest

from lean_onnx.graph.branches import residual_branches
from lean_onnx.rewrite.contract import check_contract, random_feeds, session
from lean_onnx.rewrite.pruner import Pruner
from lean_onnx.select.blocks import branch_gains
from tests.helpers import text_model

TWO_BLOCKS = """
g (float[1,8,6,6] x) => (float[1,8,6,6] y) {
  a1 = Conv (x, wa1)
  r1 = Relu (a1)
  b1 = Conv <pads = [1, 1, 1, 1]> (r1, wb1)
  s1 = Add (x, b1)
  a2 = Conv (s1, wa2)
  r2 = Relu (a2)
  b2 = Conv <pads = [1, 1, 1, 1]> (r2, wb2)
  s2 = Add (b2, s1)
  y = Conv (s2, wy)
}"""


def two_blocks(scale2: float = 1.0):
    """Two residual blocks (8 -> 32 -> 8 channels, the second sum with its operands the other way round);
    `scale2` multiplies the second branch's first weight, so its gain is `scale2` times what it was."""
    rng = np.random.default_rng(0)
    w = {"wa1": rng.standard_normal((32, 8, 1, 1)), "wb1": rng.standard_normal((8, 32, 3, 3)) * 0.1,
         "wa2": rng.standard_normal((32, 8, 1, 1)) * scale2, "wb2": rng.standard_normal((8, 32, 3, 3)) * 0.1,
         "wy": rng.standard_normal((8, 8, 1, 1))}
    return text_model(TWO_BLOCKS, {k: v.astype(np.float32) for k, v in w.items()})


def test_two_residual_branches_are_found_with_their_layers():
    pruner = Pruner(two_blocks())
    found = residual_branches(pruner.graph)
    assert [(b.add, b.skip, b.branch) for b in found] == [("s1", "x", "b1"), ("s2", "s1", "b2")]
    names = [[pruner.graph.layers[i].output for i in b.layers] for b in found]
    assert names == [["a1", "b1"], ["a2", "b2"]]


@pytest.mark.parametrize("text", [
    # a projection shortcut: both operands have a conv of their own
    """g (float[1,8,6,6] x) => (float[1,8,6,6] y) { a = Conv (x, w1)  b = Conv (a, w2)  p = Conv (x, w3)
       y = Add (p, b) }""",
    # squeeze-and-excitation: the operand reads x through a Mul, not through a layer
    """g (float[1,8,6,6] x) => (float[1,8,6,6] y) { p = GlobalAveragePool (x)  a = Conv (p, w1)  b = Conv (a, w2)
       s = Sigmoid (b)  m = Mul (x, s)  y = Add (x, m) }""",
    # something outside the branch reads it
    """g (float[1,8,6,6] x) => (float[1,8,6,6] y, float[1,8,6,6] z) { a = Conv (x, w1)  b = Conv (a, w2)
       y = Add (x, b)  z = Relu (a) }""",
])
def test_what_is_no_residual_branch(text):
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 8, 1, 1)), "w2": rng.standard_normal((8, 8, 1, 1)),
             "w3": rng.standard_normal((8, 8, 1, 1))}
    model = text_model(text, {k: v.astype(np.float32) for k, v in inits.items() if k in text})
    assert residual_branches(Pruner(model).graph) == []


def test_gain_is_the_best_raw_chain_product_through_the_branch():
    """1x1 then 1x1: the gain is the max over chains x_i -> a_j -> b_k of |w1[j, i]| * |w2[k, j]|: through a0 at
    most 3 * 1, through a1 at most 1 * 5, so 5 (by hand)."""
    text = """g (float[1,2,4,4] x) => (float[1,2,4,4] y) { a = Conv (x, w1)  b = Conv (a, w2)  y = Add (x, b) }"""
    w1 = np.array([[1, 3], [0.5, 1]], np.float32).reshape(2, 2, 1, 1)
    w2 = np.array([[0.1, 5], [1, 0.2]], np.float32).reshape(2, 2, 1, 1)
    pruner = Pruner(text_model(text, {"w1": w1, "w2": w2}))
    pruner.prune(target_macs=1.0)  # the edge weights (operator norms) are computed on first use
    gains = branch_gains(pruner.graph, residual_branches(pruner.graph))
    assert np.exp(gains) == pytest.approx([5.0])


def _convs(model):
    return sorted(n.output[0] for n in model.graph.node if n.op_type == "Conv")


def test_the_lower_gain_branch_goes_whole_and_the_model_equals_the_masked_one():
    """With one of two branches allowed to go, the one of smaller gain goes: its convs leave the model, its
    sum becomes an Identity, and pruned == masked (the masked model adds exact zeros)."""
    for weak, gone in ((1e-2, ["a2", "b2"]), (1e2, ["a1", "b1"])):
        pruner = Pruner(two_blocks(scale2=weak))
        result = pruner.prune(target_macs=0.5, drop_blocks=0.5, round_channels=1)
        budget = result.report["budget"]
        bypassed = result.report["residual_sums_bypassed"]
        assert budget["branches"] == 2 and len(bypassed) == 1
        assert set(gone).isdisjoint(_convs(result.model)), _convs(result.model)
        assert [n.op_type for n in result.model.graph.node if n.output[0] in bypassed] == ["Identity"]
        assert abs(budget["achieved_macs_ratio"] - 0.5) <= 0.03
        check_contract(pruner.loaded.original, result, pruner.loaded.input_shapes, np.random.default_rng(0))


def test_drop_blocks_zero_keeps_every_branch_and_the_output_depends_on_the_input():
    """Each branch is 0.49 of the MACs: at 0.3, one can go (the other's channels carry the rest), not both."""
    pruner = Pruner(two_blocks())
    kept_all = pruner.prune(target_macs=0.3, drop_blocks=0, round_channels=1)
    assert kept_all.report["residual_sums_bypassed"] == [] and len(_convs(kept_all.model)) == 5
    dropped = pruner.prune(target_macs=0.3, round_channels=1)  # the default: any branch may go
    assert len(dropped.report["residual_sums_bypassed"]) == 1 and len(_convs(dropped.model)) == 3
    assert abs(dropped.report["budget"]["achieved_macs_ratio"] - 0.3) <= 0.03
    check_contract(pruner.loaded.original, dropped, pruner.loaded.input_shapes, np.random.default_rng(0))
    sess = session(dropped.model)
    rng = np.random.default_rng(1)
    one, two = (sess.run(None, random_feeds(dropped.model, pruner.loaded.input_shapes, rng))[0] for _ in range(2))
    assert not np.allclose(one, two)  # never collapsed: the skips carry the input


def test_branches_go_only_while_the_channels_left_carry_the_target():
    """Near 1.0 of the MACs no branch fits under the target: none goes."""
    pruner = Pruner(two_blocks())
    result = pruner.prune(target_macs=0.95, round_channels=1)
    assert result.report["residual_sums_bypassed"] == []
    assert abs(result.report["budget"]["achieved_macs_ratio"] - 0.95) <= 0.03


def test_a_keep_selection_that_empties_a_branch_removes_it_too():
    """`--keep` (the reference mode, kernel granularity) with a second branch 1000x weaker than the first: LEAN's
    paths leave it no kernel, and the rewrite takes its sum out as under a budget (before: one-channel stubs of
    a2 and b2 fed zeros into s2)."""
    pruner = Pruner(two_blocks(scale2=1e-3))
    for keep in (0.5, 0.1):
        result = pruner.prune(keep, round_channels=1)
        assert result.report["residual_sums_bypassed"] == ["s2"] and _convs(result.model) == ["a1", "b1", "y"]
        check_contract(pruner.loaded.original, result, pruner.loaded.input_shapes, np.random.default_rng(0))


def test_with_fold_constants_a_removed_branch_leaves_its_constant_as_a_bias():
    """`--fold-constants` keeps the biases of dead channels, so an emptied branch adds its last conv's bias, not
    zero: the sum becomes `x + bias` with the bias an initializer, the branch's convs still leave the model, and
    pruned == masked (before: one-channel stubs of a2 and b2 stayed to compute the constant)."""
    model = two_blocks(scale2=1e-2)
    bias = np.linspace(-1.0, 1.0, 8).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(bias, "bb2"))
    conv = next(n for n in model.graph.node if n.output[0] == "b2")
    conv.input.append("bb2")
    pruner = Pruner(model)
    for fold in (False, True):
        result = pruner.prune(target_macs=0.5, drop_blocks=0.5, round_channels=1, fold_constants=fold)
        assert result.report["residual_sums_bypassed"] == ["s2"]
        assert set(_convs(result.model)) == {"a1", "b1", "y"}
        s2 = next(n for n in result.model.graph.node if n.output[0] == "s2")
        if fold:
            assert s2.op_type == "Add" and s2.input[0] == "s1"
            added = next(t for t in result.model.graph.initializer if t.name == s2.input[1])
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(added), bias.reshape(8, 1, 1))
        else:
            assert s2.op_type == "Identity" and list(s2.input) == ["s1"]
        check_contract(pruner.loaded.original, result, pruner.loaded.input_shapes, np.random.default_rng(0))
