"""The registry of channel-flow rules: one handler per ONNX op type (DESIGN.md sections 3-4)."""

from __future__ import annotations

from .builder import GraphBuilder
from .handlers import (
    average_pool,
    batch_norm,
    conv,
    elementwise,
    global_average_pool,
    linear_head,
    reduce_mean,
    reduce_other,
    same_channels,
    softmax,
    unknown,
)
from .routing import concat, pad, reshape, resize, slice_, split, squeeze, transpose

ALIAS_OPS = (
    "Relu LeakyRelu PRelu Elu Selu Celu ThresholdedRelu Clip Sigmoid HardSigmoid HardSwish Tanh Softplus "
    "Softsign Gelu Mish Erf Dropout Identity Cast CastLike MaxPool GlobalMaxPool LpPool GlobalLpPool Abs Neg "
    "Sqrt Exp Log Reciprocal Floor Ceil Round Sign InstanceNormalization Upsample"
).split()

HANDLERS = {op: same_channels for op in ALIAS_OPS}
HANDLERS.update({
    "Conv": conv, "ConvTranspose": conv, "BatchNormalization": batch_norm,
    "AveragePool": average_pool, "GlobalAveragePool": global_average_pool, "ReduceMean": reduce_mean,
    "Add": elementwise, "Sub": elementwise, "Mul": elementwise, "Div": elementwise, "Sum": elementwise,
    "Max": elementwise, "Min": elementwise, "Mean": elementwise,
    "Concat": concat, "Split": split, "Slice": slice_, "Pad": pad, "Resize": resize,
    "Transpose": transpose, "Squeeze": squeeze, "Unsqueeze": squeeze,
    "Flatten": reshape, "Reshape": reshape, "Gemm": linear_head, "MatMul": linear_head,
    "Softmax": softmax, "LogSoftmax": softmax, "Hardmax": softmax,
    "ArgMax": reduce_other, "ArgMin": reduce_other, "ReduceMax": reduce_other, "ReduceMin": reduce_other,
    "ReduceSum": reduce_other, "ReduceL2": reduce_other,
})


class _ReadsOfControlFlow:
    """An If/Loop/Scan node seen with every name its bodies read from the outer graph as an input."""

    def __init__(self, node):
        from .normalise import all_inputs

        self.name, self.op_type, self.output = node.name, node.op_type, node.output
        self.input = [t for t in dict.fromkeys(all_inputs(node)) if t]


def handle_node(node, b: GraphBuilder) -> None:
    """Dispatch one ONNX node to its handler; unknown op types (and other domains) are frozen, and so is
    everything a node with subgraphs (If/Loop/Scan) reads, also from inside its bodies."""
    if any(a.HasField("g") or len(a.graphs) for a in node.attribute):
        return unknown(_ReadsOfControlFlow(node), b, f"{node.op_type} with subgraphs: control flow is frozen, "
                                                     "with every tensor its bodies read")
    handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if node.op_type not in ("Reshape", "Transpose"):
        for t in node.input:  # split channel axes read by anything but the shuffle ops: freeze them
            if t in b.split_nodes and t not in b.tensor_nodes:
                b.set_nodes(t, b.split_nodes[t].ravel())
                handler = None
    (handler or unknown)(node, b)
