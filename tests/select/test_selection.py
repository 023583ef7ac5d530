"""Selection on real ChannelGraphs: LEAN on hand-checked models, baselines, redundancy, reference mode."""

import numpy as np
import pytest

from lean_onnx.graph.build import build_channel_graph
from lean_onnx.graph.load import load_model
from lean_onnx.select.selection import select_kernels
from lean_onnx.select.weights import compute_edge_weights
from tests.helpers import save, text_model, zoo_path

TWO_LAYERS = """
g (float[1,1,4,4] x) => (float[1,1,4,4] y) {
  a = Conv <auto_pad = "SAME_UPPER"> (x, w1)
  r = Relu (a)
  y = Conv <auto_pad = "SAME_UPPER"> (r, w2)
}"""


def graph(tmp_path, w1, w2, **kw):
    model = text_model(TWO_LAYERS.replace("float[1,1,4,4] y", f"float[1,{w2.shape[0]},4,4] y"),
                       {"w1": w1, "w2": w2})
    return build_channel_graph(load_model(save(model, tmp_path / "m.onnx")), **kw)


def test_lean_keeps_the_heaviest_chain_then_restarts(tmp_path):
    # x -3-> a0 -2-> y (product 6); x -.5-> a1 -4-> y (a1 restarts: 4)
    w1 = np.array([3.0, 0.5]).reshape(2, 1, 1, 1)
    w2 = np.array([2.0, 4.0]).reshape(1, 2, 1, 1)
    g = graph(tmp_path, w1, w2)
    one = select_kernels(g, 0.25, "lean")  # int(0.25 * 4) = 1, the first path keeps 2 (overshoot)
    assert one.num_keep == 1 and one.kept == 2 and one.num_paths == 1 and one.from_paths == 2
    assert one.layer_mask(g.layers[0]).ravel().tolist() == [True, False]
    assert one.layer_mask(g.layers[1]).ravel().tolist() == [True, False]
    assert one.longest_path_edges == 2 and one.longest_path_product == pytest.approx(6.0)
    three = select_kernels(g, 0.75, "lean", redundancy=False)
    assert three.layer_mask(g.layers[1]).ravel().tolist() == [True, True] and three.from_paths == 3


def test_forward_redundancy_removes_kernels_reading_dead_channels(tmp_path):
    # sv keeps the two heaviest kernels: w2's; both read channels whose input kernel was not kept
    w1 = np.array([0.1, 0.2]).reshape(2, 1, 1, 1)
    w2 = np.array([5.0, 6.0]).reshape(1, 2, 1, 1)
    g = graph(tmp_path, w1, w2)
    sel = select_kernels(g, 0.5, "sv")
    assert sel.selected == 2 and sel.kept == 0 and sel.removed_forward == 2
    assert not sel.alive[g.layers[0].out_nodes].any()
    assert select_kernels(g, 0.5, "sv", redundancy=False).kept == 2


def test_backward_redundancy_removes_kernels_nobody_reads(tmp_path):
    w1 = np.array([5.0, 6.0]).reshape(2, 1, 1, 1)
    w2 = np.array([0.1, 0.2]).reshape(1, 2, 1, 1)
    sel = select_kernels(graph(tmp_path, w1, w2), 0.5, "sv")
    assert sel.selected == 2 and sel.kept == 0 and sel.removed_backward == 2


def test_keep_one_keeps_everything(tmp_path):
    rng = np.random.default_rng(0)
    g = graph(tmp_path, rng.standard_normal((3, 1, 3, 3)), rng.standard_normal((2, 3, 3, 3)))
    for method in ("lean", "sv", "l1"):
        sel = select_kernels(g, 1.0, method)
        assert sel.kept == sel.total == 3 + 6 and sel.keep_achieved == 1.0


def test_excluded_layer_keeps_all_kernels_and_is_not_counted(tmp_path):
    rng = np.random.default_rng(1)
    g = graph(tmp_path, rng.standard_normal((3, 1, 3, 3)), rng.standard_normal((2, 3, 3, 3)), exclude=["w2"])
    sel = select_kernels(g, 0.34, "lean")
    assert sel.total == 3 and sel.num_keep == 1
    assert sel.layer_mask(g.layers[1]).all()


def test_l1_ignores_batchnorm_and_sv_folds_it(tmp_path):
    text = """
    g (float[1,1,4,4] x) => (float[1,2,4,4] y) {
      a = Conv (x, w)
      y = BatchNormalization (a, gamma, beta, mean, var)
    }"""
    inits = {"w": np.array([1.0, 2.0]).reshape(2, 1, 1, 1), "gamma": np.array([10.0, 1.0]),
             "beta": np.zeros(2), "mean": np.zeros(2), "var": np.ones(2) - 1e-5}
    g = build_channel_graph(load_model(save(text_model(text, inits), tmp_path / "bn.onnx")))
    assert select_kernels(g, 0.5, "sv").layer_mask(g.layers[0]).ravel().tolist() == [True, False]
    assert select_kernels(g, 0.5, "l1").layer_mask(g.layers[0]).ravel().tolist() == [False, True]


@pytest.mark.slow
def test_reference_mode_on_msd(zoo_cache):
    """--norm-grid 128: max |FFT_128| of the undilated kernel, final 1x1 excluded, K = int(r * 1275)."""
    path = zoo_path("msd", True, zoo_cache)
    g = build_channel_graph(load_model(path), exclude=["/final/*"], norm_grid=128)
    compute_edge_weights(g)
    init = g.loaded.initializers
    for layer in g.layers[:12]:
        w = init[layer.weight_name].astype(np.float64)
        expected = np.abs(np.fft.fft2(w, s=(128, 128))).max(axis=(2, 3))
        np.testing.assert_allclose(g.weight[layer.edges], expected.ravel(), rtol=1e-6)
    sel = select_kernels(g, 0.05, "lean")
    assert sel.total == 1275 and sel.num_keep == 63
    assert sel.selected >= 63 and sel.from_paths + sel.from_fallback == sel.kept
