"""A Concat that reads a tensor twice once a residual branch left (YOLOv8's C2f), and a Split output that
keeps no channel: the pruned model reads each tensor once and computes no channel nobody reads, MACs as
estimated, pruned == masked."""

import numpy as np
import pytest

from lean_onnx.rewrite.contract import check_contract
from lean_onnx.rewrite.pruner import Pruner
from tests.helpers import text_model
from tests.select.test_budget import SPLIT_BLOCK  # a C2f block without its bottleneck

C2F = """
g (float[1,16,8,8] x) => (float[1,16,8,8] y) {
  a = Conv <pads = [1, 1, 1, 1]> (x, w1)
  h1, h2 = Split <axis = 1> (a, halves)
  m1 = Conv (h2, wm1)
  r = Relu (m1)
  m2 = Conv (r, wm2)
  s = Add (h2, m2)
  c = Concat <axis = 1> (h1, h2, s)
  y = Conv (c, w2)
}"""


def c2f(branch_scale=1e-3):
    """A C2f block in small: a conv split in halves, the second half through a residual bottleneck (weak:
    `branch_scale`), all three concatenated into a 1x1 conv."""
    rng = np.random.default_rng(0)
    w = {"w1": rng.standard_normal((64, 16, 3, 3)), "halves": np.array([32, 32], np.int64),
         "wm1": rng.standard_normal((32, 32, 1, 1)), "wm2": rng.standard_normal((32, 32, 1, 1)) * branch_scale,
         "w2": rng.standard_normal((16, 96, 1, 1))}
    return text_model(C2F, {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in w.items()})


def ops(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("target", [0.75, 0.5, 0.3])
def test_a_concat_reading_a_skip_twice_is_merged_into_the_conv(target):
    """With the bottleneck gone its sum is h2, the Concat reads (h1, h2, h2): the conv after it gets the
    two copies' kernels summed, and (h1, h2) being the whole Split, the conv reads `a` itself."""
    model = c2f()
    pruner = Pruner(model)
    result = pruner.prune(target_macs=target, round_channels=2, min_channels=0.1)
    budget = result.report["budget"]
    assert result.report["residual_sums_bypassed"] == ["s"]
    assert result.report["concat_reads_merged"] == 1
    assert ops(result.model) == ["Conv", "Conv"], ops(result.model)
    weights = {i.name: i for i in result.model.graph.initializer}
    assert sorted(weights) == ["w1", "w2"]  # the Split's sizes left with it
    assert weights["w2"].dims[1] == weights["w1"].dims[0]  # one copy of each kept channel of `a`
    # the estimate the budget met is the written model's MACs, merge included
    assert budget["achieved_macs_ratio"] == pytest.approx(budget["planned_ratio"], abs=1e-6)
    assert abs(budget["achieved_macs_ratio"] - target) <= 0.03
    report = check_contract(model, result, pruner.loaded.input_shapes, np.random.default_rng(0))
    assert report["max_rel_err_vs_masked"] <= 1e-5


def test_the_merged_kernels_are_the_copies_summed():
    """Everything kept (a strong branch, --keep 1 but the branch emptied by zero weights): the merged
    weight is w2's h1 columns, then its two h2 blocks added."""
    model = c2f(branch_scale=0.0)  # m2 == 0: sv prunes its kernels first, the branch is dead, its sum bypassed
    pruner = Pruner(model)
    kernels = 64 * 16 + 32 * 32 * 2 + 16 * 96
    result = pruner.prune(1 - 1024 / kernels, "sv", round_channels=1)
    assert result.report["concat_reads_merged"] == 1 and ops(result.model) == ["Conv", "Conv"]
    from onnx import numpy_helper
    merged = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}["w2"]
    w2 = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}["w2"]
    np.testing.assert_allclose(merged[:, :32], w2[:, :32])
    np.testing.assert_allclose(merged[:, 32:], w2[:, 32:64] + w2[:, 64:], rtol=1e-6)
    check_contract(model, result, pruner.loaded.input_shapes, np.random.default_rng(0))



def test_arrays_cut_like_the_weights_take_the_first_copy():
    """Pruner.slice_like (the positions reconstruction writes a refit value back to, Adam's moments) gives a
    merged kernel the first copy's values, not the sum: a change made there alone changes the masked model
    as it changes the merged kernel, since both copies read the same tensor."""
    model = c2f(branch_scale=0.0)
    pruner = Pruner(model)
    result = pruner.prune(1 - 1024 / (64 * 16 + 32 * 32 * 2 + 16 * 96), "sv", round_channels=1)
    index = np.arange(16 * 96, dtype=np.float32).reshape(16, 96, 1, 1)
    cut = pruner.slice_like(result, {"w2": index})["w2"]
    np.testing.assert_array_equal(cut, index[:, :64])  # h1's columns, then h2's first copy


def test_a_split_output_nothing_reads_keeps_no_channel():
    """y reads nothing of h1 (zero kernels): h1's channels leave `a` and the Split (which then has one
    output, an Identity). Before, the Split kept one channel there, rounded up to a block, computed by `a`
    and read by nobody (16 such channels in each C2f block of the trained YOLOv8n at a quarter of its MACs)."""
    rng = np.random.default_rng(0)
    w3 = rng.standard_normal((8, 48, 1, 1)).astype(np.float32)
    w3[:, :16] = 0
    model = text_model(SPLIT_BLOCK, {"w1": rng.standard_normal((32, 3, 1, 1)).astype(np.float32),
                                      "halves": np.array([16, 16], np.int64),
                                      "w2": rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "w3": w3})
    pruner = Pruner(model)
    kernels = 32 * 3 + 16 * 16 + 8 * 48
    result = pruner.prune(1 - 128 / kernels, "sv", round_channels=8)
    weights = {i.name: i for i in result.model.graph.initializer}
    assert weights["w1"].dims[0] == 16 and weights["w3"].dims[1] == 32
    assert "Split" not in ops(result.model) and result.report["concat_reads_merged"] == 0
    assert "halves" not in weights  # the Split, now an Identity, reads no sizes
    check_contract(model, result, pruner.loaded.input_shapes, np.random.default_rng(0))


def test_random_c2f_blocks_merge_and_keep_the_contract():
    """The random CNNs of tests/graphgen.py that have a C2f block (a weak bottleneck at times), pruned at
    several keeps: pruned == masked on every one, and some of them had repeated reads merged."""
    from tests.graphgen import build_random_cnn

    merged = pruned = 0
    for seed in range(80):
        model, shape = build_random_cnn(seed)
        if "c2f" not in {p.key: p.value for p in model.metadata_props}["graphgen_blocks"].split(","):
            continue
        shapes = {"input": tuple(shape)}
        for keep, method in ((0.5, "sv"), (0.2, "lean")):
            pruner = Pruner(model, input_shapes=shapes)
            result = pruner.prune(keep, method, round_channels=1)
            check_contract(model, result, shapes, np.random.default_rng(seed))
            merged += result.report["concat_reads_merged"] > 0
            pruned += 1
    assert pruned >= 20 and merged >= 3, (pruned, merged)


def test_the_command_line_says_how_many_reads_were_merged(tmp_path):
    """`lean-onnx IN OUT --target-macs 0.5` on the small C2f block: exit 0, the summary names the merge and the
    report counts it."""
    import json
    import subprocess
    import sys

    import onnx

    source, out, report = tmp_path / "c2f.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(c2f(), str(source))
    done = subprocess.run([sys.executable, "-m", "lean_onnx", str(source), str(out), "--target-macs", "0.5",
                           "--round-channels", "2", "--report", str(report)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 repeated Concat reads merged into the convs after them" in done.stdout + done.stderr
    assert json.loads(report.read_text())["concat_reads_merged"] == 1
