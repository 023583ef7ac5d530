"""Small ONNX models written in ONNX text syntax, plus ORT helpers, for the tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper

RNG = np.random.default_rng(0)

#: Conv(2->3, 3x3) -> Relu -> Conv(3->4, 1x1) on 8x8
CHAIN = """
g (float[1,2,8,8] x) => (float[1,4,8,8] y) {
  a = Conv <pads = [1,1,1,1]> (x, w1)
  r = Relu (a)
  y = Conv (r, w2)
}"""


def text_model(graph_text: str, inits: dict[str, np.ndarray] | None = None, opset: int = 17) -> onnx.ModelProto:
    """Parse `graph_text` (ONNX text syntax, graph part) and turn the named inputs into initializers."""
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n{graph_text}')
    inits = inits or {}
    kept = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    for name, value in inits.items():
        model.graph.initializer.append(numpy_helper.from_array(_as_init(value), name))
    onnx.checker.check_model(model, full_check=True)
    return model


#: small inputs keep ORT fast; vgg11_bn needs 224 (the exporter's adaptive pooling limit)
ZOO_IMAGE_SIZE = {"msd": 32, "unet4": 32, "vgg11_bn": 224}


def zoo_path(name: str, fold_bn: bool, cache) -> str:
    """A zoo model exported at the tests' image size (cached in `cache`)."""
    from models.zoo import cached_export

    return str(cached_export(name, fold_bn=fold_bn, image_size=ZOO_IMAGE_SIZE.get(name, 64), cache_dir=cache))


def _as_init(value) -> np.ndarray:
    value = np.asarray(value)
    return value.astype(np.float32) if value.dtype.kind == "f" else value


def rand(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None):
    from lean_onnx.rewrite.contract import session

    return session(model).run(outputs, feeds)


def assert_one_line_error(code, err, expected_code, *needles):
    """The CLI failed with `expected_code` and one `[E]` line (no traceback) containing every needle."""
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[E] "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def bridge_tensors(model: onnx.ModelProto, inputs: np.ndarray, names=None) -> dict:
    """{tensor: torch value} of every node output (or of those in `names`) when `model` runs on `inputs`
    through the torch bridge (train/bridge.py's per-node hook)."""
    import torch

    from lean_onnx.train.bridge import to_torch

    found = {}

    def hook(ctx, outputs, results):
        found.update((name, value.detach()) for name, value in zip(outputs, results)
                     if names is None or name in names)
        return results

    module = to_torch(model)
    module.node_hook = hook
    with torch.no_grad():
        module(torch.from_numpy(inputs))
    return found


def without_kept_channel_record(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a pruned model without lean-onnx's kept-channel record (as another tool would write it)."""
    from lean_onnx.rewrite.channel_map import METADATA_KEY

    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    props = [p for p in bare.metadata_props if p.key != METADATA_KEY]
    del bare.metadata_props[:]
    bare.metadata_props.extend(props)
    return bare
