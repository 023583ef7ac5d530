"""The kept-channel record a pruned model carries in its metadata (rewrite/channel_map.py)."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lean_onnx.rewrite.channel_map import METADATA_KEY, read, record
from lean_onnx.rewrite.pruner import Pruner
from tests.helpers import bridge_tensors, zoo_path


def _tensors(model, inputs):
    return {name: value.numpy() for name, value in bridge_tensors(model, inputs).items()}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_record_maps_each_pruned_channel_to_the_masked_models_channel(zoo_cache, name):
    """Channel j of a recorded tensor in the pruned model is channel kept[j] of the same tensor in the masked
    model (same shapes as the original): pruned == masked, tensor by tensor, through the record. ResNet-18 with
    its BatchNormalization unfolded records the BN outputs too."""
    pruner = Pruner(zoo_path(name, name == "mobilenet_v2", zoo_cache))
    result = pruner.prune(target_macs=0.3)  # branches removed whole and, in what stays, narrowed channels
    kept = read(result.model)
    assert kept is not None
    inputs = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    pruned, masked = _tensors(result.model, inputs), _tensors(result.masked, inputs)
    layers = [layer for layer in pruner.graph.layers if layer.prunable]
    written = {n.output[0] for n in result.model.graph.node if n.op_type == "Conv"}
    assert result.report["residual_sums_bypassed"]  # residual branches removed whole: their convs are gone
    assert {layer.output for layer in layers} & written == {layer.output for layer in layers} & set(kept)
    assert {layer.output for layer in layers} - written  # and the record does not name them
    if name == "resnet18":
        bn_outputs = {n.output[0] for n in result.model.graph.node if n.op_type == "BatchNormalization"}
        assert len(bn_outputs & set(kept)) >= 10
    narrowed = 0
    for tensor, (count, indices) in kept.items():
        assert masked[tensor].shape[1] == count and pruned[tensor].shape[1] == indices.size, tensor
        np.testing.assert_allclose(pruned[tensor], masked[tensor][:, indices], rtol=1e-4, atol=1e-4, err_msg=tensor)
        narrowed += indices.size < count
    assert narrowed >= 5


def test_record_of_a_pruned_model_pruned_again_refers_to_the_original(zoo_cache, tmp_path):
    """Pruning the pruned model once more composes the records: the second model's first conv and depthwise
    convs (whose weights are cut along the output channels only) hold the original's weights at the indices of
    the composed record."""
    path = zoo_path("mobilenet_v2", True, zoo_cache)
    first = Pruner(path).prune(target_macs=0.6, drop_blocks=0)  # every conv stays, to be checked
    onnx.save(first.model, tmp_path / "first.onnx")
    second = Pruner(str(tmp_path / "first.onnx")).prune(target_macs=0.6, drop_blocks=0)
    kept1, kept2 = read(first.model), read(second.model)
    original = onnx.load(path)
    weights = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    checked = 0
    for node in second.model.graph.node:
        if node.op_type != "Conv" or node.output[0] not in kept2:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        w2 = numpy_helper.to_array(next(t for t in second.model.graph.initializer if t.name == node.input[1]))
        if node.input[0] != original.graph.input[0].name and not (group > 1 and w2.shape[1] == 1):
            continue
        count, indices = kept2[node.output[0]]
        assert count == kept1[node.output[0]][0]  # the original's channel count, not the first pruned model's
        assert set(indices) <= set(kept1[node.output[0]][1])
        original_weight = next(weights[n.input[1]] for n in original.graph.node if n.output[0] == node.output[0])
        np.testing.assert_array_equal(w2, original_weight[indices])
        checked += 1
    assert checked >= 10
    assert sum(i.size < kept1[t][1].size for t, (_, i) in kept2.items()) >= 5  # the second run did prune


def test_record_replaces_an_earlier_one_and_unknown_versions_are_not_read():
    model = onnx.ModelProto()
    model.metadata_props.add(key="other", value="x")
    record(model, {"a": (20, np.array([1, 5, 19]))})
    record(model, {"b": (3, np.array([0, 2]))})
    assert [p.key for p in model.metadata_props] == ["other", METADATA_KEY]
    assert {k: (c, i.tolist()) for k, (c, i) in read(model).items()} == {"b": (3, [0, 2])}
    model.metadata_props[1].value = '{"version": 99, "tensors": {}}'
    assert read(model) is None
    model.metadata_props[1].value = "not json"
    assert read(model) is None
