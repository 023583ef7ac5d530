"""What every op implementation receives: the node's attributes, the opset, the training flag."""

from __future__ import annotations

import onnx
import torch

from ...errors import LeanOnnxError

_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
           9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


class NodeContext:
    """A node's attributes (strings decoded), the model's opset and the module's training flag."""

    def __init__(self, node: onnx.NodeProto, opset: int):
        self.op_type, self.name, self.opset = node.op_type, node.name or node.output[0], opset
        self.n_outputs = len(node.output)
        self.training = False
        self.attrs = {}
        for a in node.attribute:
            value = onnx.helper.get_attribute_value(a)
            self.attrs[a.name] = value.decode() if isinstance(value, bytes) else value

    run = None  # set by fused nodes (SliceConcat): computes the node instead of OPS[op_type]

    def get(self, name: str, default=None):
        return self.attrs.get(name, default)


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _unsupported(ctx: NodeContext, what: str):
    raise LeanOnnxError(f"node {ctx.name!r} ({ctx.op_type}): {what} is not supported by the fine-tuning bridge")
