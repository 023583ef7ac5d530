"""The masked model is the input's own graph with values zeroed (DESIGN.md 2, issue 19): the same nodes as
the input, never the normalised (folded, sorted, Constant-free) copy that the rewrite works on."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lean_onnx.rewrite.contract import check_contract
from lean_onnx.rewrite.pruner import Pruner
from models.zoo import FAST, ZOO
from tests.helpers import zoo_path


def op_types(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def outputs_of_nodes(model: onnx.ModelProto) -> list:
    return sorted(tuple(node.output) for node in model.graph.node)


def assert_input_graph(source: onnx.ModelProto, masked: onnx.ModelProto) -> None:
    assert op_types(masked) == op_types(source)
    assert outputs_of_nodes(masked) == outputs_of_nodes(source)  # the same nodes, producing the same tensors
    assert [i.name for i in masked.graph.input] == [i.name for i in source.graph.input]
    onnx.checker.check_model(masked, full_check=True)


def tricky_model(path) -> onnx.ModelProto:
    """Weights where exporters put them: in a Constant node, behind an Identity, computed by constant
    arithmetic (Mul of two constants), shared by two convs; a ConstantOfShape; nodes out of order."""
    rng = np.random.default_rng(0)

    def tensor(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    const = helper.make_node("Constant", [], ["w1"], name="w1_const", value=tensor("w1v", 8, 3, 3, 3))
    nodes = [
        helper.make_node("Conv", ["f", "w4", "b4"], ["y"], name="head"),  # first: the list is not sorted
        const,
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Identity", ["w2"], ["w2i"], name="w2_identity"),
        helper.make_node("Mul", ["w3", "scale"], ["w3s"], name="w3_scaled"),
        helper.make_node("Constant", [], ["zshape"], name="zshape",
                         value=numpy_helper.from_array(np.array([1, 8, 8, 8], np.int64), "zs")),
        helper.make_node("ConstantOfShape", ["zshape"], ["z"], name="zeros",
                         value=numpy_helper.from_array(np.zeros(1, np.float32), "zv")),
        helper.make_node("Conv", ["r", "w2i", "b2"], ["c"], name="conv2"),
        helper.make_node("Conv", ["r", "w3s", "b3"], ["d"], name="conv3"),
        helper.make_node("Conv", ["r", "shared", "b5"], ["s1"], name="conv4"),
        helper.make_node("Conv", ["s1", "shared", "b5"], ["s2"], name="conv5"),
        helper.make_node("Add", ["c", "d"], ["e0"], name="add"),
        helper.make_node("Add", ["e0", "s2"], ["e"], name="add2"),
        helper.make_node("Add", ["e", "z"], ["f"], name="add_zeros"),
    ]
    inits = [tensor("b1", 8), tensor("w2", 8, 8, 1, 1), tensor("b2", 8), tensor("w3", 8, 8, 1, 1),
             numpy_helper.from_array(np.array(0.5, np.float32), "scale"), tensor("b3", 8),
             tensor("shared", 8, 8, 1, 1), tensor("b5", 8), tensor("w4", 4, 8, 1, 1), tensor("b4", 4)]
    graph = helper.make_graph(nodes, "tricky", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return model


@pytest.mark.parametrize("budget", [{"keep": 0.3}, {"keep": 0.05, "method": "l1"}, {"target_macs": 0.5}])
def test_masked_model_keeps_constants_identities_arithmetic_and_order(tmp_path, budget):
    source = tricky_model(tmp_path / "tricky.onnx")
    pruner = Pruner(str(tmp_path / "tricky.onnx"))
    result = pruner.prune(round_channels=1, **budget)
    assert result.report["masked_graph"] == "input"
    assert_input_graph(source, result.masked)
    errors = check_contract(pruner.loaded.original, result, pruner.loaded.input_shapes, np.random.default_rng(0))
    assert errors["max_rel_err_vs_masked"] <= 1e-5
    masked = {t.name: numpy_helper.to_array(t) for t in result.masked.graph.initializer}
    zeroed = sum(int((v == 0).sum()) for v in masked.values()) - sum(
        int((numpy_helper.to_array(t) == 0).sum()) for t in source.graph.initializer)
    assert zeroed > 0  # kernels were zeroed somewhere (in the input's tensors or their masked copies)
    assert onnx.load(str(tmp_path / "tricky.onnx")) == source  # the input file is untouched


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in ZOO])
def test_masked_model_has_the_input_nodes_on_every_zoo_model(name, zoo_cache):
    path = zoo_path(name, False, zoo_cache)
    pruner = Pruner(path)
    source = pruner.loaded.original
    smallest = pruner.channel_budget().smallest_ratio  # MS-D: 1.0 (one channel per layer); ShuffleNet: 0.53
    budgets = [{"keep": 0.1}] + ([{"target_macs": max(0.5, smallest + 0.02)}] if smallest < 0.95 else [])
    for kwargs in budgets:
        result = pruner.prune(**kwargs)
        assert result.report["masked_graph"] == "input"
        assert_input_graph(source, result.masked)
        check_contract(source, result, pruner.loaded.input_shapes, np.random.default_rng(0), samples=1)
