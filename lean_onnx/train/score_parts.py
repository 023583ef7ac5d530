"""Detector outputs that join box regressions and sigmoid class scores in one tensor, distilled part by part.

A YOLOv8 export ends in `Concat(boxes, Sigmoid(classes), axis=1)`: 4 rows of box coordinates in pixels
(values in the hundreds) and one row of probabilities per class, almost all near 0, a few near 1 where
the detector sees something. The scale-normalised squared error of the whole output (distill.py) is then
the box error alone: on YOLOv8n at half the MACs, distillation halved the output's error and brought back
none of the original's 178 detections (docs/results.md). Here such an output is split along the Concat's
axis into the ranges that come from Sigmoid nodes (probabilities) and the rest (regressions):

* regressions: the scale-normalised squared error, each position (anchor) weighted by the teacher's best
  score there plus ANCHOR_FLOOR: the boxes the detector reports, not the thousands of background anchors'
  whose coordinates nobody reads, are what must be kept;
* probabilities: the Bernoulli KL divergence of the student's from the teacher's, summed over the two
  outcomes, `q log(q/p) + (1-q) log((1-q)/(1-p))`, computed from the student's logit (its gradient through
  the sigmoid is p - q, never saturated) and divided by the teacher's mean binary entropy, so that it is a
  relative figure like the regression loss (0 when equal) whose size does not depend on how rare the
  detections are;
* the output's loss: (regression + SCORE_WEIGHT x probability) / (1 + SCORE_WEIGHT).

The split is found on the teacher's graph: the output's producer (through Identity) is a Concat whose
inputs' sizes along its axis are known from shape inference, and at least one input is made by a Sigmoid.
Anything else is compared as before.
"""

from __future__ import annotations

import onnx

#: weight of the class-score term against the box term (measured on YOLOv8n, docs/finetune.md)
SCORE_WEIGHT = 1.0
#: a position whose best class score is at least this is a detection (before NMS) in the validation figures
DETECTION_SCORE = 0.25
#: every position's box error counts with weight (the teacher's best score there + ANCHOR_FLOOR): boxes
#: where the teacher sees an object count up to 100 times more than background ones
ANCHOR_FLOOR = 0.01
EPS = 1e-8


def producers(graph: onnx.GraphProto):
    """`source(tensor)`: the node that computes `tensor`, looked up through Identity nodes (None for a graph
    input or initializer)."""
    producer = {name: node for node in graph.node for name in node.output}

    def source(name):
        node = producer.get(name)
        while node is not None and node.op_type == "Identity":
            node = producer.get(node.input[0])
        return node
    return source


def score_parts(model: onnx.ModelProto) -> dict[int, tuple[int, list[tuple[int, int, bool]]]]:
    """{output index: (axis, [(start, stop, is probability)])} for the outputs made by a Concat of sigmoid
    scores (and other values) along a static axis; outputs that are not are left out."""
    source = producers(model.graph)

    def is_sigmoid(name):
        node = source(name)
        return node is not None and node.op_type == "Sigmoid"

    concats = {k: node for k, output in enumerate(model.graph.output)
               if (node := source(output.name)) is not None and node.op_type == "Concat"
               and any(is_sigmoid(name) for name in node.input)}
    if not concats:
        return {}  # the common case: no shape inference needed
    try:  # shape inference leaves the nodes as they are: only the shapes are read from its copy
        graph = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True).graph
    except Exception:  # noqa: BLE001 - a model shape inference cannot handle is compared as a whole
        return {}
    ranks = {v.name: v.type.tensor_type.shape for v in list(graph.value_info) + list(graph.output)
             + list(graph.input) if v.type.tensor_type.HasField("shape")}
    found = {}
    for k, concat in concats.items():
        output = model.graph.output[k].name
        if output not in ranks:
            continue
        rank = len(ranks[output].dim)
        axis = next((a.i for a in concat.attribute if a.name == "axis"), 0) % max(rank, 1)
        parts, start = [], 0
        for name in concat.input:
            dims = ranks.get(name)
            if dims is None or len(dims.dim) != rank or not dims.dim[axis].HasField("dim_value"):
                parts = []
                break
            size, prob = dims.dim[axis].dim_value, is_sigmoid(name)
            if parts and parts[-1][2] == prob:  # adjacent inputs of one kind make one part
                parts[-1] = (parts[-1][0], start + size, prob)
            else:
                parts.append((start, start + size, prob))
            start += size
        if any(prob for _, _, prob in parts):
            found[k] = (axis, parts)
    return found


def logit(p):
    """log(p / (1 - p)) of a sigmoid's output, computed so its gradient through the sigmoid is 1 (the
    student's pre-sigmoid value of -40 still learns; an MSE on the probabilities would pass e^-40 back)."""
    import torch

    p = p.clamp(1e-30, 1 - 1e-7)
    return torch.log(p) - torch.log1p(-p)


def parts_loss(student, teacher, axis: int, parts: list, mean_of=None):
    """The loss of one split output (module docstring); `mean_of(tensor)`: the batch mean used for the
    normalisers (distributed.global_mean under torchrun)."""
    import torch
    import torch.nn.functional as F

    mean = mean_of or (lambda value: value.mean())
    pieces = [(student.narrow(axis, start, stop - start), teacher.narrow(axis, start, stop - start), prob)
              for start, stop, prob in parts]
    # how sure the teacher is that something is there, per position: its best score over the Concat's axis
    sure = _scores(teacher, axis, parts).amax(axis, keepdim=True) + ANCHOR_FLOOR
    regression, probability = [], []
    for s, t, prob in pieces:
        if prob:
            q = t.clamp(1e-7, 1 - 1e-7)
            entropy = -(q * torch.log(q) + (1 - q) * torch.log1p(-q))
            kl = F.binary_cross_entropy_with_logits(logit(s), q, reduction="none") - entropy
            probability.append(kl.mean() / (mean(entropy) + EPS))
        else:
            regression.append((sure * (s - t) ** 2).mean() / (mean(sure * t ** 2) + EPS))
    score = torch.stack(probability).mean()
    if not regression:
        return score
    return (torch.stack(regression).mean() + SCORE_WEIGHT * score) / (1 + SCORE_WEIGHT)


def detection_counts(student, teacher, axis: int, parts: list) -> tuple[int, int, int]:
    """(detections both make with the same class, the teacher's, the student's) at the positions whose best
    class score is at least DETECTION_SCORE: recall and precision of the teacher's detections."""
    s, t = _scores(student, axis, parts), _scores(teacher, axis, parts)
    mine, theirs = s.amax(axis) >= DETECTION_SCORE, t.amax(axis) >= DETECTION_SCORE
    same = mine & theirs & (s.argmax(axis) == t.argmax(axis))
    return int(same.sum()), int(theirs.sum()), int(mine.sum())


def _scores(x, axis: int, parts: list):
    """The probability parts of a split output, side by side along the Concat's axis."""
    import torch

    return torch.cat([x.narrow(axis, start, stop - start) for start, stop, prob in parts if prob], axis)
