"""The channel graph against the truth: real torchvision/paper models, exported by torch, run in ORT.

Graph truth: for sampled kernel edges (u -> v) of a layer, zeroing that one kernel in the ONNX weights
changes exactly the claimed output channel, and perturbing the channel where node u was created
changes the layer's claimed input channel (and only channels reachable from u in the channel graph).
"""

import zlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from lean_onnx.graph.build import build_channel_graph
from lean_onnx.graph.load import load_model
from lean_onnx.graph.summary import inspect_summary
from models.zoo import ZOO
from tests.helpers import run_ort, zoo_path

SAMPLES_PER_MODEL = 3


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            existing.add(name)
    return model


def set_initializer(model, name, value):
    for k, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[k].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return
    raise KeyError(name)


def perturb_channel(model, tensor, channel, channels, amount=1.0):
    """Insert `tensor + amount * onehot(channel)` and make every reader of `tensor` read that instead."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    new = tensor + "__perturbed"
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name == tensor:
                node.input[k] = new
    for out in model.graph.output:  # a probed tensor is observed after the perturbation
        if out.name == tensor:
            out.name = new
    onehot = np.zeros((1, channels, 1, 1), np.float32)
    onehot[0, channel] = amount
    model.graph.initializer.append(numpy_helper.from_array(onehot, new + "_c"))
    producer = next((k for k, n in enumerate(model.graph.node) if tensor in n.output), -1)
    model.graph.node.insert(producer + 1, helper.make_node("Add", [tensor, new + "_c"], [new]))
    return model


def channel_change(a, b):
    """Per-channel max |a - b| relative to max |a| (channel axis 1)."""
    diff = np.abs(a.astype(np.float64) - b).reshape(a.shape[0], a.shape[1], -1).max(axis=(0, 2))
    return diff / max(np.abs(a).max(), 1e-30)


def reachable_from(g, start):
    order = np.argsort(g.src, kind="stable")
    out_ptr = np.searchsorted(g.src[order], np.arange(g.num_nodes + 1))
    dst = g.dst[order]
    seen, stack = {start}, [start]
    while stack:
        u = stack.pop()
        for v in dst[out_ptr[u]:out_ptr[u + 1]].tolist():
            if v not in seen:
                seen.add(v)
                stack.append(v)
    return seen


def owner_of(g, node):
    """The first tensor (creation order) carrying `node`, and its channel index there."""
    for tensor, nodes in g.tensor_nodes.items():
        hit = np.flatnonzero(nodes == node)
        if hit.size:
            return tensor, int(hit[0])
    raise KeyError(node)


def sample_layers(g, name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    prunable = [layer for layer in g.layers if layer.prunable]
    special = [layer for layer in prunable if layer.op == "ConvTranspose" or layer.group > 1][:1]
    picks = list(rng.choice(len(prunable), size=min(SAMPLES_PER_MODEL, len(prunable)), replace=False))
    return list({id(layer): layer for layer in special + [prunable[k] for k in picks]}.values())


@pytest.mark.slow
@pytest.mark.parametrize("fold_bn", [False, True], ids=["bnkeep", "bnfold"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_graph_truth(name, fold_bn, zoo_cache):
    path = zoo_path(name, fold_bn, zoo_cache)
    loaded = load_model(path)
    g = build_channel_graph(loaded)
    summary = inspect_summary(g)
    assert summary["kernels"]["prunable"] > 0 and summary["params"] > 0 and summary["flops"]["macs"] > 0
    model = loaded.original
    x = np.random.default_rng(1).standard_normal(loaded.input_shapes["input"]).astype(np.float32)
    layers = sample_layers(g, name)
    probe = with_outputs(model, [t for layer in layers for t in (layer.input, layer.output)])
    base = dict(zip([o.name for o in probe.graph.output], run_ort(probe, {"input": x})))
    for layer in layers:
        weight = loaded.initializers[layer.weight_name]
        kernels = layer.kernels(weight)
        # the strongest kernel reading a live input channel, so its effect is far above rounding
        energy = np.abs(base[layer.input]).reshape(base[layer.input].shape[1], -1).max(axis=1) \
            if base[layer.input].ndim > 1 else np.ones(layer.c_in)
        in_group = (np.arange(layer.c_out) // (layer.c_out // layer.group))[:, None] * layer.c_in_g \
            + np.arange(layer.c_in_g)[None, :]
        score = np.abs(kernels).sum(axis=(2, 3)) * energy[in_group]
        j, i = np.unravel_index(np.argmax(score), score.shape)
        edge = layer.edge_start + j * layer.c_in_g + i
        assert g.dst[edge] == layer.out_nodes[j] and g.src[edge] == layer.in_nodes[in_group[j, i]]

        # (a) zero the kernel: exactly output channel j of the layer changes
        zeroed = kernels.copy()
        zeroed[j, i] = 0
        if layer.op == "ConvTranspose":
            gi, cog = j // (layer.c_out // layer.group), layer.c_out // layer.group
            new_weight = weight.copy()
            new_weight[gi * layer.c_in_g + i, j - gi * cog] = 0
        else:
            new_weight = zeroed.reshape(weight.shape)
        changed_model = with_outputs(onnx.ModelProto.FromString(model.SerializeToString()), [layer.output])
        set_initializer(changed_model, layer.weight_name, new_weight)
        out = dict(zip([o.name for o in changed_model.graph.output], run_ort(changed_model, {"input": x})))
        change = channel_change(base[layer.output], out[layer.output])
        assert np.flatnonzero(change > 1e-5).tolist() == [j], f"{layer.name}: kernel ({j},{i})"

        # (b) perturb where the source node was created: the claimed input channel changes
        u = int(g.src[edge])
        tensor, channel = owner_of(g, u)
        if tensor == "input":
            feed = x.copy()
            feed[:, channel] += 1.0
            out = dict(zip([o.name for o in probe.graph.output], run_ort(probe, {"input": feed})))
        else:
            shifted = perturb_channel(probe, tensor, channel, len(g.tensor_nodes[tensor]))
            names = [o.name.removesuffix("__perturbed") for o in shifted.graph.output]
            out = dict(zip(names, run_ort(shifted, {"input": x})))
        change = channel_change(base[layer.input], out[layer.input])
        claimed = int(in_group[j, i])
        assert change[claimed] > 1e-6, f"{layer.name}: input channel {claimed} does not depend on node {u} ({tensor})"
        reach = reachable_from(g, u)
        allowed = {c for c, n in enumerate(layer.in_nodes.tolist()) if n in reach}
        assert set(np.flatnonzero(change > 1e-6).tolist()) <= allowed, f"{layer.name}: undeclared dependency"


def add_groups(summary):
    return sorted(grp["channels"] for grp in summary["coupling_groups"] if grp["reasons"][0] == "Add operands")


@pytest.mark.slow
@pytest.mark.parametrize("fold_bn", [False, True], ids=["bnkeep", "bnfold"])
@pytest.mark.parametrize("name, widths", [
    ("resnet18", [64, 128, 256, 512]),
    ("resnet50", [256, 512, 1024, 2048]),
    ("mobilenet_v2", [24, 32, 64, 96, 160]),  # inverted-residual stages with more than one block
])
def test_residual_stages_are_coupling_groups(name, widths, fold_bn, zoo_cache):
    summary = inspect_summary(build_channel_graph(load_model(zoo_path(name, fold_bn, zoo_cache))))
    assert add_groups(summary) == widths


@pytest.mark.slow
def test_unet_concat_skips_and_transposed_convs(zoo_cache):
    g = build_channel_graph(load_model(zoo_path("unet4", True, zoo_cache)))
    ups = [layer for layer in g.layers if layer.op == "ConvTranspose"]
    assert len(ups) == 4 and all(layer.stride == (2, 2) for layer in ups)
    concats = [r for r in g.coupling if r.reason.startswith("Concat")]
    assert len(concats) == 4
    for rec in concats:  # [skip, up]: the up-conv's channels follow the encoder's
        skip, up, out = rec.tensors
        assert np.array_equal(g.tensor_nodes[out], np.concatenate([g.tensor_nodes[skip], g.tensor_nodes[up]]))


@pytest.mark.slow
def test_msd_is_dense(zoo_cache):
    g = build_channel_graph(load_model(zoo_path("msd", True, zoo_cache)))
    three = [layer for layer in g.layers if layer.kernel_shape == (3, 3)]
    assert len(three) == 50 and sum(layer.num_kernels for layer in three) == 1275
    assert [layer.dilation for layer in three[:11]] == [(d, d) for d in range(1, 11)] + [(1, 1)]
    final = g.layers[-1]
    assert final.c_in == 51 and final.c_out == 5
    # layer k reads the input and the outputs of every earlier layer (dense concatenation)
    outs = [int(layer.out_nodes[0]) for layer in three]
    for k, layer in enumerate(three):
        assert layer.in_nodes.tolist()[1:] == outs[:k]
    assert final.in_nodes.tolist()[1:] == outs


@pytest.mark.slow
def test_shufflenet_channel_shuffle_and_split(zoo_cache):
    g = build_channel_graph(load_model(zoo_path("shufflenet_v2_x0_5", True, zoo_cache)))
    summary = inspect_summary(g)
    assert sum(r.reason.startswith("channel shuffle") for r in g.coupling) == 16  # 3 + 7 + 3 blocks + 3 stage heads
    # chunk(2, dim=1) bounds come from Shape(): those channel counts are read at run time
    assert {f["reason"] for f in summary["frozen"]} == {"the channel count is read at run time",
                                                         "channel shuffle: its Reshape fixes the channel count"}
    assert summary["coverage"] == 1.0 and len(g.layers) == 56
