"""The kept-channel record in a pruned model's metadata: which of the original's channels each conv kept.

Every pruned model carries, in `metadata_props[METADATA_KEY]`, for every prunable conv's output tensor (its
BatchNormalization's output too where one follows unfolded): the original's channel count and which of
its channels the pruned model holds, in order. A model pruned from an already pruned model (a schedule's
step, or a second `lean-onnx` run) gets the composition, so the record always refers to the first model
that had none: the original. With it, `finetune --teacher ORIGINAL` can match each kept channel to the
teacher's channel (train/calibrate.py `calibrate_to_teacher`) without the pruning run at hand.

Format (JSON): {"version": 1, "tensors": {name: [original channel count, base64 of the packed bit mask of
the kept channels]}}: 12 bytes per 64 channels, a few kB for ResNet-50.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import onnx

from ..errors import LeanOnnxError
from ..graph.channel_graph import ChannelGraph
from .plan import Plan

METADATA_KEY = "lean_onnx.kept_channels"
VERSION = 1


def read(model: onnx.ModelProto) -> dict[str, tuple[int, np.ndarray]] | None:
    """{tensor: (the original's channel count, the kept original channel indices, ascending)} from the model's
    metadata, or None when it has no (readable) record."""
    text = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if text is None:
        return None
    try:
        record = json.loads(text)
        if record.get("version") != VERSION:
            return None
        tensors = {}
        for name, (count, bits) in record["tensors"].items():
            mask = np.unpackbits(np.frombuffer(base64.b64decode(bits), dtype=np.uint8), count=int(count))
            tensors[name] = (int(count), np.flatnonzero(mask))
        return tensors
    except (ValueError, TypeError, KeyError):
        return None


def required(model: onnx.ModelProto, path: str) -> dict[str, tuple[int, np.ndarray]]:
    """`read(model)`, or one LeanOnnxError naming `path` when it has no record: its channels cannot be matched
    to the teacher's (train/calibrate.py and train/reconstruct.py, `finetune --teacher`)."""
    kept = read(model)
    if kept is None:
        raise LeanOnnxError(f"{path}: no lean-onnx kept-channel record in its metadata (pruned by another tool "
                            "or an older lean-onnx), so its channels cannot be matched to the teacher's")
    return kept


def kept_channels(graph: ChannelGraph, plan: Plan, base: onnx.GraphProto) -> dict[str, tuple[int, np.ndarray]]:
    """{tensor: (channel count in the pruned run's input, kept indices)} for every prunable conv's output that
    stays in the pruned model and the output of a BatchNormalization that follows it unfolded (`base`: the
    graph the rewrite started from)."""
    bn_output = {(n.name or n.output[0]): n.output[0] for n in base.node if n.op_type == "BatchNormalization"}
    found = {}
    for layer in graph.layers:
        if not layer.prunable:
            continue
        keep = plan.keep(layer.output)
        if keep is not None and not keep.any():
            continue  # the conv left the model (a residual branch removed whole, rewrite/bypass.py)
        entry = (layer.c_out, np.arange(layer.c_out) if keep is None else np.flatnonzero(keep))
        found[layer.output] = entry
        if layer.bn_name is not None and layer.bn_name in bn_output:
            found[bn_output[layer.bn_name]] = entry
    return found


def compose(kept: dict[str, tuple[int, np.ndarray]], source: onnx.ModelProto) -> dict[str, tuple[int, np.ndarray]]:
    """`kept` (relative to `source`) made relative to the original `source` was pruned from, when `source`
    carries a record; tensors the record does not cover (so their relation to the original is unknown) and
    whose counts disagree with it are left out."""
    earlier = read(source)
    if earlier is None:
        return kept
    composed = {}
    for name, (count, indices) in kept.items():
        if name in earlier and earlier[name][1].size == count:
            composed[name] = (earlier[name][0], earlier[name][1][indices])
    return composed


def record(model: onnx.ModelProto, kept: dict[str, tuple[int, np.ndarray]]) -> None:
    """Write `kept` into `model`'s metadata (replacing an earlier record)."""
    tensors = {}
    for name, (count, indices) in sorted(kept.items()):
        mask = np.zeros(count, dtype=np.uint8)
        mask[indices] = 1
        tensors[name] = [int(count), base64.b64encode(np.packbits(mask).tobytes()).decode("ascii")]
    text = json.dumps({"version": VERSION, "tensors": tensors}, separators=(",", ":"))
    props = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    model.metadata_props.add(key=METADATA_KEY, value=text)
