"""Channel graph rules on tiny hand-written models (one op rule per test)."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from lean_onnx.errors import LeanOnnxError, NothingToPrune
from lean_onnx.graph.build import build_channel_graph
from lean_onnx.graph.load import load_model
from tests.helpers import CHAIN, rand, save, text_model


def graph_of(model, tmp_path, **kw):
    return build_channel_graph(load_model(save(model, tmp_path / "m.onnx"), kw.pop("shapes", None)), **kw)


def edges(g):
    return list(zip(g.src.tolist(), g.dst.tolist()))


def test_conv_chain_nodes_and_dst_major_edges(tmp_path):
    g = graph_of(text_model(CHAIN, {"w1": rand(3, 2, 3, 3), "w2": rand(4, 3, 1, 1)}), tmp_path)
    assert g.num_nodes == 2 + 3 + 4
    first, second = g.layers
    assert first.edges == slice(0, 6) and second.edges == slice(6, 18)
    # edge edge_start + j * c_in_g + i is kernel (j, i): input node i -> output node j
    assert edges(g)[:6] == [(0, 2), (1, 2), (0, 3), (1, 3), (0, 4), (1, 4)]
    assert edges(g)[6:9] == [(2, 5), (3, 5), (4, 5)]
    assert g.tensor_nodes["r"].tolist() == [2, 3, 4]  # Relu aliases its input channels
    assert not g.skippable.any() and (g.edge_layer == [0] * 6 + [1] * 12).all()


def test_grouped_conv_edges_stay_inside_groups(tmp_path):
    text = "g (float[1,4,6,6] x) => (float[1,6,4,4] y) { y = Conv <group = 2> (x, w) }"
    g = graph_of(text_model(text, {"w": rand(6, 2, 3, 3)}), tmp_path)
    assert g.num_edges == 6 * 2
    groups = {(s, d) for s, d in edges(g)}
    assert groups == {(i, 4 + j) for j in range(6) for i in ((0, 1) if j < 3 else (2, 3))}


def test_depthwise_conv_couples_input_and_output(tmp_path):
    text = "g (float[1,3,6,6] x) => (float[1,3,4,4] y) { y = Conv <group = 3> (x, w) }"
    g = graph_of(text_model(text, {"w": rand(3, 1, 3, 3)}), tmp_path)
    assert edges(g) == [(0, 3), (1, 4), (2, 5)]
    assert g.coupling[0].reason.startswith("depthwise")
    assert sorted(map(tuple, g.coupling_pairs.tolist())) == [(0, 3), (1, 4), (2, 5)]


def test_conv_transpose_kernel_layout(tmp_path):
    text = "g (float[1,4,4,4] x) => (float[1,6,8,8] y) { y = ConvTranspose <strides = [2,2], group = 2> (x, w) }"
    w = rand(4, 3, 2, 2)  # (c_in, c_out/g, k, k)
    g = graph_of(text_model(text, {"w": w}), tmp_path)
    layer = g.layers[0]
    assert (layer.c_in, layer.c_out, layer.group) == (4, 6, 2)
    kernels = layer.kernels(w)
    assert kernels.shape == (6, 2, 2, 2)
    for j in range(6):
        for i in range(2):
            gi = j // 3
            assert np.array_equal(kernels[j, i], w[gi * 2 + i, j - gi * 3])
            assert (g.src[layer.edge_start + j * 2 + i], g.dst[layer.edge_start + j * 2 + i]) == (gi * 2 + i, 4 + j)
    assert layer.grid == (8, 8)  # the adjoint acts on the output grid


def test_residual_add_makes_sum_nodes_with_skippable_edges(tmp_path):
    text = """
    g (float[1,2,6,6] x) => (float[1,2,6,6] y) {
      a = Conv <pads = [1,1,1,1]> (x, w1)
      b = Conv <pads = [1,1,1,1]> (a, w2)
      y = Add (a, b)
    }"""
    g = graph_of(text_model(text, {"w1": rand(2, 2, 3, 3), "w2": rand(2, 2, 3, 3)}), tmp_path)
    sums = g.tensor_nodes["y"]
    assert sums.tolist() == [6, 7]
    skip = np.flatnonzero(g.skippable)
    assert sorted(zip(g.src[skip].tolist(), g.dst[skip].tolist())) == [(2, 6), (3, 7), (4, 6), (5, 7)]
    assert np.all(g.weight[skip] == 1.0)
    assert g.coupling[-1].reason == "Add operands" and g.coupling[-1].tensors == ["a", "b", "y"]


def test_add_of_a_constant_bias_is_an_alias(tmp_path):
    text = "g (float[1,2,6,6] x) => (float[1,2,6,6] y) { a = Conv (x, w) \n y = Add (a, c) }"
    g = graph_of(text_model(text, {"w": rand(2, 2, 1, 1), "c": rand(1, 2, 1, 1)}), tmp_path)
    assert g.tensor_nodes["y"].tolist() == g.tensor_nodes["a"].tolist()


def test_concat_and_split_route_channels_by_offset(tmp_path):
    text = """
    g (float[1,2,6,6] x) => (float[1,1,6,6] y, float[1,4,6,6] z) {
      a = Conv (x, w1)
      c = Concat <axis = 1> (x, a)
      p, q = Split <axis = 1> (c, sizes)
      y = Conv (p, w2)
      z = Conv (q, w3)
    }"""
    inits = {"w1": rand(3, 2, 1, 1), "w2": rand(1, 1, 1, 1), "w3": rand(4, 4, 1, 1), "sizes": np.array([1, 4])}
    model = text_model(text, inits)
    g = graph_of(model, tmp_path)
    assert g.tensor_nodes["c"].tolist() == [0, 1, 2, 3, 4]
    assert g.tensor_nodes["p"].tolist() == [0] and g.tensor_nodes["q"].tolist() == [1, 2, 3, 4]
    assert {r.reason for r in g.coupling} >= {"Concat on the channel axis (offsets)", "Split on the channel axis (offsets)"}


def test_slice_on_channel_axis(tmp_path):
    text = """
    g (float[1,6,4,4] x) => (float[1,2,4,4] y) {
      s = Slice (x, st, en, ax, sp)
      y = Conv (s, w)
    }"""
    bounds = {name: np.array(v) for name, v in {"st": [1], "en": [6], "ax": [1], "sp": [3]}.items()}
    model = text_model(text, {"w": rand(2, 2, 1, 1), **bounds})
    g = graph_of(model, tmp_path)
    assert g.tensor_nodes["s"].tolist() == [1, 4]


BN = """
g (float[1,2,6,6] x) => (float[1,3,6,6] y) {
  a = Conv <pads = [1,1,1,1]> (x, w)
  y = BatchNormalization <epsilon = 0.001> (a, gamma, beta, mean, var)
}"""


def bn_inits(c=3):
    return {"w": rand(c, 2, 3, 3), "gamma": rand(c), "beta": rand(c), "mean": rand(c),
            "var": np.abs(rand(c)) + 0.5}


def test_batchnorm_after_conv_is_folded_into_edge_weights(tmp_path):
    inits = bn_inits()
    g = graph_of(text_model(BN, inits), tmp_path)
    layer = g.layers[0]
    expected = np.abs(inits["gamma"]) / np.sqrt(inits["var"].astype(np.float64) + 1e-3)
    np.testing.assert_allclose(layer.bn_scale, expected, rtol=1e-6)
    assert g.tensor_nodes["y"].tolist() == g.tensor_nodes["a"].tolist()  # no extra nodes
    from lean_onnx.select.weights import compute_edge_weights
    compute_edge_weights(g)
    np.testing.assert_allclose(g.weight.reshape(3, 2), layer.norms * expected[:, None])


def test_batchnorm_on_a_branching_tensor_is_a_per_channel_scale_edge(tmp_path):
    text = BN.replace("(float[1,3,6,6] y)", "(float[1,3,6,6] y, float[1,3,6,6] a)")
    inits = bn_inits()
    g = graph_of(text_model(text, inits), tmp_path)
    assert g.layers[0].bn_scale is None
    out = g.tensor_nodes["y"]
    edge = np.flatnonzero(g.skippable)
    assert g.dst[edge].tolist() == out.tolist()
    np.testing.assert_allclose(g.weight[edge], np.abs(inits["gamma"]) / np.sqrt(inits["var"] + 1e-3), rtol=1e-6)


def test_average_pool_edge_has_polyphase_norm(tmp_path):
    text = "g (float[1,2,8,8] x) => (float[1,2,4,4] y) { a = Conv (x, w) \n y = AveragePool <kernel_shape = [2,2], strides = [2,2]> (a) }"
    g = graph_of(text_model(text, {"w": rand(2, 2, 1, 1)}), tmp_path)
    assert np.allclose(g.weight[g.skippable], 0.5)


def test_unknown_op_freezes_its_channels_with_a_reason(tmp_path):
    text = """
    g (float[1,4,4,4] x) => (float[1,2,8,8] y) {
      a = Conv (x, w1)
      d = DepthToSpace <blocksize = 2> (a)
      y = Conv (d, w2)
    }"""
    g = graph_of(text_model(text, {"w1": rand(4, 4, 1, 1), "w2": rand(2, 1, 1, 1)}), tmp_path)
    frozen = [f for f in g.frozen if f.op == "DepthToSpace"]
    assert frozen and frozen[0].reason == "no channel-flow rule for DepthToSpace"
    assert g.is_frozen[g.tensor_nodes["a"]].all() and g.is_source[g.tensor_nodes["d"]].all()
    assert all(layer.prunable for layer in g.layers)  # kernels stay prunable (masking is always exact)


def test_exclude_glob_freezes_kernels_but_keeps_the_chain(tmp_path):
    g = graph_of(text_model(CHAIN, {"w1": rand(3, 2, 3, 3), "w2": rand(4, 3, 1, 1)}), tmp_path, exclude=["w2"])
    assert [layer.prunable for layer in g.layers] == [True, False]
    assert g.skippable[g.layers[1].edges].all() and not g.skippable[g.layers[0].edges].any()
    assert any("--exclude 'w2'" in f.reason for f in g.frozen)


def test_weight_computed_at_run_time_is_frozen(tmp_path):
    text = """
    g (float[1,2,6,6] x, float[3,2,1,1] w) => (float[1,4,6,6] y) {
      a = Conv (x, w)
      y = Conv (a, w2)
    }"""
    g = graph_of(text_model(text, {"w2": rand(4, 3, 1, 1)}), tmp_path)
    assert len(g.layers) == 1
    assert any(f.reason == "weight is computed at run time" for f in g.frozen)


def test_exporter_leftovers_normalise_to_the_same_graph(tmp_path):
    """Weights in Constant nodes, Identity in front of an initializer and unsorted nodes."""
    w1, w2 = rand(3, 2, 3, 3), rand(4, 3, 1, 1)
    clean = graph_of(text_model(CHAIN, {"w1": w1, "w2": w2}), tmp_path)
    nodes = [
        helper.make_node("Conv", ["r", "w2i"], ["y"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Identity", ["w2c"], ["w2i"]),
        helper.make_node("Conv", ["x", "w1c"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["w1c"], value=numpy_helper.from_array(w1)),
        helper.make_node("Constant", [], ["w2c"], value=numpy_helper.from_array(w2)),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])])
    messy = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    g = graph_of(messy, tmp_path)
    assert g.num_nodes == clean.num_nodes and edges(g) == edges(clean)
    assert [layer.weight_name for layer in g.layers] == ["w1c", "w2c"]


def test_symbolic_dims_get_a_default_with_a_warning(tmp_path):
    text = CHAIN.replace("float[1,2,8,8] x", "float[N,2,H,W] x").replace("float[1,4,8,8] y", "float[N,4,H,W] y")
    path = save(text_model(text, {"w1": rand(3, 2, 3, 3), "w2": rand(4, 3, 1, 1)}), tmp_path / "m.onnx")
    loaded = load_model(path)
    assert loaded.input_shapes == {"x": (1, 2, 224, 224)} and loaded.assumed_shape
    assert "assuming 1x2x224x224" in loaded.warnings[0]
    loaded = load_model(path, {"x": (2, 2, 16, 16)})
    assert loaded.input_shapes == {"x": (2, 2, 16, 16)} and not loaded.warnings
    assert build_channel_graph(loaded).layers[0].grid == (16, 16)


def test_input_shape_that_does_not_fit_is_refused(tmp_path):
    path = save(text_model(CHAIN, {"w1": rand(3, 2, 3, 3), "w2": rand(4, 3, 1, 1)}), tmp_path / "m.onnx")
    with pytest.raises(LeanOnnxError, match="does not fit"):
        load_model(path, {"x": (1, 3, 8, 8)})


def test_model_without_conv_is_nothing_to_prune(tmp_path):
    text = "g (float[1,4] x) => (float[1,2] y) { y = Gemm (x, w) }"
    with pytest.raises(NothingToPrune, match="no Conv"):
        graph_of(text_model(text, {"w": rand(4, 2)}), tmp_path)


def test_input_file_is_not_modified(tmp_path):
    path = save(text_model(CHAIN, {"w1": rand(3, 2, 3, 3), "w2": rand(4, 3, 1, 1)}), tmp_path / "m.onnx")
    before = open(path, "rb").read()
    build_channel_graph(load_model(path))
    assert open(path, "rb").read() == before


def test_channel_shuffle_routes_channels(tmp_path):
    """Reshape (N,C,H,W)->(N,g,C/g,H,W), Transpose(0,2,1,3,4), Reshape back: a channel permutation."""
    text = """
    g (float[1,2,4,4] x) => (float[1,2,4,4] y) {
      a = Conv (x, w1)
      s = Reshape (a, shape5)
      t = Transpose <perm = [0,2,1,3,4]> (s)
      u = Reshape (t, shape4)
      y = Conv (u, w2)
    }"""
    inits = {"w1": rand(6, 2, 1, 1), "w2": rand(2, 6, 1, 1),
             "shape5": np.array([1, 2, 3, 4, 4]), "shape4": np.array([1, 6, 4, 4])}
    g = graph_of(text_model(text, inits), tmp_path)
    a = g.tensor_nodes["a"]
    assert g.tensor_nodes["u"].tolist() == a.reshape(2, 3).T.ravel().tolist()
    assert g.layers[1].in_nodes.tolist() == a[[0, 3, 1, 4, 2, 5]].tolist()
    assert g.is_frozen[a].all()  # the Reshape's literal shape fixes the channel count
    assert any(f.reason.startswith("channel shuffle") for f in g.frozen)


def test_shape_read_of_a_tensor_freezes_its_channel_count(tmp_path):
    """x.chunk(2, dim=1) as exporters write it: Slice bounds computed from Shape(x)."""
    text = """
    g (float[1,2,4,4] x) => (float[1,3,4,4] y) {
      a = Conv (x, w1)
      sh = Shape (a)
      c = Gather <axis = 0> (sh, one)
      half = Div (c, two)
      s = Slice (a, zero, half, one)
      y = Conv (s, w2)
    }"""
    inits = {"w1": rand(4, 2, 1, 1), "w2": rand(3, 2, 1, 1), "one": np.array([1]), "two": np.array([2]),
             "zero": np.array([0])}
    g = graph_of(text_model(text, inits), tmp_path)
    assert g.layers[1].in_nodes.tolist() == g.tensor_nodes["a"][:2].tolist()
    assert g.is_frozen[g.tensor_nodes["a"]].all()
    assert any(f.reason == "the channel count is read at run time" for f in g.frozen)
