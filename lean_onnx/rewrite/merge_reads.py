"""A Concat that reads one tensor more than once, read only by convs: one copy, the copies' kernels summed.

When a residual branch leaves the model whole (bypass.py), its sum becomes an Identity of the skip, and a
Concat that read both the skip and the sum now reads the same tensor twice. That is YOLOv8's C2f block:
`cv2(Concat(a, b, b + m1(b), ...))` becomes `cv2(Concat(a, b, b, ...))` once its bottlenecks are removed.
A conv is linear in its input channels, so `conv(W, [a, b, b]) = conv(W', [a, b])` with the kernels of the
two copies of b summed in W': the pruned model reads each tensor once, the conv loses the repeated
input channels (and their MACs), and where what is left is exactly the outputs of one Split in order
(`Concat(Split(x)) = x`) the Concat and the Split go too, so the two convs meet without a copy or ONNX
Runtime's layout reorders between them. The masked model (DESIGN.md section 2) is not touched: it computes
the same sums with the kernels apart, and pruned == masked holds to float rounding (the contract's 1e-5).

Only channel Concats (axis 1) whose every reader is a group-1 Conv with an initializer weight of its own
are merged; anything else stays as the rewrite wrote it.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.normalise import all_inputs

REMOVABLE = ("Identity", "Split", "Concat")  # ops with no side effect that may go once nothing reads them


def merge_repeated_reads(model: onnx.ModelProto, channels, rank, first_copy: bool = False) -> int:
    """Merge the repeated inputs of channel Concats (see the module docstring) in `model`, in place;
    `channels(tensor)` is a tensor's channel count in `model` and `rank(tensor)` its rank (None when
    unknown: nothing is merged there). `first_copy`: the merged kernels are the first copy's, not the sum
    (for arrays cut like the weights that are not weights: the flat positions a refit value goes back to,
    where a change on the first copy alone changes the masked model exactly as it changes the merged
    kernel; optimizer moments, whose gradient is the same for every copy). Returns the number of Concat
    inputs removed."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    merged = 0
    for node in graph.node:
        if node.op_type != "Concat" or node.output[0] in outputs or not _channel_axis(node, rank):
            continue
        resolved = [_through_identities(t, producer) for t in node.input]
        unique = list(dict.fromkeys(resolved))
        convs = readers[node.output[0]]
        if len(unique) == len(resolved) or not convs or not all(_own_weight(c, node, inits, readers) for c in convs):
            continue
        counts = [channels(t) for t in node.input]
        if any(c is None for c in counts) or any(inits[c.input[1]].dims[1] != sum(counts) for c in convs):
            continue
        starts = np.cumsum([0] + counts)
        first = {t: resolved.index(t) for t in unique}
        new_start = dict(zip(unique, np.cumsum([0] + [counts[first[t]] for t in unique])))
        width = sum(counts[first[t]] for t in unique)
        for conv in convs:
            weight = _weight(conv, inits)
            summed = np.zeros((weight.shape[0], width) + weight.shape[2:], dtype=np.float64)
            for k, t in enumerate(resolved):
                if first_copy and first[t] != k:
                    continue
                summed[:, new_start[t]:new_start[t] + counts[k]] += weight[:, starts[k]:starts[k + 1]]
            inits[conv.input[1]].CopyFrom(numpy_helper.from_array(summed.astype(weight.dtype), conv.input[1]))
        merged += len(resolved) - len(unique)
        split = producer.get(unique[0])
        whole = split is not None and split.op_type == "Split" and list(split.output) == unique and \
            _channel_axis(split, rank, split.input[0])
        del node.input[:]
        node.input.extend([split.input[0]] if whole else unique)
        if len(node.input) == 1:  # the convs read the one tensor left; the Concat goes
            for conv in convs:
                conv.input[0] = node.input[0]
    if merged:
        _remove_unread(graph)
    return merged


def _through_identities(tensor: str, producer: dict) -> str:
    node = producer.get(tensor)
    while node is not None and node.op_type == "Identity":
        tensor = node.input[0]
        node = producer.get(tensor)
    return tensor


def _channel_axis(node, rank_of, tensor: str | None = None) -> bool:
    rank = rank_of(tensor or node.output[0])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return rank is not None and axis % rank == 1


def _own_weight(conv, concat, inits: dict, readers: dict) -> bool:
    """A group-1 Conv reading the Concat as its data input, with an initializer weight nothing else reads."""
    group = next((a.i for a in conv.attribute if a.name == "group"), 1)
    return (conv.op_type == "Conv" and group == 1 and len(conv.input) > 1 and conv.input[0] == concat.output[0]
            and concat.output[0] not in conv.input[1:] and conv.input[1] in inits and len(readers[conv.input[1]]) == 1)


def _weight(conv, inits: dict) -> np.ndarray:
    return numpy_helper.to_array(inits[conv.input[1]])


def _remove_unread(graph: onnx.GraphProto) -> None:
    """Drop Identity / Split / Concat nodes none of whose outputs is read or a graph output, until none is
    left (a Split whose halves were all merged away, the Identities a bypass left), and the initializers
    only they read (a Split's sizes)."""
    outputs = {o.name for o in graph.output}
    dropped = set()
    while True:
        read = {name for node in graph.node for name in all_inputs(node)} | outputs
        unread = [n for n in graph.node if n.op_type in REMOVABLE and not any(o in read for o in n.output)]
        if not unread:
            break
        for node in unread:
            dropped.update(node.input)
            graph.node.remove(node)
    orphans = dropped - read
    if orphans & {t.name for t in graph.initializer}:
        kept = [t for t in graph.initializer if t.name not in orphans]
        del graph.initializer[:]
        graph.initializer.extend(kept)
