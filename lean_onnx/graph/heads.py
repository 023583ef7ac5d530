"""Linear heads: where a Flatten/Reshape -> Gemm/MatMul reads a channel tensor whose columns are
channel-major blocks, so that a removed channel's columns can leave the Gemm's weight. The graph fact
(which reads have that layout) is here; which columns go is the plan's (rewrite/plan.py)."""

from __future__ import annotations

import numpy as np

from .channel_graph import HeadRead


def head_layout(loaded, read: HeadRead, channels: int):
    """(the Gemm/MatMul node, columns per channel) when the head's input columns are channel-major blocks
    of the tensor it reads and its weight is a constant we can slice; None otherwise."""
    shape = loaded.shape(read.tensor)
    if not shape or len(shape) < 2 or any(d is None for d in shape[1:]) or shape[1] != channels:
        return None
    per_channel = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    outputs = {o.name for o in loaded.graph.output}
    if read.op in ("Gemm", "MatMul"):
        gemm, flat = loaded.producer.get(read.reader_output), read.tensor
        if len(shape) != 2:
            return None
    else:
        if read.op == "Flatten":
            node = loaded.producer.get(read.reader_output)
            if node is None or next((a.i for a in node.attribute if a.name == "axis"), 1) != 1:
                return None
        elif read.op != "Reshape" or reshape_target(loaded, read, channels * per_channel) is None:
            return None
        flat = read.reader_output
        readers = loaded.consumers.get(flat, [])
        if flat in outputs or len(readers) != 1:
            return None
        gemm = readers[0]
    if gemm is None or gemm.op_type not in ("Gemm", "MatMul") or list(gemm.input).count(flat) != 1 \
            or gemm.input[0] != flat or gemm.input[1] not in loaded.initializers:
        return None
    weight = loaded.initializers[gemm.input[1]]
    trans_a = next((a.i for a in gemm.attribute if a.name == "transA"), 0)
    trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
    rows = weight.shape[1] if trans_b else weight.shape[0]
    if weight.ndim != 2 or trans_a or rows != channels * per_channel:
        return None
    return gemm, per_channel


def reshape_target(loaded, read: HeadRead, columns: int):
    """The constant target shape of a Reshape to (batch, columns), or None."""
    node = loaded.producer.get(read.reader_output)
    target = loaded.initializers.get(node.input[1]) if node is not None and len(node.input) > 1 else None
    if target is None or target.ndim != 1 or len(target) != 2:
        return None
    if int(target[1]) in (columns, -1) or (int(target[1]) == 0 and columns == loaded.shape(read.tensor)[1]):
        return target
    return None
