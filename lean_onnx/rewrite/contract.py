"""The contract of DESIGN.md section 2, checked with ONNX Runtime: pruned(x) == masked(x).

Used by the tests, `tools/fuzz.py`, `--validate` and `sweep`. `check_contract` raises AssertionError
with a one-line reason on any violation and returns the measured errors.

An output that a Sigmoid makes (through ops that only move values: `with_logits`) is compared on the
Sigmoid's input. ONNX Runtime's float32 Sigmoid is exact to about 1e-7 absolute, so on a score map near 0
(a one-shot pruned text detector's saturated map, a detector's class scores on noise: PicoDet's are at most
1e-3) its last bits are noise that "1e-5 of the output's max magnitude" would count (measured: logits equal
to 3e-7 of their magnitude, the scores after the Sigmoid differing by 1.8e-7 = 1.9e-4 of their max).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.cost import float_params

RTOL = 1e-5


def session(model: onnx.ModelProto, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


#: ops that move values without changing them
_MOVES = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def with_logits(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[int, int]]:
    """`model` with the input of every Sigmoid that makes one of its outputs (through `_MOVES` only)
    appended as an output, and {output index: index of its Sigmoid's input among the outputs}; the model
    itself and {} when no output is a Sigmoid's."""
    producer = {o: n for n in model.graph.node for o in n.output}
    names = [o.name for o in model.graph.output]
    logits = {}
    for k, name in enumerate(names):
        node = producer.get(name)
        while node is not None and node.op_type in _MOVES:
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Sigmoid" and node.input[0] in producer:
            logits[k] = node.input[0]
    if not logits:
        return model, {}
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    index = {}
    for k, name in logits.items():
        if name not in names:  # the Sigmoid and the moves keep the output's element type
            elem_type = model.graph.output[k].type.tensor_type.elem_type or onnx.TensorProto.FLOAT
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
            names.append(name)
        index[k] = names.index(name)
    return exposed, index


def masked_error(masked: list[np.ndarray], pruned: list[np.ndarray], logits: dict[int, int], count: int) -> float:
    """The contract's error over a model's `count` outputs (runs of `with_logits` views): max relative error,
    an output made by a Sigmoid measured on the Sigmoid's input."""
    compared = [logits.get(k, k) for k in range(count)]
    return max_rel_error([masked[j] for j in compared], [pruned[j] for j in compared])


def random_feeds(model: onnx.ModelProto, input_shapes: dict, rng: np.random.Generator) -> dict:
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        feeds[inp.name] = rng.standard_normal(input_shapes[inp.name]).astype(dtype)
    return feeds


def max_rel_error(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    """max |a - b| / max |a| over outputs (each output relative to its own magnitude)."""
    worst = 0.0
    for a, b in zip(reference, other):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.shape != b64.shape:
            return float("inf")
        scale = max(float(np.abs(a64).max()) if a64.size else 0.0, 1e-30)
        worst = max(worst, float(np.abs(a64 - b64).max()) / scale if a64.size else 0.0)
    return worst


def _interface(model: onnx.ModelProto):
    inits = {t.name for t in model.graph.initializer}

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return ([(i.name, dims(i)) for i in model.graph.input if i.name not in inits],
            [(o.name, dims(o)) for o in model.graph.output])


def check_contract(original: onnx.ModelProto, result, input_shapes: dict, rng: np.random.Generator,
                   samples: int = 2, original_session=None) -> dict:
    """Assert the contract for one PruneResult; returns {'max_rel_err_vs_masked', 'max_rel_err_vs_original'}.
    `original_session` (an ORT session of `original`) saves building it again when many results share it."""
    pruned, masked, report = result.model, result.masked, result.report
    for name, model in (("pruned", pruned), ("masked", masked)):
        onnx.checker.check_model(model, full_check=True)
        assert model.ir_version == original.ir_version, f"{name}: IR version changed"
        assert list(model.opset_import) == list(original.opset_import), f"{name}: opsets changed"
        assert _interface(model) == _interface(original), f"{name}: inputs/outputs changed"
    (masked_view, logits), (pruned_view, _) = with_logits(masked), with_logits(pruned)
    sessions = {"original": original_session or session(original), "masked": session(masked_view),
                "pruned": session(pruned_view)}
    count = len(original.graph.output)
    err_masked = err_original = 0.0
    for _ in range(samples):
        feeds = random_feeds(original, input_shapes, rng)
        outs = {name: s.run(None, feeds) for name, s in sessions.items()}
        err_masked = max(err_masked, masked_error(outs["masked"], outs["pruned"], logits, count))
        err_original = max(err_original, max_rel_error(outs["original"], outs["masked"][:count]))
    assert err_masked <= RTOL, f"pruned != masked: max relative error {err_masked:.3g} > {RTOL}"
    if report["keep_requested"] >= 1.0:
        assert err_original <= RTOL, f"keep 1.0 changed the outputs: max relative error {err_original:.3g}"
    _check_kernels_counted(masked, result)
    params = float_params(pruned)
    assert report["params"]["after"] == params, f"reported params {report['params']['after']} != {params}"
    assert report["flops"]["after"] <= report["flops"]["before"], "MACs grew"
    return {"max_rel_err_vs_masked": err_masked, "max_rel_err_vs_original": err_original}


def _check_kernels_counted(masked: onnx.ModelProto, result) -> None:
    """Every kernel that is non-zero in the masked model is one LEAN kept (or in an unprunable layer).
    The masked model is the input's graph (rewrite/masked.py): a weight it computes (a Constant node,
    constant arithmetic) is read from its normalised copy."""
    weights = {t.name: t for t in masked.graph.initializer}
    weights.update((n.output[0], n.attribute[0].t) for n in masked.graph.node
                   if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value")
    convs = {n.output[0]: n for n in masked.graph.node if n.op_type in ("Conv", "ConvTranspose")}
    if any(convs[layer.output].input[1] not in weights for layer in result.graph.layers if layer.prunable):
        from ..graph.normalise import structural_copy

        masked = structural_copy(masked)
        weights = {t.name: t for t in masked.graph.initializer}
        convs = {n.output[0]: n for n in masked.graph.node if n.op_type in ("Conv", "ConvTranspose")}
    graph = result.graph
    for layer in graph.layers:
        if not layer.prunable:
            continue
        node = convs[layer.output]
        kernels = layer.kernels(numpy_helper.to_array(weights[node.input[1]]))
        nonzero = np.abs(kernels).reshape(kernels.shape[0], kernels.shape[1], -1).max(axis=2) > 0
        assert not (nonzero & ~result.selection.layer_mask(layer)).any(), \
            f"{layer.name}: a kernel LEAN did not keep is non-zero in the masked model"
