"""Issue 6: hostile and unusual models get a clear answer, and no wrong model is ever written.

Every case goes through the command line (`python -m lean_onnx`, as a pipeline runs it) and checks
the exit code, that stderr is one clear `[E]` line naming the file or node when it fails (never a
traceback), and, where a model is written, the full onnx.checker (by path) and the contract on the
written files: same interface, IR version and opsets as the input, and pruned(x) == masked(x) under ONNX
Runtime (DESIGN.md sections 2 and 6). docs/robustness.md has the table of cases and answers.
Bad input that tests/test_cli.py already covers (missing, empty, junk, half-truncated files) and OUT == IN
through the same path, a relative path or a symlink, and SIGKILL during a run (tests/test_prune.py) are not
repeated here.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lean_onnx.graph.cost import float_params
from lean_onnx.rewrite.contract import RTOL, max_rel_error, random_feeds, session

ROOT = pathlib.Path(__file__).resolve().parents[2]
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
RNG = np.random.default_rng(6)


# -- helpers --------------------------------------------------------------------------------------

def cli(*args, env=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "lean_onnx", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def assert_refused(code, err, expected_code, *needles):
    """Exit code, and stderr is exactly one `[E]` line containing every needle (file or node name...)."""
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[E] "), err
    assert "Traceback" not in err and "internal" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def weights(*shape, dtype=np.float32):
    return (RNG.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[1:]))))).astype(dtype)


def vi(name, shape, dtype=F32):
    return helper.make_tensor_value_info(name, dtype, shape)


def build(nodes, inputs, outputs, inits=None, opset=17, ir=None, functions=(), domains=()):
    """A checked ModelProto; `inits` {name: array} become initializers in their own dtype."""
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions),
                              ir_version=ir or helper.find_min_ir_version_for(opsets[:1]))
    onnx.checker.check_model(model, full_check=True)
    return model


def conv(x, w, y, b=None, **attrs):
    attrs.setdefault("pads", [1, 1, 1, 1])
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], **attrs)


def chain_inits(c_in=3, mid=8, c_out=4, dtype=np.float32):
    return {"w1": weights(mid, c_in, 3, 3, dtype=dtype), "b1": weights(mid, dtype=dtype),
            "w2": weights(mid, mid, 3, 3, dtype=dtype), "w3": weights(c_out, mid, 1, 1, dtype=dtype)}


def chain_nodes(x="x", y="y"):
    """Conv 3x3 -> Relu -> Conv 3x3 -> Relu -> Conv 1x1 (weights w1, b1, w2, w3)."""
    return [conv(x, "w1", "a", "b1"), helper.make_node("Relu", ["a"], ["ra"]), conv("ra", "w2", "c"),
            helper.make_node("Relu", ["c"], ["rc"]), conv("rc", "w3", y, pads=[0, 0, 0, 0])]


def chain_model(**kw):
    return build(chain_nodes(), [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])], chain_inits(), **kw)


def save(model, path):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def interface(model):
    inits = {t.name for t in model.graph.initializer}

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return ([(i.name, i.type.tensor_type.elem_type, dims(i)) for i in model.graph.input if i.name not in inits],
            [(o.name, o.type.tensor_type.elem_type, dims(o)) for o in model.graph.output])


def assert_contract(src, out, masked, report, shapes, samples=2):
    """The contract on the files the CLI wrote: checker (full, by path), interface, IR, opsets, reported
    parameters, pruned(x) == masked(x) within 1e-5 of each output's magnitude."""
    original = onnx.load(str(src))
    for path in (out, masked):
        onnx.checker.check_model(str(path), full_check=True)
    pruned_model, masked_model = onnx.load(str(out)), onnx.load(str(masked))
    for model in (pruned_model, masked_model):
        assert model.ir_version == original.ir_version
        assert list(model.opset_import) == list(original.opset_import)
        assert interface(model) == interface(original)
    rep = json.loads(pathlib.Path(report).read_text())
    assert rep["params"]["after"] == float_params(pruned_model)
    sessions = [session(masked_model), session(pruned_model)]
    if rep["keep_requested"] >= 1.0:
        sessions.append(session(original))
    rng = np.random.default_rng(0)
    for _ in range(samples):
        feeds = random_feeds(original, shapes, rng)
        outs = [s.run(None, feeds) for s in sessions]
        assert max_rel_error(outs[0], outs[1]) <= RTOL, f"pruned != masked: {max_rel_error(outs[0], outs[1]):.3g}"
        if len(outs) > 2:
            assert max_rel_error(outs[2], outs[0]) <= RTOL
    return pruned_model, rep


def prune_ok(tmp_path, model, shapes, *extra, keep=0.5, env=None, name="in.onnx"):
    """Save `model` (or take a path), prune it with the CLI, assert success and the contract; returns
    (pruned model, report, stderr)."""
    src = model if isinstance(model, pathlib.Path) else save(model, tmp_path / name)
    out, masked, report = tmp_path / "out.onnx", tmp_path / "masked.onnx", tmp_path / "report.json"
    code, _, err = cli(src, out, "--keep", keep, "--emit-masked", masked, "--report", report,
                       "--round-channels", "1", "-q", *extra, env=env)
    assert code == 0, err
    assert "Traceback" not in err and "[E]" not in err, err
    pruned, rep = assert_contract(src, out, masked, report, shapes)
    return pruned, rep, err


def initializer_types(model):
    return {t.name: t.data_type for t in model.graph.initializer}


def frozen_ops(rep):
    return {f["op"] for f in rep["frozen"]}


X = {"x": (1, 3, 8, 8)}


# -- 1. unusual but valid models -------------------------------------------------------------------

def test_fp16_weights_are_written_back_in_fp16(tmp_path):
    model = build(chain_nodes(), [vi("x", [1, 3, 8, 8], F16)], [vi("y", [1, 4, 8, 8], F16)],
                  chain_inits(dtype=np.float16))
    pruned, rep, _ = prune_ok(tmp_path, model, X, keep=0.3)
    assert set(initializer_types(pruned).values()) == {F16}
    assert rep["kernels"]["kept"] < rep["kernels"]["total"]


def test_fp16_model_wrapped_in_casts(tmp_path):
    nodes = ([helper.make_node("Cast", ["x"], ["xh"], to=F16)] + chain_nodes("xh", "yh")
             + [helper.make_node("Cast", ["yh"], ["y"], to=F32)])
    model = build(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])], chain_inits(dtype=np.float16))
    pruned, rep, _ = prune_ok(tmp_path, model, X, keep=0.3)
    floats = {t for t in initializer_types(pruned).values() if t in (F16, F32, TensorProto.DOUBLE)}
    assert floats == {F16} and rep["kernels"]["kept"] < rep["kernels"]["total"]


def opset_model(opset):
    """Conv/BN/Relu/Clip, a channel Split (attribute before 13, input after), Concat, Resize, Pad,
    ReduceMean (axes attribute before 18, input after), GlobalAveragePool, Flatten, Gemm, Softmax."""
    nodes = [conv("x", "w1", "a", "b1"),
             helper.make_node("BatchNormalization", ["a", "g", "beta", "mean", "var"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"])]
    inits = {"w1": weights(8, 3, 3, 3), "b1": weights(8), "g": RNG.uniform(0.5, 1.5, 8).astype(np.float32),
             "beta": weights(8), "mean": weights(8), "var": RNG.uniform(0.5, 1.5, 8).astype(np.float32),
             "w2": weights(4, 4, 3, 3), "w3": weights(4, 4, 1, 1), "lo": np.float32(0), "hi": np.float32(6),
             "scales": np.array([1, 1, 2, 2], np.float32), "roi": np.zeros(0, np.float32),
             "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "w4": weights(6, 8, 3, 3),
             "fc": weights(5, 6), "fcb": weights(5)}
    if opset < 13:
        nodes.append(helper.make_node("Split", ["r"], ["s1", "s2"], axis=1, split=[4, 4]))
    else:
        inits["split"] = np.array([4, 4], np.int64)
        nodes.append(helper.make_node("Split", ["r", "split"], ["s1", "s2"], axis=1))
    nodes += [conv("s1", "w2", "c1"), helper.make_node("Clip", ["c1", "lo", "hi"], ["k1"]),
              conv("s2", "w3", "c2", pads=[0, 0, 0, 0]),
              helper.make_node("Concat", ["k1", "c2"], ["cat"], axis=1),
              helper.make_node("Resize", ["cat", "roi", "scales"], ["up"], mode="nearest"),
              helper.make_node("Pad", ["up", "pads"], ["pad"]),
              conv("pad", "w4", "c4", pads=[0, 0, 0, 0], strides=[2, 2])]
    if opset < 18:
        nodes.append(helper.make_node("ReduceMean", ["c4"], ["m"], axes=[2, 3], keepdims=1))
    else:
        inits["axes"] = np.array([2, 3], np.int64)
        nodes.append(helper.make_node("ReduceMean", ["c4", "axes"], ["m"], keepdims=1))
    nodes += [helper.make_node("Flatten", ["m"], ["f"]), helper.make_node("Gemm", ["f", "fc", "fcb"], ["l"], transB=1),
              helper.make_node("Softmax", ["l"], ["y"], axis=1)]
    return build(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 5])], inits, opset=opset)


@pytest.mark.parametrize("opset", range(11, 22))
def test_opsets_11_to_21(tmp_path, opset):
    pruned, rep, _ = prune_ok(tmp_path, opset_model(opset), X, keep=0.4)
    assert pruned.opset_import[0].version == opset and rep["kernels"]["kept"] < rep["kernels"]["total"]


@pytest.mark.parametrize("ir", [7, 8, 9, 10])
def test_ir_versions_7_to_10(tmp_path, ir):
    pruned, _, _ = prune_ok(tmp_path, chain_model(opset=13, ir=ir), X)
    assert pruned.ir_version == ir


def test_weights_in_constant_nodes(tmp_path):
    inits = chain_inits()
    inits["w2"] = weights(96, 8, 3, 3)  # large (> 65536 elements) weights in a Constant node too
    inits["w3"] = weights(4, 96, 1, 1)
    nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in inits.items()]
    model = build(nodes + chain_nodes(), [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])])
    _, rep, _ = prune_ok(tmp_path, model, X, keep=0.3)
    assert rep["kernels"]["total"] == 8 * 3 + 96 * 8 + 4 * 96


def test_one_initializer_shared_by_two_convs(tmp_path):
    nodes = [conv("x", "w", "a", "b"), helper.make_node("Relu", ["a"], ["r"]), conv("r", "w", "y", "b")]
    model = build(nodes, [vi("x", [1, 6, 8, 8])], [vi("y", [1, 6, 8, 8])], {"w": weights(6, 6, 3, 3), "b": weights(6)})
    pruned, rep, _ = prune_ok(tmp_path, model, {"x": (1, 6, 8, 8)}, keep=0.5)
    assert rep["kernels"]["total"] == 72 and len(pruned.graph.initializer) >= 2


def test_conv_weights_computed_at_run_time_are_frozen(tmp_path):
    nodes = [conv("x", "w1", "a", "b1"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Mul", ["w2", "s"], ["w2s"]), conv("r", "w2s", "y")]
    model = build(nodes, [vi("x", [1, 3, 8, 8]), vi("s", [1])], [vi("y", [1, 4, 8, 8])],
                  {"w1": weights(8, 3, 3, 3), "b1": weights(8), "w2": weights(4, 8, 3, 3)})
    _, rep, _ = prune_ok(tmp_path, model, {"x": (1, 3, 8, 8), "s": (1,)}, keep=0.5)
    frozen = {f["node"]: f["reason"] for f in rep["frozen"]}
    assert any("computed at run time" in reason for reason in frozen.values()), frozen
    assert rep["kernels"]["total"] == 24  # only the first conv's kernels are LEAN's to choose


def test_nhwc_model_with_transposes_around_the_convs(tmp_path):
    nodes = ([helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2])] + chain_nodes("xt", "yt")
             + [helper.make_node("Transpose", ["yt"], ["y"], perm=[0, 2, 3, 1])])
    model = build(nodes, [vi("x", [1, 8, 8, 3])], [vi("y", [1, 8, 8, 4])], chain_inits())
    _, rep, _ = prune_ok(tmp_path, model, {"x": (1, 8, 8, 3)}, keep=0.3)
    assert rep["channels"]["after"] < rep["channels"]["before"]


def test_dynamic_batch_and_spatial_dims(tmp_path):
    model = build(chain_nodes(), [vi("x", ["N", 3, "H", "W"])], [vi("y", ["N", 4, "H", "W"])], chain_inits())
    pruned, _, err = prune_ok(tmp_path, model, {"x": (2, 3, 12, 10)}, keep=0.3)
    assert "symbolic dims" in err  # the assumed analysis shape is announced
    assert interface(pruned)[0][0][2] == ["N", 3, "H", "W"]


def test_graph_output_also_consumed_inside(tmp_path):
    nodes = chain_nodes()
    model = build(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8]), vi("ra", [1, 8, 8, 8])], chain_inits())
    pruned, _, _ = prune_ok(tmp_path, model, X, keep=0.3)
    assert [o.name for o in pruned.graph.output] == ["y", "ra"]


def test_empty_and_duplicate_node_names(tmp_path):
    nodes = chain_nodes()
    for node, name in zip(nodes, ["", "dup", "dup", "", "dup"]):
        node.name = name
    model = build(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])], chain_inits())
    pruned, _, err = prune_ok(tmp_path, model, X, keep=0.3)  # ONNX Runtime refuses the input; not the output
    assert "made unique" in err
    names = [n.name for n in pruned.graph.node if n.name]
    assert len(names) == len(set(names)) and "dup" in names


def test_local_functions_are_inlined_and_their_convs_pruned(tmp_path):
    """Inlined (onnx.inliner) rather than frozen: exporters put whole blocks in functions (torch.onnx's
    module functions), and freezing them would leave nothing to prune."""
    block = helper.make_function("local", "Block", ["x", "w"], ["y"],
                                 [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                                  helper.make_node("Relu", ["c"], ["y"])], [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Block", ["x", "w1"], ["a"], domain="local", name="block1"),
             helper.make_node("Block", ["a", "w2"], ["b"], domain="local", name="block2"), conv("b", "w3", "y")]
    model = build(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])],
                  {"w1": weights(8, 3, 3, 3), "w2": weights(8, 8, 3, 3), "w3": weights(4, 8, 3, 3)},
                  functions=[block], domains=["local"])
    pruned, rep, _ = prune_ok(tmp_path, model, X, keep=0.3)
    assert rep["kernels"]["total"] == 24 + 64 + 32 and not pruned.functions


def _if_model():
    """A conv output read inside both branches of an If (outer-scope names, not node inputs)."""
    then_branch = helper.make_graph([helper.make_node("Relu", ["a"], ["t"])], "then", [], [vi("t", [1, 8, 8, 8])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["a"], ["e"])], "else", [], [vi("e", [1, 8, 8, 8])])
    nodes = [conv("x", "w1", "a", "b1"), helper.make_node("If", ["cond"], ["i"], then_branch=then_branch,
                                                          else_branch=else_branch),
             conv("i", "w2", "c"), helper.make_node("Relu", ["c"], ["rc"]), conv("rc", "w3", "y", pads=[0, 0, 0, 0])]
    return build(nodes, [vi("x", [1, 3, 8, 8]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 4, 8, 8])],
                 chain_inits())


def _loop_model():
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                              helper.make_node("Add", ["acc_in", "a"], ["acc_out"])], "body",
                             [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL),
                              vi("acc_in", [1, 8, 8, 8])],
                             [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", [1, 8, 8, 8])])
    nodes = [conv("x", "w1", "a", "b1"), helper.make_node("Loop", ["trips", "", "a"], ["l"], body=body),
             conv("l", "w2", "c"), helper.make_node("Relu", ["c"], ["rc"]), conv("rc", "w3", "y", pads=[0, 0, 0, 0])]
    inits = {**chain_inits(), "trips": np.array(2, np.int64)}
    return build(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])], inits)


def _scan_model():
    body = helper.make_graph([helper.make_node("Add", ["s_in", "row"], ["s_out"])], "body",
                             [vi("s_in", [1, 8, 8]), vi("row", [1, 8, 8])], [vi("s_out", [1, 8, 8])])
    nodes = [conv("x", "w1", "a", "b1"),
             helper.make_node("Scan", ["zero", "a"], ["s"], body=body, num_scan_inputs=1, scan_input_axes=[2]),
             helper.make_node("Unsqueeze", ["s", "ax"], ["su"]), helper.make_node("Add", ["a", "su"], ["sum"]),
             conv("sum", "w2", "c"), helper.make_node("Relu", ["c"], ["rc"]), conv("rc", "w3", "y", pads=[0, 0, 0, 0])]
    inits = {**chain_inits(), "zero": np.zeros((1, 8, 8), np.float32), "ax": np.array([2], np.int64)}
    return build(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])], inits)


@pytest.mark.parametrize("make, op, shapes", [(_if_model, "If", {"x": (1, 3, 8, 8), "cond": ()}),
                                              (_loop_model, "Loop", X), (_scan_model, "Scan", X)])
def test_control_flow_is_frozen(tmp_path, make, op, shapes):
    _, rep, _ = prune_ok(tmp_path, make(), shapes, keep=0.3)
    assert op in frozen_ops(rep)
    assert rep["kernels"]["kept"] < rep["kernels"]["total"]


def _qdq_model():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]), conv("xd", "w1", "y")]
    return build(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 8, 8, 8])],
                 {"s": np.float32(0.1), "z": np.uint8(128), "w1": weights(8, 3, 3, 3)}, opset=13)


def _qlinearconv_model():
    nodes = [helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="qconv")]
    inits = {"xs": np.float32(0.1), "xz": np.uint8(0), "w": np.ones((4, 3, 1, 1), np.uint8), "ws": np.float32(0.1),
             "wz": np.uint8(0), "ys": np.float32(0.1), "yz": np.uint8(0)}
    return build(nodes, [vi("x", [1, 3, 8, 8], TensorProto.UINT8)], [vi("y", [1, 4, 8, 8], TensorProto.UINT8)], inits)


def _convinteger_model():
    nodes = [helper.make_node("ConvInteger", ["x", "w"], ["y"], name="iconv")]
    return build(nodes, [vi("x", [1, 3, 8, 8], TensorProto.UINT8)], [vi("y", [1, 4, 8, 8], TensorProto.INT32)],
                 {"w": np.ones((4, 3, 1, 1), np.uint8)})


@pytest.mark.parametrize("make, op", [(_qdq_model, "QuantizeLinear"), (_qlinearconv_model, "QLinearConv"),
                                      (_convinteger_model, "ConvInteger")])
def test_quantized_models_are_refused(tmp_path, make, op):
    src = save(make(), tmp_path / "quant.onnx")
    code, _, err = cli(src, tmp_path / "out.onnx", "--keep", "0.5")
    assert_refused(code, err, 2, "quant.onnx", op, "prune the float model first, then quantize")
    assert not (tmp_path / "out.onnx").exists()


def test_rnn_without_convs_exits_4(tmp_path):
    nodes = [helper.make_node("RNN", ["x", "W", "R"], ["h", "h_last"], hidden_size=4)]
    model = build(nodes, [vi("x", [5, 1, 3])], [vi("h", [5, 1, 1, 4]), vi("h_last", [1, 1, 4])],
                  {"W": weights(1, 4, 3), "R": weights(1, 4, 4)})
    src = save(model, tmp_path / "rnn.onnx")
    code, _, err = cli(src, tmp_path / "out.onnx", "--keep", "0.5")
    assert_refused(code, err, 4, "rnn.onnx", "nothing to prune", "no Conv")


def test_pure_mlp_exits_4(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    model = build(nodes, [vi("x", [1, 16])], [vi("y", [1, 4])], {"w1": weights(8, 16), "b1": weights(8), "w2": weights(4, 8)})
    src = save(model, tmp_path / "mlp.onnx")
    code, _, err = cli(src, tmp_path / "out.onnx", "--keep", "0.5")
    assert_refused(code, err, 4, "mlp.onnx", "nothing to prune")


def large_model():
    """Weights above io.external_data.LARGE_ELEMENTS (65536): read from the file on demand, never held twice."""
    inits = {"w1": weights(96, 3, 3, 3), "b1": weights(96), "w2": weights(96, 96, 3, 3), "w3": weights(4, 96, 1, 1)}
    return build(chain_nodes(), [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])], inits)


def test_input_with_external_data(tmp_path):
    src = tmp_path / "ext" / "model.onnx"
    src.parent.mkdir()
    onnx.save(large_model(), str(src), save_as_external_data=True, location="model.weights", size_threshold=0)
    assert (src.parent / "model.weights").exists()
    pruned, _, _ = prune_ok(tmp_path, src, X, keep=0.3)
    assert not onnx.external_data_helper.uses_external_data(pruned.graph.initializer[0])  # small: one file


def data_files(folder, name="out.onnx"):
    return sorted(p.name for p in pathlib.Path(folder).iterdir() if p.name.startswith(name + ".") and p.name.endswith(".data"))


def test_output_over_the_size_limit_is_written_with_external_data(tmp_path):
    """LEAN_ONNX_EXTERNAL_DATA_BYTES stands in for protobuf's 2 GiB: OUT's tensors go to a uniquely
    named data file beside it; a second run replaces OUT and removes the first run's data file."""
    env = {"LEAN_ONNX_EXTERNAL_DATA_BYTES": "20000"}
    src = save(large_model(), tmp_path / "in.onnx")
    prune_ok(tmp_path, src, X, keep=0.3, env=env)
    first = data_files(tmp_path)
    assert len(first) == 1 and len(data_files(tmp_path, "masked.onnx")) == 1
    assert os.path.getsize(tmp_path / "out.onnx") < 20000
    prune_ok(tmp_path, src, X, keep=0.6, env=env)
    second = data_files(tmp_path)
    assert len(second) == 1 and second != first  # the old data file went, after OUT was replaced
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    prune_ok(tmp_path, src, X, keep=0.6)  # back under the limit: one file, and the data file goes
    assert data_files(tmp_path) == []


# -- 2. hostile files ------------------------------------------------------------------------------

def test_random_bytes(tmp_path):
    for seed in range(3):
        junk = tmp_path / f"random{seed}.onnx"
        junk.write_bytes(np.random.default_rng(seed).bytes(4096))
        code, _, err = cli(junk, tmp_path / "out.onnx", "--keep", "0.5")
        assert_refused(code, err, 2, str(junk))
    assert not (tmp_path / "out.onnx").exists()


def _mutants(data: bytes, count: int, seed: int):
    """Byte flips, truncations at several points, and a flip of a large weight's data."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        buf = bytearray(data)
        if k % 3 == 2:
            yield f"truncated at {len(data) * (k + 1) // (count + 1)}", bytes(buf[: len(data) * (k + 1) // (count + 1)])
            continue
        positions = rng.integers(0, len(buf), size=int(rng.integers(1, 4)))
        for p in positions:
            buf[p] ^= 1 << int(rng.integers(8))
        yield f"bits flipped at {sorted(positions.tolist())}", bytes(buf)


def test_byte_flipped_and_truncated_models(tmp_path):
    """Each mutant is refused with one line (exit 2 or 4) or pruned under the contract; never a crash."""
    data = chain_model().SerializeToString()
    outcomes = []
    for k, (what, mutant) in enumerate(_mutants(data, 9, seed=3)):
        src = tmp_path / f"mutant{k}.onnx"
        src.write_bytes(mutant)
        out, masked, report = tmp_path / f"out{k}.onnx", tmp_path / f"masked{k}.onnx", tmp_path / f"r{k}.json"
        code, _, err = cli(src, out, "--keep", "0.5", "--emit-masked", masked, "--report", report, "-q")
        if code == 0:
            try:
                session(onnx.load(str(src)))
            except Exception:  # ONNX Runtime refuses the mutant itself: nothing to compare against
                onnx.checker.check_model(str(out), full_check=True)
            else:
                assert_contract(src, out, masked, report, X)
        else:
            assert_refused(code, err, code if code in (2, 4) else 2, src.name)
            assert not out.exists()
        outcomes.append((what, code))
    assert any(code != 0 for _, code in outcomes), outcomes


def _nested_if_bytes(depth: int) -> bytes:
    """A ModelProto whose graph has an If whose then-branch has an If... `depth` deep, written as raw
    protobuf (the Python protobuf library refuses to build it: that is the point)."""

    def field(number, payload: bytes) -> bytes:
        return _varint((number << 3) | 2) + _varint(len(payload)) + payload

    graph = field(1, field(3, b"leaf") + field(4, b"Identity") + field(1, b"c") + field(2, b"o"))
    for level in range(depth):
        attr = field(1, b"then_branch") + _varint((6 << 3) | 2) + _varint(len(graph)) + graph + _varint(20 << 3) + _varint(5)
        node = field(1, b"c") + field(2, f"o{level}".encode()) + field(4, b"If") + field(5, attr)
        graph = field(1, node)
    return _varint(1 << 3) + _varint(8) + field(8, field(1, b"") + _varint(2 << 3) + _varint(17)) + field(7, graph)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


@pytest.mark.parametrize("size", ["small", "large"])
def test_tensor_data_that_does_not_fit_its_dims(tmp_path, size):
    """onnx.checker lets a tensor with more data than its dims through; lean-onnx names it."""
    model = chain_model() if size == "small" else large_model()
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    w2.dims[0] -= 1
    src = tmp_path / "misfit.onnx"
    src.write_bytes(model.SerializeToString())
    code, _, err = cli(src, tmp_path / "out.onnx", "--keep", "0.5")
    assert_refused(code, err, 2, "misfit.onnx", "'w2'")


def test_protobuf_nesting_bomb(tmp_path):
    bomb = tmp_path / "bomb.onnx"
    bomb.write_bytes(_nested_if_bytes(20000))
    code, _, err = cli(bomb, tmp_path / "out.onnx", "--keep", "0.5")
    assert_refused(code, err, 2, "bomb.onnx", "nested")


def _external_model(folder, location):
    """The chain model with w2's data at `location` (not checked: that is what the test is about)."""
    model = chain_model()
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    w2.ClearField("raw_data")
    del w2.float_data[:]
    w2.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(8 * 8 * 9 * 4))):
        w2.external_data.add(key=key, value=value)
    return save(model, pathlib.Path(folder) / "model.onnx")


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused_unread(tmp_path, kind):
    """The target is a FIFO: opening it for reading would block, so a refusal proves it was not read."""
    secret = tmp_path / "secret"
    os.mkfifo(secret)
    folder = tmp_path / "models"
    folder.mkdir()
    location = {"parent": "../secret", "absolute": str(secret), "symlink": "weights.bin"}[kind]
    if kind == "symlink":
        os.symlink(secret, folder / "weights.bin")
    src = _external_model(folder, location)
    code, _, err = cli(src, tmp_path / "out.onnx", "--keep", "0.5", timeout=120)
    needle = {"parent": "outside the model's folder", "absolute": "absolute path", "symlink": "outside"}[kind]
    assert_refused(code, err, 2, str(src), "'w2'", needle)


def test_external_data_etc_passwd_is_refused(tmp_path):
    src = _external_model(tmp_path, "../../../../../../../../etc/passwd")
    code, _, err = cli(src, tmp_path / "out.onnx", "--keep", "0.5")
    assert_refused(code, err, 2, "outside the model's folder")


# -- 3. output safety ------------------------------------------------------------------------------

@pytest.fixture()
def chain_file(tmp_path):
    return save(chain_model(), tmp_path / "in.onnx")


@pytest.mark.parametrize("case", ["hardlink", "masked-is-input", "report-is-input", "out-is-masked",
                                  "input-data-file"])
def test_outputs_that_would_overwrite_an_input_or_each_other(tmp_path, chain_file, case):
    before = chain_file.read_bytes()
    args = [chain_file, tmp_path / "out.onnx", "--keep", "0.5"]
    if case == "hardlink":
        os.link(chain_file, tmp_path / "hard.onnx")
        args[1] = tmp_path / "hard.onnx"
    elif case == "masked-is-input":
        args += ["--emit-masked", chain_file]
    elif case == "report-is-input":
        args += ["--report", os.path.relpath(chain_file, ROOT)]
    elif case == "out-is-masked":
        args += ["--emit-masked", tmp_path / "out.onnx"]
    else:
        (tmp_path / "ext").mkdir()
        chain_file = tmp_path / "ext" / "m.onnx"
        onnx.save(chain_model(), str(chain_file), save_as_external_data=True, location="m.data", size_threshold=0)
        before = chain_file.read_bytes()
        args = [chain_file, tmp_path / "ext" / "m.data", "--keep", "0.5"]
    code, _, err = cli(*args)
    needle = "same file" if case == "out-is-masked" else ("external data file of the input" if case == "input-data-file"
                                                          else "input file")
    assert_refused(code, err, 2, needle)
    assert chain_file.read_bytes() == before and not (tmp_path / "out.onnx").exists()


def test_missing_output_folder(tmp_path, chain_file):
    code, _, err = cli(chain_file, tmp_path / "no" / "such" / "out.onnx", "--keep", "0.5")
    assert_refused(code, err, 2, "out.onnx", "does not exist")


def test_output_is_a_directory(tmp_path, chain_file):
    (tmp_path / "d.onnx").mkdir()
    code, _, err = cli(chain_file, tmp_path / "d.onnx", "--keep", "0.5")
    assert_refused(code, err, 2, "d.onnx", "directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod does not stop root from writing (see the /sys test below)")
def test_read_only_output_folder(tmp_path, chain_file):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, _, err = cli(chain_file, folder / "out.onnx", "--keep", "0.5")
    finally:
        folder.chmod(0o700)
    assert_refused(code, err, 2, "out.onnx", "not writable")


def test_folder_where_files_cannot_be_created(chain_file):
    """Root passes every permission check; sysfs refuses to create files even for root."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pytest.skip("files can be created in /sys here")
    except OSError:
        pass
    code, _, err = cli(chain_file, "/sys/lean_onnx_out.onnx", "--keep", "0.5")
    assert_refused(code, err, 2, "/sys/lean_onnx_out.onnx")


def test_unicode_and_spaces_in_paths(tmp_path):
    src = save(chain_model(), tmp_path / "my models" / "mödel ü 模型.onnx")
    folder = tmp_path / "out dir é"
    folder.mkdir()
    out, masked, report = folder / "prüned 模型.onnx", folder / "masked ß.onnx", folder / "rapport é.json"
    code, _, err = cli(src, out, "--keep", "0.5", "--emit-masked", masked, "--report", report)
    assert code == 0, err
    _, rep = assert_contract(src, out, masked, report, X)
    assert rep["output"]["path"] == str(out) and rep["input"]["path"] == str(src)


def test_failed_external_data_write_leaves_the_old_output(tmp_path, monkeypatch):
    """A write that fails after its data file was made (here: onnx.checker refuses it) leaves OUT and its
    data file as they were and no temporary file behind."""
    from lean_onnx.errors import LeanOnnxError
    from lean_onnx.io.save import save_model_atomic
    from lean_onnx.rewrite.pruner import prune

    monkeypatch.setenv("LEAN_ONNX_EXTERNAL_DATA_BYTES", "1000")
    out = tmp_path / "out.onnx"
    save_model_atomic(prune(large_model(), 0.5).model, str(out))
    before = (out.read_bytes(), data_files(tmp_path))
    assert len(before[1]) == 1
    second = prune(large_model(), 0.2).model

    def refuse(*args, **kwargs):
        raise onnx.checker.ValidationError("refused for the test")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    with pytest.raises(LeanOnnxError, match="fails onnx.checker"):
        save_model_atomic(second, str(out))
    assert (out.read_bytes(), data_files(tmp_path)) == before
    assert sorted(os.listdir(tmp_path)) == sorted(["out.onnx"] + before[1])


# -- 4. the fuzzer, as CI runs it --------------------------------------------------------------------

def test_fuzz_200_cases():
    """tools/fuzz.py on 200 cases (random CNNs, op mutations and mutated bytes, method and keep drawn per
    case): no crash, no invalid model, no contract violation (docs/robustness.md has the 2,000-case run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lean_onnx_fuzz", ROOT / "tools" / "fuzz.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    counts, by_kind = fuzz.fuzz(200, seed=600000, method=None)
    assert sum(counts[k] for k in fuzz.FAILURES) == 0, counts
    assert counts["pruned-and-equal"] > 100 and set(by_kind) == set(fuzz.MUTATIONS), (counts, by_kind)


def test_fuzz_case_with_a_concat_input_of_unknown_channels():
    """Fuzz seed 5144 (a com.microsoft Gelu and a conv whose weight does not fit its input): a channel Concat
    whose one input has no known channel count, read by one conv, crashed the per-consumer Concat plan with a
    KeyError (a traceback); the Concat is frozen and the case prunes with the contract holding."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lean_onnx_fuzz", ROOT / "tools" / "fuzz.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    counts, _ = fuzz.fuzz(1, seed=5144, method=None)
    assert sum(counts[k] for k in fuzz.FAILURES) == 0, counts
