"""The contract of DESIGN.md section 2, checked with ONNX Runtime: pruned(x) == masked(x).

Used by the tests, `tools/fuzz.py` and (later) `--validate`. `check_contract` raises AssertionError
with a one-line reason on any violation and returns the measured errors.
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
    sessions = {"original": original_session or session(original), "masked": session(masked),
                "pruned": session(pruned)}
    err_masked = err_original = 0.0
    for _ in range(samples):
        feeds = random_feeds(original, input_shapes, rng)
        outs = {name: s.run(None, feeds) for name, s in sessions.items()}
        err_masked = max(err_masked, max_rel_error(outs["masked"], outs["pruned"]))
        err_original = max(err_original, max_rel_error(outs["original"], outs["masked"]))
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
