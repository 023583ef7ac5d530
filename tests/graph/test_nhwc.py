"""NHWC models (issue 19): stretches between layout Transposes become NCHW in the normalised copy
(graph/layout.py), so their channels prune like NCHW ones; the masked model stays the input's graph.

Hand-built graphs in the shapes tf2onnx and TFLite converters leave: Transpose-Conv-Transpose chains, an
NHWC residual Add, per-channel Mul/Add on the last axis (a Keras BatchNormalization), Pad on the spatial
axes of an NHWC tensor, Cast fp16 wrappers, an NHWC graph input and output, a spatial ReduceMean feeding
a MatMul head."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lean_onnx.graph.build import build_channel_graph
from lean_onnx.graph.layout import sink_transposes
from lean_onnx.graph.load import load_model
from lean_onnx.graph.normalise import structural_copy
from lean_onnx.rewrite.contract import check_contract, session
from lean_onnx.rewrite.pruner import Pruner

RNG = np.random.default_rng(0)
TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


class Net:
    """A little graph builder: NCHW convs, NHWC stretches between them."""

    def __init__(self):
        self.nodes, self.inits, self.k = [], [], 0

    def name(self, stem: str) -> str:
        self.k += 1
        return f"{stem}{self.k}"

    def const(self, value: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3) -> str:
        w = self.const((RNG.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32))
        b = self.const((0.1 * RNG.standard_normal(cout)).astype(np.float32))
        return self.op("Conv", [x, w, b], pads=[k // 2] * 4)

    def nhwc(self, x: str) -> str:
        return self.op("Transpose", [x], perm=TO_NHWC)

    def nchw(self, x: str) -> str:
        return self.op("Transpose", [x], perm=TO_NCHW)

    def keras_bn(self, y: str, c: int) -> str:
        """A folded Keras BatchNormalization on the last axis: y * scale + shift, [C] vectors."""
        scale = self.op("Mul", [y, self.const((1 + 0.1 * RNG.standard_normal(c)).astype(np.float32))])
        return self.op("Add", [scale, self.const((0.1 * RNG.standard_normal(c)).astype(np.float32))])

    def model(self, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "nhwc", inputs, outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def nhwc_net(head: str = "conv") -> onnx.ModelProto:
    """NHWC input -> conv 3->16 -> [NHWC: BN, Relu, Pad] -> conv 16->16 (valid) -> [NHWC residual Add of two
    branches, Cast fp16 Relu Cast back] -> conv 16->16 -> head: NHWC output (conv) or spatial mean + MatMul."""
    n = Net()
    x = n.nchw("x")
    a = n.conv(x, 3, 16)
    y = n.op("Relu", [n.keras_bn(n.nhwc(a), 16)])
    y = n.op("Pad", [y, n.const(np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64))])  # H and W of NHWC
    b = n.op("Conv", [n.nchw(y), n.const((RNG.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32))])
    c1, c2 = n.conv(b, 16, 16, 1), n.conv(b, 16, 16)
    s = n.op("Add", [n.nhwc(c1), n.nhwc(c2)])  # a residual sum in NHWC
    h = n.op("Cast", [n.op("Relu", [n.op("Cast", [s], to=TensorProto.FLOAT16)])], to=TensorProto.FLOAT)
    d = n.conv(n.nchw(h), 16, 16)
    if head == "conv":
        out = n.op("Relu", [n.nhwc(d)])
        shape = [1, 16, 16, 16]
    else:
        pooled = n.op("ReduceMean", [n.nhwc(n.op("Relu", [d]))], axes=[1, 2], keepdims=0)
        out = n.op("MatMul", [pooled, n.const(RNG.standard_normal((16, 10)).astype(np.float32))])
        shape = [1, 10]
    n.nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    return n.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])


def transposes(model) -> int:
    return sum(node.op_type == "Transpose" for node in model.graph.node)


@pytest.mark.parametrize("head", ["conv", "mean"])
def test_stretches_become_nchw_exactly(head):
    model = nhwc_net(head)
    onnx.checker.check_model(model, full_check=True)
    copy = structural_copy(model)
    assert transposes(model) == 7 and transposes(copy) == 1 + (head == "conv")  # the input (+ the NHWC output)
    x = RNG.standard_normal((1, 16, 16, 3)).astype(np.float32)
    want = session(model).run(None, {"x": x})[0]
    got = session(copy).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())  # fp16 inside


@pytest.mark.parametrize("head", ["conv", "mean"])
def test_nhwc_channels_are_not_frozen(head):
    graph = build_channel_graph(load_model(nhwc_net(head)))
    reasons = [part.reason for part in graph.frozen]
    assert not any("Transpose" in r or "Pad" in r for r in reasons), reasons
    assert all(layer.prunable for layer in graph.layers)
    # frozen: the image's 3 channels (graph inputs keep theirs); the NHWC output's 16 are terminal, not frozen
    assert int(graph.is_frozen.sum()) <= 3 + 16 * (head == "conv")


@pytest.mark.parametrize("head", ["conv", "mean"])
@pytest.mark.parametrize("budget", [{"keep": 0.3}, {"target_macs": 0.5}])
def test_nhwc_model_prunes_with_the_contract_and_the_input_graph_masked(tmp_path, head, budget):
    path = str(tmp_path / "nhwc.onnx")
    model = nhwc_net(head)
    onnx.save(model, path)
    pruner = Pruner(path)
    result = pruner.prune(round_channels=1, **budget)
    assert result.report["inputs_reach_outputs"]
    if "target_macs" in budget:
        assert abs(result.report["budget"]["achieved_macs_ratio"] - 0.5) <= 0.05
    else:
        kernels = result.report["kernels"]
        assert kernels["in_pruned_model"] < kernels["in_original_model"]
    check_contract(pruner.loaded.original, result, pruner.loaded.input_shapes, np.random.default_rng(0))
    masked = result.masked
    assert collections.Counter(n.op_type for n in masked.graph.node) == \
        collections.Counter(n.op_type for n in model.graph.node)
    assert transposes(result.model) < transposes(model)  # the pruned model runs the stretches in NCHW
    x = RNG.standard_normal((1, 16, 16, 3)).astype(np.float32)
    out = session(result.model).run(None, {"x": x})[0]
    assert np.abs(out - session(result.model).run(None, {"x": 2 * x})[0]).max() > 0  # depends on x


def test_a_stretch_that_would_add_transposes_stays():
    """NCHW -> NHWC -> Softmax on the last axis -> graph output: nothing to cancel, nothing changes."""
    n = Net()
    a = n.conv("x", 3, 4)
    n.nodes.append(helper.make_node("Softmax", [n.nhwc(a)], ["y"], axis=-1))
    model = n.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 4])])
    copy = structural_copy(model)
    assert sink_transposes(copy) == 0 and transposes(copy) == 1


def test_a_pruned_nhwc_model_distils_from_its_original(tmp_path):
    """The bridge trains the NCHW copy and writes the weights back into the pruned model's own graph."""
    pytest.importorskip("torch")
    from lean_onnx.train.finetune import finetune

    path = str(tmp_path / "nhwc.onnx")
    model = nhwc_net("mean")
    onnx.save(model, path)
    pruned = Pruner(path).prune(target_macs=0.5, round_channels=1).model
    x = RNG.standard_normal((8, 16, 16, 3)).astype(np.float32)
    trained, history = finetune(pruned, {"inputs": x}, {"inputs": x}, epochs=2, batch=1, lr=1e-3, teacher=model)
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in pruned.graph.node]
    assert history[-1]["val_loss"] < history[0]["val_loss"]  # the KL to the teacher fell
    before = session(pruned).run(None, {"x": x[:1]})[0]
    assert np.abs(session(trained).run(None, {"x": x[:1]})[0] - before).max() > 0
