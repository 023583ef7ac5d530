"""Channel granularity and MACs budgets (issue 17): chain values on a hand-checked graph, floors, units,
and `--target-macs` on the test zoo (pruned == masked, MACs on target, never collapsed)."""

import math

import numpy as np
import pytest

from lean_onnx.errors import LeanOnnxError
from lean_onnx.graph.build import build_channel_graph
from lean_onnx.graph.load import load_model
from lean_onnx.rewrite.contract import check_contract, random_feeds, session
from lean_onnx.rewrite.pruner import Pruner
from lean_onnx.select.budget import ChannelBudget, select_channels
from lean_onnx.select.chain_values import centred_chain_values, chain_values, normalised_log_weights
from lean_onnx.select.weights import compute_edge_weights
from models.zoo import FAST, ZOO
from tests.helpers import text_model, zoo_path

TWO_CONVS = """
g (float[1,2,4,4] x) => (float[1,2,4,4] y) {
  a = Conv (x, w1)
  r = Relu (a)
  y = Conv (r, w2)
}"""


def two_convs(w1, w2):
    return text_model(TWO_CONVS, {"w1": np.array(w1, np.float32).reshape(2, 2, 1, 1),
                                  "w2": np.array(w2, np.float32).reshape(2, 2, 1, 1)})


def graph_of(model):
    graph = build_channel_graph(load_model(model))
    compute_edge_weights(graph)
    return graph


def test_chain_values_by_hand():
    """1x1 kernels: norms are |w|. Layer medians (of the log weights: an even count takes the geometric
    middle): conv1 {4,1,1,1} -> 1, conv2 {1,2,2,1} -> sqrt 2. F(a0) = log 4 (from x0), F(a1) = 0;
    B(a0) = max(log 1/sqrt 2, log 2/sqrt 2) = log sqrt 2 = B(a1)."""
    graph = graph_of(two_convs([[4, 1], [1, 1]], [[1, 2], [2, 1]]))
    a = graph.tensor_nodes["a"]
    values = chain_values(graph)
    assert values[a[0]] == pytest.approx(math.log(4) + math.log(math.sqrt(2)), abs=1e-12)
    assert values[a[1]] == pytest.approx(math.log(math.sqrt(2)), abs=1e-12)
    logw = normalised_log_weights(graph)
    conv2 = graph.layers[1]
    assert np.allclose(np.exp(logw[conv2.edges]), np.array([1, 2, 2, 1]) / math.sqrt(2))


def test_centred_chain_values_by_hand():
    """The same graph: conv1's values log 4 + log sqrt 2 and log sqrt 2 have the median log 2 + log sqrt 2,
    so they centre to +-log 2; conv2's (the outputs y0, y1: best chains log(4/sqrt 2) and log(4 sqrt 2)) to
    -+log sqrt 2. The input x is no conv output: -inf."""
    graph = graph_of(two_convs([[4, 1], [1, 1]], [[1, 2], [2, 1]]))
    centred = centred_chain_values(graph)
    a, y, x = (graph.tensor_nodes[t] for t in ("a", "y", "x"))
    assert centred[a] == pytest.approx([math.log(2), -math.log(2)], abs=1e-12)
    assert centred[y] == pytest.approx([-math.log(math.sqrt(2)), math.log(math.sqrt(2))], abs=1e-12)
    assert np.isneginf(centred[x]).all()


TWO_HEADS = """
g (float[1,4,4,4] x) => (float[1,4,4,4] y1, float[1,4,4,4] y2) {
  a = Conv (x, wa)
  ra = Relu (a)
  h = Conv (ra, wh)
  rh = Relu (h)
  y1 = Conv (rh, wo)
  b = Conv (ra, wb)
  rb = Relu (b)
  c = Conv (rb, wh)
  rc = Relu (c)
  y2 = Conv (rc, wo)
}"""


def test_a_longer_route_does_not_outrank_a_shorter_one():
    """Two heads with the same weights (h and c: wh, then wo), c one layer further from the input. Raw
    chain values grow with every layer crossed (each layer's best kernel is above its median), so all of
    c's channels outrank h's; centred on their layer's median they compare, and the budget gives both heads
    the same width where the raw values gave the deeper head more (measured: h 1-2 against c 3-4 at 0.4-0.7)."""
    w = np.array([[4, 1, 1, 1], [1, 3, 1, 1], [1, 1, 2, 1], [1, 1, 1, 1]], np.float32).reshape(4, 4, 1, 1)
    graph = graph_of(text_model(TWO_HEADS, {k: w for k in ("wa", "wh", "wb", "wo")}))
    h, c = graph.tensor_nodes["h"], graph.tensor_nodes["c"]
    raw = chain_values(graph)
    assert (raw[c] > raw[h]).all()
    centred = centred_chain_values(graph)
    assert np.median(centred[h]) == pytest.approx(0) and np.median(centred[c]) == pytest.approx(0)
    budget = ChannelBudget(graph, "lean", min_channels=0.25, round_channels=1)
    for target in (0.4, 0.5, 0.6, 0.7):
        keep = budget.node_keep_for(target)
        assert keep[h].sum() == keep[c].sum(), target


def test_scaling_a_layer_changes_no_chain_value_ranking():
    """The point of the normalisation: a layer 1000x smaller (BN folded, weight decay) ranks the same."""
    w1, w2 = [[4, 1], [1, 3]], [[1, 2], [2, 1]]
    small = chain_values(graph_of(two_convs(np.array(w1) * 1e-3, w2)))
    plain = chain_values(graph_of(two_convs(w1, w2)))
    assert np.allclose(small, plain)


def test_budget_keeps_the_better_chain_and_the_floor():
    graph = graph_of(two_convs([[4, 1], [1, 1]], [[1, 2], [2, 1]]))
    budget = ChannelBudget(graph, "lean", min_channels=0.5, round_channels=1)
    a = graph.tensor_nodes["a"]
    floor = budget.node_keep(0)
    assert floor[a[0]] and not floor[a[1]]  # the floor (1 of 2 channels) is the best-chain channel
    assert budget.smallest_ratio == pytest.approx(0.5)
    everything = budget.node_keep_for(1.0)
    assert everything[a].all()
    sel = select_channels(budget, floor)
    assert sel.layer_mask(graph.layers[0]).tolist() == [[True, True], [False, False]]
    assert sel.layer_mask(graph.layers[1]).tolist() == [[True, False], [True, False]]


def test_residual_channels_leave_together():
    text = """
    g (float[1,4,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <pads = [1,1,1,1]> (x, w1)
      b = Conv <pads = [1,1,1,1]> (a, w2)
      s = Add (a, b)
      y = Conv (s, w3)
    }"""
    rng = np.random.default_rng(0)
    model = text_model(text, {"w1": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
                              "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32),
                              "w3": rng.standard_normal((4, 8, 1, 1)).astype(np.float32)})
    pruner = Pruner(model)
    budget = pruner.channel_budget("lean", min_channels=0.25, round_channels=1)
    graph = pruner.graph
    a, b = graph.tensor_nodes["a"], graph.tensor_nodes["b"]
    assert (budget.unit[a] == budget.unit[b]).all()  # a[c], b[c] and s[c] are one unit
    result = pruner.prune(target_macs=0.5, round_channels=1, min_channels=0.25)
    kept = result.plan.node_keep
    assert (kept[a] == kept[b]).all() and 2 <= kept[a].sum() < 8
    check_contract(pruner.loaded.original, result, pruner.loaded.input_shapes, np.random.default_rng(1))


def test_a_conv_that_feeds_the_output_through_a_pool_is_fixed():
    """SqueezeNet's head: the last conv's channels reach the output through Relu and a global pool only, so
    they are the classes and stay; the budget must not count them as removable (it once planned 0.131 for
    --target-macs 0.1 on SqueezeNet, its estimate being 0.108)."""
    text = """
    g (float[1,3,8,8] x) => (float[1,10] y) {
      a = Conv <pads = [1,1,1,1]> (x, w1)
      r = Relu (a)
      c = Conv (r, w2)
      q = Relu (c)
      p = GlobalAveragePool (q)
      y = Flatten (p)
    }"""
    rng = np.random.default_rng(0)
    model = text_model(text, {"w1": rng.standard_normal((32, 3, 3, 3)).astype(np.float32),
                              "w2": rng.standard_normal((10, 32, 1, 1)).astype(np.float32)})
    pruner = Pruner(model)
    budget = pruner.channel_budget("lean", min_channels=0.1, round_channels=1)
    c, a = pruner.graph.tensor_nodes["c"], pruner.graph.tensor_nodes["a"]
    assert not budget.removable[budget.unit[c]].any() and budget.removable[budget.unit[a]].all()
    result = pruner.prune(target_macs=0.5, round_channels=1)
    assert abs(result.report["budget"]["achieved_macs_ratio"] - 0.5) <= 0.03
    assert result.plan.node_keep[c].all()
    check_contract(pruner.loaded.original, result, pruner.loaded.input_shapes, np.random.default_rng(1))


def _output_depends_on_input(model, shapes) -> bool:
    """Two random inputs give outputs that differ by more than 1e-4 of the output's scale."""
    sess = session(model)
    rng = np.random.default_rng(3)
    outs = [sess.run(None, random_feeds(model, shapes, rng)) for _ in range(2)]
    return any(np.abs(x - y).max() > 1e-4 * max(np.abs(x).max(), 1e-30) for x, y in zip(*outs))


def _budget_case(name, cache, methods=("lean", "l1")):
    pruner = Pruner(zoo_path(name, True, cache))
    original_session = session(pruner.loaded.original)
    # the random-weight zoo MobileNetV2 at 64 x 64 computes (nearly) a constant itself: there only the chain
    # of kept kernels (inputs_reach_outputs) can be checked
    sensitive = _output_depends_on_input(pruner.loaded.original, pruner.loaded.input_shapes)
    for method in methods:
        for target in (0.75, 0.5, 0.25, 0.1):
            try:
                result = pruner.prune(target_macs=target, method=method)
            except LeanOnnxError as exc:  # below the floor: refused, naming the smallest reachable ratio
                assert "smallest reachable MACs ratio is" in str(exc)
                smallest = pruner.channel_budget(method).smallest_ratio
                assert target < smallest - 0.03
                result = pruner.prune(target_macs=min(1.0, smallest), method=method)
            else:
                assert abs(result.report["budget"]["achieved_macs_ratio"] - target) <= 0.03, (method, target)
            report = result.report
            assert report["budget"]["granularity"] == "channel"
            assert report["inputs_reach_outputs"], (name, method, target)
            if sensitive:
                assert _output_depends_on_input(result.model, pruner.loaded.input_shapes), (name, method, target)
            check_contract(pruner.loaded.original, result, pruner.loaded.input_shapes, np.random.default_rng(0),
                           samples=1, original_session=original_session)


@pytest.mark.parametrize("name", FAST)
def test_target_macs_on_the_fast_zoo(name, zoo_cache):
    _budget_case(name, zoo_cache, methods=("lean", "l1", "sv") if name == "resnet18" else ("lean",))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ZOO if n not in FAST])
def test_target_macs_on_the_whole_zoo(name, zoo_cache):
    _budget_case(name, zoo_cache, methods=("lean",))


def test_exactly_one_of_keep_and_target():
    pruner = Pruner(two_convs([[4, 1], [1, 1]], [[1, 2], [2, 1]]))
    with pytest.raises(LeanOnnxError, match="exactly one"):
        pruner.prune(0.5, target_macs=0.5)
    with pytest.raises(LeanOnnxError, match="exactly one"):
        pruner.prune()
    for bad in (0, -0.5, 1.5):
        with pytest.raises(LeanOnnxError, match="--target-macs"):
            pruner.prune(target_macs=bad)
    with pytest.raises(LeanOnnxError, match="granularity kernel"):
        pruner.prune(target_macs=0.5, granularity="kernel")


TWO_BRANCHES = """
g (float[1,2,16,16] x) => (float[1,2,16,16] y) {
  a = Conv (x, wa)
  da = Conv <group = 4, pads = [1, 1, 1, 1]> (a, wda)
  ya = Conv (da, wpa)
  b = Conv (x, wb)
  yb = Conv (b, wpb)
  y = Add (ya, yb)
}"""


def two_branches():
    ones = {"wa": (4, 2, 1, 1), "wda": (4, 1, 3, 3), "wpa": (2, 4, 1, 1), "wb": (4, 2, 1, 1), "wpb": (2, 4, 1, 1)}
    return text_model(TWO_BRANCHES, {k: np.ones(s, np.float32) for k, s in ones.items()})


def test_unit_costs_by_hand():
    """Branch a: 1x1 conv 2->4, depthwise 3x3, 1x1 conv 4->2; branch b: 1x1 2->4, 1x1 4->2; 16x16 maps.
    A channel of a (coupled with its depthwise output) carries: 2 x 256 MACs out of the first conv,
    9 x 256 of the depthwise conv (its one kernel, counted once), 2 x 256 into the last; its time adds
    KAPPA x 256 for each of the four conv reads/writes of its channels (a written, a read, da written, da read). A channel of b: 2 x 256 MACs out, 2 x 256 in, two reads/writes."""
    from lean_onnx.select.unit_cost import KAPPA, unit_costs

    graph = graph_of(two_branches())
    unit = graph.coupling_components
    macs, time = unit_costs(graph, unit, int(unit.max()) + 1)
    a, da, b = (graph.tensor_nodes[t] for t in ("a", "da", "b"))
    assert (unit[a] == unit[da]).all()
    assert macs[unit[a]] == pytest.approx(np.full(4, 512 + 2304 + 512))
    assert time[unit[a]] == pytest.approx(np.full(4, 3328 + 4 * KAPPA * 256))
    assert macs[unit[b]] == pytest.approx(np.full(4, 1024))
    assert time[unit[b]] == pytest.approx(np.full(4, 1024 + 2 * KAPPA * 256))


ELEMENTWISE_CHAINS = """
g (float[1,2,8,8] x) => (float[1,2,8,8] y) {
  a = Conv (x, wa)
  ar = Relu (a)
  b = Conv (ar, wb)
  b3 = Add (b, three)
  bc = Clip (b3, zero, six)
  bm = Mul (b, bc)
  bh = Div (bm, six)
  c = Conv (bh, wc)
  cs = Sigmoid (c)
  cm = Mul (c, cs)
  y = Conv (cm, wy)
}"""


def test_standalone_elementwise_by_hand():
    """What ORT runs on its own after a conv: a Relu that is the conv output's only reader is fused into the
    conv (not counted); an exported hard-swish `b * Clip(b + 3, 0, 6) / 6` reads b twice, so its four ops are
    counted; `c * Sigmoid(c)` is one op (the Sigmoid is not counted, the Mul is). Each counted node adds
    KAPPA_EW per element of its output (64 per channel) to its channels' units."""
    from lean_onnx.select.unit_cost import KAPPA, KAPPA_EW, standalone_elementwise, unit_costs

    shapes = {"wa": (4, 2, 1, 1), "wb": (4, 4, 1, 1), "wc": (4, 4, 1, 1), "wy": (2, 4, 1, 1)}
    arrays = {k: np.ones(s, np.float32) for k, s in shapes.items()}
    arrays.update(three=np.float32(3), zero=np.float32(0), six=np.float32(6))
    graph = graph_of(text_model(ELEMENTWISE_CHAINS, arrays))
    assert standalone_elementwise(graph) == ["b3", "bc", "bm", "bh", "cm"]
    unit = graph.coupling_components
    macs, time = unit_costs(graph, unit, int(unit.max()) + 1)
    conv_io = 2 * KAPPA * 64  # each channel is written by one conv and read by one
    for tensor, extra in (("a", 0), ("b", 4), ("c", 1)):
        units = np.unique(unit[graph.tensor_nodes[tensor]])
        assert time[units] - macs[units] == pytest.approx(np.full(units.size, conv_io + extra * KAPPA_EW * 64))


def test_time_allocation_takes_the_budget_where_the_time_goes():
    """All kernels equal, so every chain has the same value: `macs` allocation orders by unit id only, `time`
    keeps the units with the least estimated time per MAC (branch a, 3.8 per MAC, against b's 5.5) first, so
    at the same MACs budget it removes b's channels, which cost more time per MAC."""
    graph = graph_of(two_branches())
    a, b = graph.tensor_nodes["a"], graph.tensor_nodes["b"]
    by_time = ChannelBudget(graph, "lean", min_channels=0.25, round_channels=1, allocate="time")
    by_macs = ChannelBudget(graph, "lean", min_channels=0.25, round_channels=1, allocate="macs")
    assert np.isfinite(by_macs.unit_key[by_macs.unit[a]]).all() and np.ptp(by_macs.unit_key[by_macs.unit[a]]) == 0
    order = list(by_time.order)
    last_a = max(order.index(u) for u in set(by_time.unit[a]) if u in order)
    first_b = min(order.index(u) for u in set(by_time.unit[b]) if u in order)
    assert last_a < first_b
    ratio = by_time.macs(by_time.node_keep(3)) / by_time.macs_before  # floor + the three other a units
    keep = by_time.node_keep_for(ratio)
    assert keep[a].all() and keep[b].sum() == 1  # b at its floor
    assert by_macs.macs(by_macs.node_keep_for(ratio)) == pytest.approx(by_time.macs(keep), rel=0.05)
    with pytest.raises(LeanOnnxError, match="--allocate"):
        ChannelBudget(graph, "lean", allocate="fast")


def test_allocation_is_in_the_report_and_the_contract_holds():
    pruner = Pruner(two_branches())
    kept = {}
    for allocate in ("time", "macs"):
        result = pruner.prune(target_macs=0.83, allocate=allocate, round_channels=1, min_channels=0.25)
        assert result.report["budget"]["allocate"] == allocate
        if allocate == "time":  # `macs` removes one of a's units instead (0.19 of the MACs at once)
            assert abs(result.report["budget"]["achieved_macs_ratio"] - 0.83) <= 0.03
        check_contract(pruner.loaded.original, result, pruner.loaded.input_shapes, np.random.default_rng(0))
        kept[allocate] = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    # 0.83 of the MACs: three of b's four channels gone (0.059 of the MACs each; they cost the most time per MAC)
    assert kept["time"]["wb"] == (1, 2, 1, 1) and kept["time"]["wa"] == (4, 2, 1, 1)
    assert kept["time"] != kept["macs"]  # the same MACs, other channels


SPLIT_BLOCK = """
g (float[1,3,8,8] x) => (float[1,8,8,8] y) {
  a = Conv (x, w1)
  h1, h2 = Split <axis = 1> (a, halves)
  b = Conv <pads = [1, 1, 1, 1]> (h2, w2)
  c = Concat <axis = 1> (h1, h2, b)
  y = Conv (c, w3)
}"""


def split_block():
    """YOLOv8's C2f in small: a conv whose output is split in halves, the second half read by a 3x3 conv,
    all three concatenated. The first half's channels are weak but three, which are the strongest of all,
    so a selection by value keeps an odd count in each half."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((128, 3, 1, 1)).astype(np.float32)
    w1[3:64] *= 1e-3
    w1[:3] *= 10
    w3 = rng.standard_normal((8, 192, 1, 1)).astype(np.float32)
    w3[:, :3] *= 10
    return text_model(SPLIT_BLOCK, {"w1": w1, "halves": np.array([64, 64], np.int64),
                                    "w2": rng.standard_normal((64, 64, 3, 3)).astype(np.float32), "w3": w3})


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_split_halves_and_conv_inputs_are_whole_blocks(target):
    """Every channel count a blocked kernel sees is a multiple of --round-channels: not only each conv's
    output (128 -> 64 as 1 + 63 before) but each Split half and each conv's input (a conv reading 31 of
    32 channels ran 2x slower in ONNX Runtime than one reading 32, on the trained YOLOv8n)."""
    model = split_block()
    pruner = Pruner(model)
    budget = pruner.channel_budget("lean", min_channels=0.1, round_channels=8)
    partial_halves = 0
    for count in range(len(budget.order) + 1):  # the selection's estimate, for every number of units
        keep = budget.node_keep(count)
        kept = [int(keep[pruner.graph.tensor_nodes[t]].sum()) for t in ("h1", "h2", "b")]
        assert all(n % 8 == 0 for n in kept), (count, kept)  # was 3 + 13 in the halves, on the floor alone
        partial_halves += any(0 < n < 64 for n in kept[:2])
    assert partial_halves  # the halves were cut, not only kept whole
    result = pruner.prune(target_macs=target, round_channels=8, min_channels=0.1)
    assert abs(result.report["budget"]["achieved_macs_ratio"] - target) <= 0.03
    keep = result.plan.tensor_keep
    counts = {t: int(keep[t].sum()) for t in ("a", "h1", "h2", "b", "c")}
    assert all(n % 8 == 0 and n > 0 for n in counts.values()), counts
    weights = {i.name: i for i in result.model.graph.initializer}
    for node in result.model.graph.node:
        if node.op_type == "Conv" and node.input[0] != "x":
            assert weights[node.input[1]].dims[1] % 8 == 0, node.name
    check_contract(pruner.loaded.original, result, pruner.loaded.input_shapes, np.random.default_rng(0))


def test_split_halves_are_whole_blocks_with_keep_too():
    """The rewrite's own rounding (kernel granularity, `--keep`) rounds Split halves as well (4 + 44 before)."""
    pruner = Pruner(split_block())
    for keep in (0.5, 0.05):
        result = pruner.prune(keep, round_channels=8)
        kept = [int(result.plan.tensor_keep[t].sum()) for t in ("a", "h1", "h2", "b")]
        assert all(n % 8 == 0 for n in kept) and kept[1] < 64 and kept[2] < 64, (keep, kept)
        check_contract(pruner.loaded.original, result, pruner.loaded.input_shapes, np.random.default_rng(0))
