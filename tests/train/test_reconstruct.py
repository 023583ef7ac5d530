"""Label-free layer-wise reconstruction of a pruned model to its original (train/reconstruct.py, the default
start of `finetune --teacher`)."""

import numpy as np
import onnx
import pytest

from lean_onnx.errors import LeanOnnxError
from lean_onnx.rewrite.channel_map import read
from lean_onnx.rewrite.pruner import Pruner
from lean_onnx.train.calibrate import calibrate_to_teacher
from lean_onnx.train.reconstruct import reconstruct_to_teacher
from tests.helpers import bridge_tensors, without_kept_channel_record, zoo_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pruned(zoo_cache):
    pruner = Pruner(zoo_path("mobilenet_v2", True, zoo_cache))
    rng = np.random.default_rng(3)
    fit, held_out = (rng.standard_normal((n, 3, 64, 64)).astype(np.float32) for n in (16, 8))
    # 0.4: at 0.5 removing all ten residual branches meets the budget (0.508) and no kept layer is thinned
    return pruner, pruner.prune(target_macs=0.4), fit, held_out


def _ort(model, inputs):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: inputs[i:i + 1]})[0] for i in range(len(inputs))])


def _conv_node(group=1, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)):
    return onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, strides=list(strides),
                                 pads=list(pads), dilations=list(dilations))


@pytest.mark.parametrize("c_in, c_out, group, strides, pads, dilations", [
    (5, 3, 1, (1, 1), (1, 1, 1, 1), (1, 1)),
    (4, 6, 2, (2, 2), (0, 1, 1, 0), (1, 1)),  # grouped, strided, asymmetric padding
    (6, 6, 6, (1, 1), (2, 2, 2, 2), (2, 2)),  # depthwise, dilated
    (3, 6, 3, (2, 1), (1, 1, 1, 1), (1, 1)),  # depthwise with multiplier 2
])
def test_the_least_squares_solve_recovers_a_conv_from_its_outputs(c_in, c_out, group, strides, pads, dilations):
    """With (almost) no ridge, the normal equations give back the weight and bias that made the targets,
    for every layout of groups, strides, padding and dilation the conv can have."""
    import torch

    from lean_onnx.train.ops import OPS
    from lean_onnx.train.ops.context import NodeContext
    from lean_onnx.train.reconstruct import _solve

    ctx = NodeContext(_conv_node(group, strides, pads, dilations), 13)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, c_in, 9, 9, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c_in // group, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64)
    target = OPS["Conv"](ctx, x, weight, bias)
    start_w = weight + 0.5 * torch.randn(weight.shape, generator=gen, dtype=torch.float64)
    start_b = bias + 0.5
    new_w, new_b = _solve(ctx, x, start_w, start_b, target, ridge=1e-12)
    np.testing.assert_allclose(new_w.numpy(), weight.numpy(), atol=1e-4)  # the ridge's floor: 1e-6 per row
    np.testing.assert_allclose(new_b.numpy(), bias.numpy(), atol=1e-4)
    # the ridge pulls towards the starting weights: a large one barely moves them
    held, _ = _solve(ctx, x, weight + 1, bias, target, ridge=1e6)
    assert np.abs(held.numpy() - (weight + 1).numpy()).max() < 1e-3


def test_pruned_kernels_and_dead_channels_stay_as_they_are():
    """A kernel that is exactly zero stays zero (the output is fitted on its live kernels alone, as well as
    they allow: the same least squares as a conv that never had the others), and a dead channel (zero kernels
    and bias) stays dead."""
    import torch

    from lean_onnx.train.ops import OPS
    from lean_onnx.train.ops.context import NodeContext
    from lean_onnx.train.reconstruct import _solve

    ctx = NodeContext(_conv_node(1, (1, 1), (1, 1, 1, 1), (1, 1)), 13)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, 9, 9, generator=gen, dtype=torch.float64)
    truth = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    target = OPS["Conv"](ctx, x, truth, bias)
    start = truth + 0.3 * torch.randn(truth.shape, generator=gen, dtype=torch.float64)
    start_b = bias.clone()
    start[0, 1] = 0.0  # a pruned kernel
    start[1, 2:] = 0.0  # two of them
    start[2], start_b[2] = 0.0, 0.0  # a dead channel
    new_w, new_b = _solve(ctx, x, start, start_b, target, ridge=1e-12)
    assert (new_w[0, 1] == 0).all() and (new_w[1, 2:] == 0).all() and (new_w[2] == 0).all() and new_b[2] == 0
    np.testing.assert_allclose(new_w[4].numpy(), truth[4].numpy(), atol=1e-4)  # all live: recovered
    for o, inputs in ((0, [0, 2, 3]), (1, [0, 1])):  # the restricted least squares, solved directly
        only = OPS["Conv"](ctx, x[:, inputs], new_w[o:o + 1, inputs], new_b[o:o + 1])
        residual = ((only - target[:, o:o + 1]) ** 2).mean()
        moved = new_w[o:o + 1, inputs] + 1e-3 * torch.randn((1, len(inputs), 3, 3), generator=gen,
                                                             dtype=torch.float64)
        worse = ((OPS["Conv"](ctx, x[:, inputs], moved, new_b[o:o + 1]) - target[:, o:o + 1]) ** 2).mean()
        assert residual < worse  # a small move off the solution only fits worse
        start_res = ((OPS["Conv"](ctx, x, start[o:o + 1], start_b[o:o + 1]) - target[:, o:o + 1]) ** 2).mean()
        assert residual < start_res


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A conv chain whose output depends on its input (He-initialised 3x3 and depthwise convs with ReLU, no
    normalisation; random zoo weights give outputs that barely do): (teacher path, fitting and held-out
    inputs)."""
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 24, 3, padding=1), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Conv2d(24, 4, 1)).eval()
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight)
                layer.bias.normal_(0, 0.1)
    path = str(tmp_path_factory.mktemp("deep") / "deep.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), path, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    rng = np.random.default_rng(0)
    return path, *(rng.standard_normal((n, 3, 16, 16)).astype(np.float32) for n in (16, 8))


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_reconstruction_brings_new_inputs_closer_to_the_original_than_calibration(deep, target):
    """On inputs it did not see, the reconstructed model's output is closer to the original's than the
    statistics-calibrated one's, which is closer than the pruned one's (measured: 0.29 / 0.36 / 0.67 mean
    relative error at 0.5 of the MACs, 0.42 / 0.55 / 0.75 at 0.3)."""
    from lean_onnx import prune

    path, fit, held_out = deep
    teacher = onnx.load(path)
    pruned = prune(path, target_macs=target, round_channels=1).model
    reconstructed, info = reconstruct_to_teacher(pruned, teacher, fit)
    calibrated, _ = calibrate_to_teacher(pruned, teacher, fit)
    reference = _ort(teacher, held_out)
    error = {name: np.abs(_ort(model, held_out) - reference).mean() / np.abs(reference).mean()
             for name, model in (("pruned", pruned), ("calibrated", calibrated), ("reconstructed", reconstructed))}
    assert error["reconstructed"] < 0.9 * error["calibrated"] and error["calibrated"] < 0.9 * error["pruned"], error
    assert info["convs"] == 8 and info["left"] == 0 and info["samples"] == len(fit)
    assert info["error_after_median"] < info["error_before_median"]


def test_every_conv_and_the_classifier_gemm_are_refit(pruned):
    pruner, result, fit, _ = pruned
    _, info = reconstruct_to_teacher(result.model, pruner.loaded.original, fit)
    ops = [n.op_type for n in result.model.graph.node]
    assert "Gemm" in ops and info["convs"] == ops.count("Conv") + ops.count("Gemm") and info["left"] == 0


def test_each_refit_conv_fits_the_teachers_channels_at_least_as_well(pruned):
    """Conv by conv, on the fitting inputs: the refit output at the kept channels is at least as close to the
    original's as the pruned model's, and a conv whose inputs are all kept (the first one) keeps its weights."""
    pruner, result, fit, _ = pruned
    reconstructed, _ = reconstruct_to_teacher(result.model, pruner.loaded.original, fit)
    record = read(result.model)
    convs = [n.output[0] for n in result.model.graph.node if n.op_type == "Conv"]
    teacher = bridge_tensors(pruner.loaded.original, fit, set(convs))
    assert set(teacher) == set(convs)  # the original computes every conv output of the pruned model
    ours = bridge_tensors(reconstructed, fit, set(convs))
    theirs = bridge_tensors(result.model, fit, set(convs))
    first = convs[0]
    kept = record[first][1] if first in record else slice(None)
    scale = np.abs(theirs[first].numpy()).max()
    assert np.abs(ours[first].numpy() - theirs[first].numpy()).max() < 1e-3 * scale
    assert np.abs(ours[first].numpy() - teacher[first].numpy()[:, kept]).max() < 1e-3 * scale
    last = convs[-1]
    kept = record[last][1] if last in record else slice(None)
    target = teacher[last].numpy()[:, kept]
    assert ((ours[last].numpy() - target) ** 2).mean() < ((theirs[last].numpy() - target) ** 2).mean()


def test_the_model_keeps_its_shapes_record_and_teacher(pruned):
    """Values change, never the structure: same initializer shapes and nodes, the kept-channel record kept,
    onnx.checker passes and ONNX Runtime runs it; the teacher is not modified."""
    pruner, result, fit, _ = pruned
    before = pruner.loaded.original.SerializeToString()
    reconstructed, _ = reconstruct_to_teacher(result.model, pruner.loaded.original, fit)
    assert pruner.loaded.original.SerializeToString() == before
    shapes = lambda m: {t.name: tuple(t.dims) for t in m.graph.initializer}  # noqa: E731
    assert shapes(reconstructed) == shapes(result.model)
    assert [n.op_type for n in reconstructed.graph.node] == [n.op_type for n in result.model.graph.node]
    assert read(reconstructed).keys() == read(result.model).keys()
    onnx.checker.check_model(reconstructed, full_check=True)
    assert np.isfinite(_ort(reconstructed, fit[:2])).all()
    changed = [t.name for t, u in zip(reconstructed.graph.initializer, result.model.graph.initializer)
               if t.raw_data != u.raw_data]
    assert len(changed) > 10


def test_reconstruction_needs_the_record_the_right_teacher_and_two_inputs(pruned):
    pruner, result, fit, _ = pruned
    bare = without_kept_channel_record(result.model)
    with pytest.raises(LeanOnnxError, match="p.onnx: no lean-onnx kept-channel record"):
        reconstruct_to_teacher(bare, pruner.loaded.original, fit, path="p.onnx")
    with pytest.raises(LeanOnnxError, match="t.onnx: .*not the model it was pruned from"):
        reconstruct_to_teacher(result.model, result.model, fit, path="p.onnx", teacher_path="t.onnx")
    with pytest.raises(LeanOnnxError, match="at least 2 inputs"):
        reconstruct_to_teacher(result.model, pruner.loaded.original, fit[:1])


@pytest.mark.parametrize("how", [{"target_macs": 0.4}, {"keep": 0.3}, {"keep": 0.3, "fold_constants": True}])
def test_reconstruction_at_prune_time_keeps_pruned_equal_to_masked(deep, how):
    """`--calibrate-data` with the default `--calibrate-method reconstruct`: the refit values go back into the
    original's layout and both models are rewritten from them, so the pruned model equals the masked one (also
    with kernels pruned inside kept channels, which stay zero, and with dead channels that keep a constant);
    the input is not modified; on held-out inputs the result is closer to the original than the pruned one."""
    from lean_onnx.rewrite.contract import check_contract
    from lean_onnx.train.reconstruct import reconstruct

    path, fit, held_out = deep
    pruner = Pruner(path)
    before = pruner.loaded.original.SerializeToString()
    options = {k: v for k, v in how.items() if k != "keep"}
    result = pruner.prune(how.get("keep"), round_channels=1, **options)
    rebuilt, info = reconstruct(pruner, result, fit)
    errors = check_contract(pruner.loaded.original, rebuilt, pruner.loaded.input_shapes, np.random.default_rng(0))
    assert errors["max_rel_err_vs_masked"] < 1e-4 and pruner.loaded.original.SerializeToString() == before
    assert rebuilt.report["calibration"] is info and info["convs"] > 0 and info["shared_left"] == 0
    reference = _ort(pruner.loaded.original, held_out)
    error = [np.abs(_ort(m, held_out) - reference).mean() for m in (result.model, rebuilt.model)]
    assert error[1] < 0.9 * error[0], error
    zero = lambda m: sum(int((onnx.numpy_helper.to_array(t).reshape(*t.dims[:2], -1) == 0).all(-1).sum())  # noqa
                         for t in m.graph.initializer if len(t.dims) == 4)
    assert zero(rebuilt.model) == zero(result.model)  # pruned kernels inside kept channels stay zero


def test_the_contract_holds_with_dead_channels_that_keep_a_constant(pruned):
    """MobileNetV2 (BN folded) at --keep 0.1 with --fold-constants keeps dozens of dead channels whose constant
    the masked model keeps too: every refit value is written where the masked model reads it, so the
    contract holds."""
    from lean_onnx.rewrite.contract import check_contract
    from lean_onnx.train.reconstruct import reconstruct

    pruner, _, fit, _ = pruned
    result = pruner.prune(0.1, round_channels=1, fold_constants=True)
    dead = sum(int(result.plan.dead[layer.out_nodes[np.flatnonzero(result.plan.keep(layer.output))]].sum())
               for layer in result.graph.layers if layer.prunable and result.plan.keep(layer.output) is not None)
    assert dead > 10
    rebuilt, _ = reconstruct(pruner, result, fit)
    errors = check_contract(pruner.loaded.original, rebuilt, pruner.loaded.input_shapes, np.random.default_rng(0))
    assert errors["max_rel_err_vs_masked"] < 1e-4
