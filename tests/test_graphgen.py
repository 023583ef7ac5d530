"""The random CNN generator (tests/graphgen.py): valid models, runnable in ORT, covering every block kind."""

from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.graphgen import BLOCKS, HEADS, MAX_SPATIAL, build_random_cnn, random_cnn
from tests.helpers import run_ort

POPULATION = 200


def _attr(node, name, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _shape(value_info) -> list[int]:
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def describe(model: onnx.ModelProto) -> Counter:
    """What a model contains: op types, conv variants, graph-level features (each counted once)."""
    seen = Counter()
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers = Counter(i for n in g.node for i in n.input)
    seen.update({n.op_type for n in g.node})
    for n in g.node:
        if n.op_type in ("Conv", "ConvTranspose"):
            w = inits[n.input[1]].dims
            k, group = w[2], _attr(n, "group", 1)
            cin = w[1] * group if n.op_type == "Conv" else w[0]
            tag = n.op_type
            seen[f"{tag} k{k}"] = seen[f"{tag} s{_attr(n, 'strides', [1])[0]}"] = 1
            seen[f"{tag} {'bias' if len(n.input) > 2 else 'no bias'}"] = 1
            if group > 1:
                seen[f"{tag} {'depthwise' if group == cin else 'grouped'}"] = 1
            if n.op_type == "Conv":
                pads = _attr(n, "pads", [0] * 4)
                seen[f"Conv dilation {_attr(n, 'dilations', [1])[0]}"] = 1
                if _attr(n, "auto_pad"):
                    seen["Conv auto_pad"] = 1
                elif pads[:2] != pads[2:]:
                    seen["Conv asymmetric pads"] = 1
                elif k > 1 and pads == [0] * 4:
                    seen["Conv valid pads"] = 1
        elif n.op_type in ("MaxPool", "AveragePool"):
            seen[f"Pool {_attr(n, 'kernel_shape')[0]}x s{_attr(n, 'strides')[0]}"] = 1
        elif n.op_type in ("Concat", "Sum"):
            seen[f"{n.op_type} of {len(n.input)}"] = 1
        elif n.op_type == "Split" and any(consumers[o] == 0 for o in n.output):
            seen["Split with unused output"] = 1
        elif n.op_type == "Mul" and any(producer.get(i) and producer[i].op_type in ("Sigmoid", "HardSigmoid")
                                        for i in n.input):
            seen["SE gate"] = 1
        if n.op_type in ("Add", "Concat") and "_resize/" in n.name:  # node names carry their block
            seen["Resize fused with skip"] = 1
    convs = sum(n.op_type in ("Conv", "ConvTranspose") for n in g.node)
    seen["BN kept" if "BatchNormalization" in seen else "BN folded" if convs else "no conv"] = 1
    seen[f"{len(g.output)} outputs"] = 1
    props = {p.key: p.value for p in model.metadata_props}
    seen.update({f"block {b}" for b in props["graphgen_blocks"].split(",")})
    shape = _shape(g.input[0])
    seen.update({f"C0={shape[1]}", f"H={shape[2]}"})
    return seen


def _check(model: onnx.ModelProto, input_shape) -> None:
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    names = [n.name for n in g.node]
    assert all(names) and len(set(names)) == len(names), "node names must be unique and non-empty"
    assert [i.name for i in g.input] == ["input"] and tuple(_shape(g.input[0])) == tuple(input_shape)
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    assert 1 <= len(g.output) <= 2
    x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
    outputs = run_ort(model, {"input": x})
    for out, info in zip(outputs, g.output):
        assert list(out.shape) == _shape(info), info.name
        assert np.isfinite(out).all(), info.name
        assert out.ndim == 2 or out.shape[2] <= MAX_SPATIAL


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cnn())
def test_hypothesis_models_are_valid_and_run(case):
    _check(*case)


@pytest.fixture(scope="module")
def population():
    return [build_random_cnn(seed) for seed in range(POPULATION)]


def test_seeded_models_are_valid_run_and_stay_small(population):
    for model, input_shape in population:
        _check(model, input_shape)
        inits = {i.name: i.dims for i in model.graph.initializer}
        kernels = sum(inits[n.input[1]][0] * inits[n.input[1]][1]
                      for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose"))
        assert kernels < 3000


def test_seed_is_deterministic():
    a, b = build_random_cnn(11), build_random_cnn(11)
    assert a[0].SerializeToString() == b[0].SerializeToString() and a[1] == b[1]
    assert build_random_cnn(12)[0].SerializeToString() != a[0].SerializeToString()


REQUIRED = (
    [f"block {b}" for b in BLOCKS] + [f"block head-{h}" for h in HEADS]
    + ["Conv", "ConvTranspose", "BatchNormalization", "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSwish",
       "Tanh", "Add", "Sub", "Sum", "Concat", "Split", "MaxPool", "AveragePool", "GlobalAveragePool",
       "Resize", "Mul", "Flatten", "Gemm"]
    + ["Conv k1", "Conv k3", "Conv k5", "Conv s2", "Conv dilation 2", "Conv bias", "Conv no bias",
       "Conv depthwise", "Conv grouped", "Conv auto_pad", "Conv asymmetric pads", "Conv valid pads",
       "ConvTranspose k2", "ConvTranspose k3", "ConvTranspose grouped", "ConvTranspose bias",
       "ConvTranspose no bias", "Pool 2x s2", "Pool 3x s1", "Concat of 2", "Concat of 3", "Sum of 3",
       "Split with unused output", "SE gate", "Resize fused with skip", "BN kept", "BN folded",
       "1 outputs", "2 outputs"]
    + [f"C0={c}" for c in range(1, 5)] + [f"H={h}" for h in (8, 12, 16)]
)


def test_population_covers_every_block_kind(population):
    models_with = Counter()
    for model, _ in population:
        models_with.update(describe(model))
    missing = [f for f in REQUIRED if models_with[f] == 0]
    assert not missing, f"never generated in {POPULATION} seeds: {missing}"
    # both BN variants are common, not a fluke
    assert min(models_with["BN kept"], models_with["BN folded"]) >= POPULATION // 5


if __name__ == "__main__":  # print the coverage table: python -m tests.test_graphgen
    counts = Counter()
    for seed in range(POPULATION):
        counts.update(describe(build_random_cnn(seed)[0]))
    for feature, n in sorted(counts.items()):
        print(f"{n:5d}  {feature}")
