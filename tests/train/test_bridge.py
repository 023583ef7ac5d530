"""ONNX -> torch bridge: ONNX Runtime is the oracle for every op; export writes back into the template."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from lean_onnx.errors import LeanOnnxError  # noqa: E402
from lean_onnx.rewrite.contract import max_rel_error  # noqa: E402
from lean_onnx.train.bridge import apply_masks, export_onnx, to_torch, zero_kernel_masks  # noqa: E402
from tests.helpers import _as_init, rand, run_ort, zoo_path  # noqa: E402

RTOL = 1e-5


def text_model(graph_text: str, inits: dict | None = None, opset: int = 17) -> onnx.ModelProto:
    """Like helpers.text_model, but outputs written `float y` get an unknown shape, not rank 0."""
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n{graph_text}')
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    inits = inits or {}
    kept = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    for name, value in inits.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(_as_init(value), name))
    model = onnx.shape_inference.infer_shapes(model)  # fills in the output shapes
    onnx.checker.check_model(model, full_check=True)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def torch_outputs(module, *inputs) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(x) for x in inputs))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def assert_matches_ort(model: onnx.ModelProto, *inputs: np.ndarray) -> None:
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    reference = run_ort(model, dict(zip(names, inputs)))
    got = torch_outputs(to_torch(model), *inputs)
    assert [g.shape for g in got] == [r.shape for r in reference]
    assert max_rel_error(reference, got) <= RTOL


# --------------------------------------------------------------------------------- zoo round trips
@pytest.mark.parametrize("fold_bn", [True, False], ids=["bnfold", "bnkeep"])
@pytest.mark.parametrize("name", ["msd", "unet4", "resnet18", "mobilenet_v2"])
def test_zoo_model_matches_onnxruntime_and_exports_unchanged(name, fold_bn, zoo_cache):
    model = onnx.load(zoo_path(name, fold_bn, zoo_cache))
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    module = to_torch(model)
    reference = run_ort(model, {"input": x})
    assert max_rel_error(reference, torch_outputs(module, x)) <= RTOL
    exported = export_onnx(module, model)
    onnx.checker.check_model(exported, full_check=True)
    assert all(np.array_equal(a, b) for a, b in zip(reference, run_ort(exported, {"input": x})))


@pytest.mark.parametrize("name,fold_bn", [("msd", True), ("unet4", False)])
def test_trained_model_keeps_the_interface(name, fold_bn, zoo_cache):
    model = onnx.load(zoo_path(name, fold_bn, zoo_cache))
    module = to_torch(model)
    x = torch.from_numpy(rand(2, 1, 32, 32))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    module(x).square().mean().backward()
    optimizer.step()
    exported = export_onnx(module, model)
    onnx.checker.check_model(exported, full_check=True)
    assert exported.ir_version == model.ir_version and exported.opset_import == model.opset_import
    assert [i.name for i in exported.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in exported.graph.output] == [o.name for o in model.graph.output]
    x1 = rand(1, 1, 32, 32)
    got = run_ort(exported, {"input": x1})
    assert max_rel_error(got, torch_outputs(module, x1)) <= RTOL
    assert not np.allclose(got[0], run_ort(model, {"input": x1})[0])


def test_shared_exporter_biases_become_separate_parameters(zoo_cache):
    """MS-D's 50 zero biases share one initializer through Identity nodes; training un-shares them."""
    model = onnx.load(zoo_path("msd", True, zoo_cache))
    module = to_torch(model)
    biases = [k for k in module.onnx_name if module.onnx_name[k].endswith("conv.bias")]
    assert len(biases) == 50
    assert sum(p.numel() for p in module.parameters()) == 11785
    with torch.no_grad():
        getattr(module, biases[-1]).fill_(0.25)
    exported = export_onnx(module, model)
    identities = sum(n.op_type == "Identity" for n in exported.graph.node)
    assert identities == sum(n.op_type == "Identity" for n in model.graph.node) - 1
    x = rand(1, 1, 32, 32)
    assert max_rel_error(run_ort(exported, {"input": x}), torch_outputs(module, x)) <= RTOL


# ------------------------------------------------------------------------------------- single ops
CONV_CASES = {
    "same_upper_stride2": ("Conv <auto_pad = \"SAME_UPPER\", strides = [2, 2]>", (4, 3, 3, 3), (1, 3, 9, 9)),
    "same_lower": ("Conv <auto_pad = \"SAME_LOWER\", strides = [2, 2]>", (4, 3, 2, 2), (1, 3, 8, 8)),
    "valid": ("Conv <auto_pad = \"VALID\">", (4, 3, 3, 3), (1, 3, 7, 7)),
    "asymmetric_pads": ("Conv <pads = [0, 1, 2, 1], dilations = [2, 1]>", (4, 3, 3, 3), (1, 3, 9, 8)),
    "grouped": ("Conv <group = 3, pads = [1, 1, 1, 1]>", (6, 1, 3, 3), (1, 3, 6, 6)),
    # narrow outputs: computed taps first (torch_ops.conv_taps_first)
    "taps_one_output": ("Conv <pads = [0, 1, 2, 1], dilations = [2, 1]>", (1, 3, 3, 3), (2, 3, 9, 8)),
    "taps_dilated_valid": ("Conv <dilations = [3, 3]>", (1, 5, 3, 3), (2, 5, 12, 11)),
    "taps_same_upper_3x2": ("Conv <auto_pad = \"SAME_UPPER\">", (2, 30, 3, 2), (1, 30, 7, 6)),
    "conv1d": ("Conv <pads = [2, 0], strides = [2]>", (4, 3, 3), (2, 3, 11)),
    "transpose_out_pad": ("ConvTranspose <strides = [2, 2], pads = [1, 1, 1, 1], output_padding = [1, 1]>",
                          (3, 4, 3, 3), (1, 3, 5, 5)),
    "transpose_asym_group": ("ConvTranspose <strides = [2, 2], pads = [0, 1, 1, 0], group = 3>",
                             (3, 2, 2, 2), (1, 3, 4, 4)),
    "transpose_output_shape": ("ConvTranspose <strides = [2, 2], output_shape = [9, 10]>", (3, 2, 3, 3),
                               (1, 3, 4, 4)),
    "transpose_same_upper": ("ConvTranspose <strides = [2, 2], auto_pad = \"SAME_UPPER\">", (3, 2, 3, 3),
                             (1, 3, 4, 5)),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_variants(case):
    op, w_shape, x_shape = CONV_CASES[case]
    model = text_model(f"g (float{list(x_shape)} x) => (float y) {{ y = {op} (x, w, b) }}",
                       {"w": rand(*w_shape), "b": rand(w_shape[1] * (3 if "group = 3" in op else 1)
                                                       if "Transpose" in op else w_shape[0])})
    assert_matches_ort(model, rand(*x_shape))


@pytest.mark.parametrize("c_out,c_in,pads,dil", [(1, 1, [0, 0, 0, 0], [1, 1]), (1, 7, [2, 0, 1, 3], [2, 3]),
                                                 (3, 40, [1, 1, 1, 1], [1, 1])])
def test_taps_first_conv_equals_conv2d_with_gradients(c_out, c_in, pads, dil):
    from lean_onnx.train.ops import conv_taps_first
    from lean_onnx.train.ops.conv import _taps_first_pays

    torch.manual_seed(0)
    w, b = torch.randn(c_out, c_in, 3, 3, requires_grad=True), torch.randn(c_out, requires_grad=True)
    x = torch.randn(2, c_in, 10, 9, requires_grad=True)
    assert _taps_first_pays(w)
    results = []
    for taps in (False, True):
        zero_pad = [pads[1], pads[3], pads[0], pads[2]]
        y = (conv_taps_first(x, w, b, dil, lambda t: torch.nn.functional.pad(t, zero_pad)) if taps
             else torch.nn.functional.conv2d(torch.nn.functional.pad(x, zero_pad), w, b, dilation=dil))
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), (x, w, b))
        results.append((y.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for g_taps, g_ref in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g_taps, g_ref, rtol=1e-4, atol=1e-5)


def test_taps_window_sum_gives_autograds_bits_forward_and_backward():
    """The custom backward of the shifted-window sum is a speed-up only: the same bits as autograd's."""
    from lean_onnx.train.ops.conv import _WindowSum

    torch.manual_seed(1)
    for kh, kw, dil in ((3, 3, (2, 3)), (1, 2, (1, 4)), (1, 1, (1, 1))):
        taps = torch.randn(2, 3, kh * kw, 14, 13, requires_grad=True)
        out_h, out_w = 14 - dil[0] * (kh - 1), 13 - dil[1] * (kw - 1)
        windows = [(slice(i * dil[0], i * dil[0] + out_h), slice(j * dil[1], j * dil[1] + out_w))
                   for i in range(kh) for j in range(kw)]
        plain = taps[:, :, 0, windows[0][0], windows[0][1]]
        for t in range(1, len(windows)):
            plain = plain + taps[:, :, t, windows[t][0], windows[t][1]]
        mine = _WindowSum.apply(taps, windows)
        assert torch.equal(mine, plain)
        weight = torch.randn_like(plain)
        (g_plain,) = torch.autograd.grad((plain * weight).sum(), taps)
        (g_mine,) = torch.autograd.grad((mine * weight).sum(), taps)
        assert torch.equal(g_mine, g_plain)


UNARY_CASES = [
    "MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]>",
    "MaxPool <kernel_shape = [2, 2], strides = [2, 2], pads = [0, 0, 1, 1], ceil_mode = 1>",
    "MaxPool <kernel_shape = [3, 3], strides = [2, 2], ceil_mode = 1, dilations = [1, 2]>",
    "AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]>",
    "AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1], count_include_pad = 1>",
    "AveragePool <kernel_shape = [3, 2], strides = [2, 1], pads = [0, 1, 1, 0]>",
    "AveragePool <kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1>",
    "GlobalAveragePool", "GlobalMaxPool", "Relu", "Sigmoid", "Tanh", "HardSwish", "Softplus", "Elu", "Selu",
    "LeakyRelu <alpha = 0.2>", "HardSigmoid <alpha = 0.3, beta = 0.4>", "Softmax <axis = 1>",
    "LogSoftmax <axis = -1>", "Flatten <axis = 2>", "Transpose <perm = [0, 2, 3, 1]>", "Identity",
    "Dropout", "Mish", "Erf", "Abs", "Neg", "Exp", "Gelu",
]
#: ops whose attributes changed: (op, opset)
OLD_OPSET_CASES = [
    ("ReduceMean <axes = [2, 3], keepdims = 0>", 17),
    ("Upsample <mode = \"nearest\", scales = [1.0, 1.0, 2.0, 3.0]>", 8),
    ("Softmax <axis = 2>", 11),
    ("Clip <min = -0.5, max = 0.2>", 6),
]


@pytest.mark.parametrize("op,opset", [(op, 20) for op in UNARY_CASES] + OLD_OPSET_CASES)
def test_unary_ops(op, opset):
    model = text_model(f"g (float[2, 3, 7, 6] x) => (float y) {{ y = {op} (x) }}", opset=opset)
    assert_matches_ort(model, rand(2, 3, 7, 6))


SLICES = {name: np.array([v], np.int64) for name, v in (("z", 0), ("two", 2), ("m1", -1), ("m2", -2), ("a2", 2),
                                                       ("a3", 3), ("big", 2 ** 62), ("mbig", -2 ** 62))}
GRAPH_CASES = {
    "pad_reflect": ("y = Pad <mode = \"reflect\"> (x, p)", {"p": np.array([0, 0, 2, 1, 0, 0, 1, 2], np.int64)}),
    "pad_edge": ("y = Pad <mode = \"edge\"> (x, p)", {"p": np.array([0, 0, 2, 1, 0, 0, 1, 3], np.int64)}),
    "pad_constant": ("y = Pad (x, p, v)", {"p": np.array([0, 1, 2, 1, 0, 0, 1, -1], np.int64),
                                           "v": np.array(1.5, np.float32)}),
    "slice_flip": ("y = Slice (x, s, e, a, t)", {"s": np.array([-1, 4], np.int64), "e": np.array([-9, 0], np.int64),
                                                 "a": np.array([3, 2], np.int64), "t": np.array([-1, -2], np.int64)}),
    "slice_step": ("y = Slice (x, s, e, a, t)", {"s": np.array([1], np.int64), "e": np.array([100], np.int64),
                                                 "a": np.array([-1], np.int64), "t": np.array([2], np.int64)}),
    # Concat of slices of one tensor: SliceConcat (symmetric padding as MS-D exports it; a rotation;
    # slices on two axes, which run unfused; a Slice opset-9 style is covered by the zoo's MS-D at 17)
    "concat_symmetric": ("l = Slice (x, z, two, a3)\n lf = Slice (l, m1, mbig, a3, m1)\n"
                         " r = Slice (x, m2, big, a3)\n rf = Slice (r, m1, mbig, a3, m1)\n"
                         " y = Concat <axis = -1> (lf, x, rf)", SLICES),
    "concat_rotate": ("a = Slice (x, two, big, a2)\n b = Slice (x, z, two, a2)\n y = Concat <axis = 2> (a, b, b)",
                      SLICES),
    "concat_two_axes": ("l = Slice (x, zz, twotwo, a23)\n y = Concat <axis = 3> (x, l)",
                        {**SLICES, "zz": np.array([0, 0], np.int64), "twotwo": np.array([2 ** 62, 2], np.int64),
                         "a23": np.array([2, 3], np.int64)}),
    "split": ("a, b = Split <axis = 1> (x, s)\n y = Sub (b, a)", {"s": np.array([1, 2], np.int64)}),
    "split_even": ("a, b, c = Split <axis = 1, num_outputs = 3> (x)\n y = Concat <axis = 1> (c, a, b)", {}),
    "resize_linear_sizes": ("y = Resize <mode = \"linear\"> (x, , , s)", {"s": np.array([2, 3, 11, 15], np.int64)}),
    "resize_linear_align": ("y = Resize <mode = \"linear\", coordinate_transformation_mode = \"align_corners\"> "
                            "(x, , r)", {"r": np.array([1, 1, 2, 0.5], np.float32)}),
    "resize_nearest_half": ("y = Resize <mode = \"nearest\", coordinate_transformation_mode = \"pytorch_half_pixel\","
                            " nearest_mode = \"round_prefer_ceil\"> (x, , r)",
                            {"r": np.array([1, 1, 1.5, 3], np.float32)}),
    "resize_nearest_asym": ("y = Resize <mode = \"nearest\", coordinate_transformation_mode = \"asymmetric\","
                            " nearest_mode = \"floor\"> (x, , r)", {"r": np.array([1, 1, 2, 2], np.float32)}),
    "shape_arith": ("s = Shape (x)\n i = Gather (s, k)\n d = Div (i, two)\n u = Unsqueeze (d, z)\n"
                    " c = Concat <axis = 0> (u, m)\n y = Reshape (x, c)",
                    {"k": np.array(0, np.int64), "two": np.array(2, np.int64), "z": np.array([0], np.int64),
                     "m": np.array([-1], np.int64)}),
    "squeeze_cast": ("r = ReduceMean <keepdims = 1> (x, o)\n q = Squeeze (r, o)\n d = Cast <to = 11> (q)\n"
                     " y = Cast <to = 1> (d)",
                     {"o": np.array([1], np.int64)}),
    "gemm_head": ("g = GlobalAveragePool (x)\n f = Flatten (g)\n y = Gemm <transB = 1, alpha = 0.5> (f, w, b)",
                  {"w": rand(4, 3), "b": rand(4)}),
    "matmul_softmax": ("m = MatMul (x, w)\n y = Softmax (m)", {"w": rand(6, 5)}),
    "arith": ("a = Add (x, c)\n m = Mul (a, x)\n d = Div (m, c)\n s = Sub (d, x)\n y = Clip (s, lo, hi)",
              {"c": rand(1, 3, 1, 1) + 3, "lo": np.array(-0.5, np.float32), "hi": np.array(0.5, np.float32)}),
    "prelu_bn": ("n = BatchNormalization <epsilon = 0.01> (x, s, b, mu, var)\n y = PRelu (n, p)",
                 {"s": rand(3), "b": rand(3), "mu": rand(3), "var": np.abs(rand(3)) + 0.5, "p": rand(3, 1, 1)}),
}


@pytest.mark.parametrize("case", sorted(GRAPH_CASES))
def test_graph_ops(case):
    body, inits = GRAPH_CASES[case]
    model = text_model(f"g (float[2, 3, 7, 6] x) => (float y) {{ {body} }}", inits, opset=18)
    assert_matches_ort(model, rand(2, 3, 7, 6))


@pytest.mark.parametrize("case", ["concat_symmetric", "concat_rotate", "concat_two_axes"])
def test_slice_concat_gradient_is_autograds(case):
    """SliceConcat's written-out backward against plain autograd through the Slice and Concat nodes:
    bit-identical for padding (each element appears at most twice), equal up to rounding otherwise."""
    from lean_onnx.train.ops import SliceConcat

    body, inits = GRAPH_CASES[case]
    model = text_model(f"g (float[2, 3, 7, 6] x) => (float y) {{ {body} }}", inits, opset=18)
    mine = to_torch(model)
    assert sum(isinstance(ctx, SliceConcat) for ctx, _, _ in mine._nodes) == 1
    assert not any(ctx.op_type in ("Slice", "Constant") for ctx, _, _ in mine._nodes)
    plain = to_torch(model, fuse_slices=False)
    x = torch.from_numpy(rand(2, 3, 7, 6))
    results = []
    for module in (mine, plain):
        xg = x.clone().requires_grad_()
        y = module(xg)
        (grad,) = torch.autograd.grad((y * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum(), xg)
        results.append((y, grad))
    assert torch.equal(results[0][0], results[1][0])
    if case == "concat_symmetric":
        assert torch.equal(results[0][1], results[1][1])
    else:
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)


def test_msd_padding_is_fused_with_autograds_bits(zoo_cache):
    """The zoo's MS-D: every layer's symmetric padding (per axis, a Concat of x and 2 chains of 2 Slices)
    becomes 2 SliceConcats, and a training step's parameter gradients keep autograd's bits."""
    from lean_onnx.train.ops import SliceConcat

    model = onnx.load(zoo_path("msd", False, zoo_cache))
    mine = to_torch(model)
    slices = sum(n.op_type == "Slice" for n in model.graph.node)
    assert slices > 0 and not any(ctx.op_type == "Slice" for ctx, _, _ in mine._nodes)
    assert sum(isinstance(ctx, SliceConcat) for ctx, _, _ in mine._nodes) == slices // 4
    plain = to_torch(model, fuse_slices=False)
    x = torch.from_numpy(rand(2, 1, 24, 24))
    for module in (mine, plain):
        module.train()
        module(x).square().mean().backward()
    for key, parameter in plain.named_parameters():
        assert torch.equal(getattr(mine, key).grad, parameter.grad), key


def test_constant_node_weights_are_parameters_and_written_back():
    model = text_model("g (float[1, 2, 5, 5] x) => (float y) { y = Conv <pads = [1, 1, 1, 1]> (x, w) }",
                       {"w": rand(3, 2, 3, 3)})
    weight = model.graph.initializer.pop()
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["w"], value=weight))
    module = to_torch(model)
    assert [module.onnx_name[k] for k, _ in module.named_parameters()] == ["w"]
    with torch.no_grad():
        module.w.mul_(2)
    exported = export_onnx(module, model)
    assert [n.op_type for n in exported.graph.node] == ["Constant", "Conv"] and not exported.graph.initializer
    x = rand(1, 2, 5, 5)
    assert max_rel_error(run_ort(exported, {"x": x}), torch_outputs(module, x)) <= RTOL


def test_unknown_op_names_node_and_op():
    model = text_model("g (float[1, 4, 2, 2] x) => (float y) { y = DepthToSpace <blocksize = 2> (x) }")
    model.graph.node[0].name = "d2s_7"
    with pytest.raises(LeanOnnxError, match=r"d2s_7.*DepthToSpace"):
        to_torch(model)


def test_masks_keep_zero_kernels_and_dead_channels():
    w = rand(4, 3, 3, 3)
    w[0, 1] = 0
    w[2] = 0  # output channel 2 is dead: no kernel, zero bias
    b = rand(4)
    b[2] = 0
    model = text_model("g (float[1, 3, 6, 6] x) => (float y) { y = Conv (x, w, b) }", {"w": w, "b": b})
    module = to_torch(model)
    masks = zero_kernel_masks(module)
    assert masks["w"].shape == (4, 3, 1, 1) and int(masks["w"].sum()) == 12 - 1 - 3
    assert masks["b"].tolist() == [1, 1, 0, 1]
    with torch.no_grad():
        module.w.add_(1.0)
        module.b.add_(1.0)
    apply_masks(module, masks)
    assert torch.all(module.w[0, 1] == 0) and torch.all(module.w[2] == 0) and module.b[2] == 0
    assert torch.all(module.w[1] != 0)


def test_grouped_transpose_dead_output_channel():
    w = rand(4, 2, 2, 2)  # ConvTranspose, group 2: inputs 0-1 -> outputs 0-1, inputs 2-3 -> outputs 2-3
    w[2:, 1] = 0
    model = text_model("g (float[1, 4, 3, 3] x) => (float y) { y = ConvTranspose <group = 2> (x, w, b) }",
                       {"w": w, "b": np.array([1, 0, 1, 0], np.float32)})
    masks = zero_kernel_masks(to_torch(model))
    assert masks["b"].tolist() == [1, 1, 1, 0]
