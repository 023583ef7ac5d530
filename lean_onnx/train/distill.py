"""Label-free recovery: the pruned model (student) learns the original's (teacher's) outputs.

`Teacher(model)` is the original through the same bridge as the student (`to_torch`), in eval mode with
`requires_grad_(False)`, run under `torch.no_grad()` on every batch the student sees (never cached, so
each augmented batch gets fresh teacher outputs); nothing ever updates it. `distill_loss` compares the
outputs one by one and averages:

* a 2-D (N, classes) output with classes > 1: `T^2 * KL(softmax(t / T) || softmax(s / T))`, batch mean
  (Hinton et al. 2015). T > 1 softens a confident teacher so the student also learns how it ranks the
  other classes; the T^2 keeps the gradients' size independent of T. Default T = 4, the usual setting of
  distillation benchmarks on ImageNet-style classifiers. An output that is already a softmax
  (its node is Softmax) is compared through its log, i.e. as the logits up to a constant;
* every other float output (detector heads, segmentation or depth maps, features): the scale-normalised
  squared error `mean((s - t)^2) / (mean(t^2) + eps)`, a relative error: 1 for a student that outputs
  zeros, whatever the output's units, so box coordinates in pixels and objectness logits weigh the same
  and the learning rate does not depend on the output's scale. An output made by a Sigmoid node (a
  text detector's probability map) is compared as logits, log(p / (1 - p)) (the teacher's clamped to
  +-16, float32's limit): a pruned detector whose map saturated at 0 (pre-sigmoid values of -20..-44 on
  the PP-OCR detector at half the MACs) gets a gradient of about 1 through the sigmoid instead of e^-40.
* an output that is a Concat of box regressions and sigmoid class scores (YOLOv8's one output): part by
  part, the scores by a Bernoulli KL divergence (score_parts.py).

`mixed_loss` blends in a labelled loss when the data has targets: `alpha * labelled + (1 - alpha) * distill`.
`Agreement` measures how close student and teacher are on validation data: top-1 agreement for
(N, classes) outputs, mean relative error `mean|s - t| / mean|t|` for the others.
`check_interface` refuses a teacher whose inputs or outputs are not the student's.
"""

from __future__ import annotations

import onnx

from ..errors import LeanOnnxError
from .score_parts import detection_counts, logit, parts_loss, producers, score_parts

#: Adam's learning rate without / with a teacher: a trained network that lost channels recovers at 1e-4;
#: at 1e-3 it does not (trained MobileNetV2 at half the MACs, one epoch on 512 crops: top-1 agreement with
#: the original 0.06 at 1e-3, 0.58 at 1e-4, 0.49 at 5e-5; docs/finetune.md)
DEFAULT_LR, DISTILL_LR = 1e-3, 1e-4
#: ... and when the student was reconstructed to the teacher first (train/reconstruct.py, `finetune --teacher`'s
#: default): it starts close, and larger steps undo part of that (MobileNetV2 at half the MACs, 3 epochs: top-1
#: agreement 0.73 at 1e-4, 0.77 at 5e-5, 0.78 at 3e-5; YOLOv8n, 2 epochs: recall of the original's detections
#: 0.47 / 0.52 / 0.53 with the output's mean relative error 0.065 / 0.065 / 0.067; docs/finetune.md)
RECONSTRUCTED_LR = 5e-5
EPS = 1e-8  # only guards an all-zero teacher output; small against any real output's mean square
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


class Teacher:
    """The frozen original model (see the module docstring); `teacher(x)` -> tuple of its outputs."""

    def __init__(self, model: onnx.ModelProto, path: str = "<teacher>", device: str = "cpu", split: bool = True):
        """`split=False`: outputs that join boxes and sigmoid scores are compared as a whole too."""
        from .bridge import to_torch

        self.path = path
        self.output_names = [o.name for o in model.graph.output]
        floats = [o.type.tensor_type.elem_type in FLOAT_TYPES for o in model.graph.output]
        #: outputs the loss compares (float ones: an ArgMax output has no gradient)
        self.compared = [k for k, is_float in enumerate(floats) if is_float]
        if not self.compared:
            raise LeanOnnxError(f"{path}: the teacher has no float output to distil from "
                                f"(outputs {self.output_names})")
        self.probabilities = _outputs_of(model, "Softmax")
        self.sigmoids = _outputs_of(model, "Sigmoid")
        #: outputs that join box regressions and sigmoid scores (YOLO): distilled part by part (score_parts.py)
        self.parts = score_parts(model) if split else {}
        self.module = to_torch(model, path).to(device).eval().requires_grad_(False)

    def to(self, device) -> Teacher:
        self.module.to(device)
        return self

    def __call__(self, x) -> tuple:
        import torch

        self.module.eval()
        with torch.no_grad():
            out = self.module(x)
        return out if isinstance(out, tuple) else (out,)


def _outputs_of(model: onnx.ModelProto, op: str) -> set[int]:
    """Indices of the outputs computed by an `op` node (through Identity nodes)."""
    source = producers(model.graph)
    return {k for k, output in enumerate(model.graph.output)
            if (node := source(output.name)) is not None and node.op_type == op}


def is_classes(tensor) -> bool:
    """A (N, classes) output with more than one class: compared as a distribution."""
    return tensor.dim() == 2 and tensor.shape[1] > 1


def distill_loss(student, teacher_out: tuple, teacher: Teacher, temperature: float = 1.0, student_path: str = "",
                 mean_of=None):
    """The mean over the compared outputs of KL (classes) or scale-normalised MSE (everything else).
    `mean_of(tensor)`: the batch mean of the teacher's squares that normalises the MSE (default its mean
    here; data-parallel training takes it over every rank's share, distributed.global_mean)."""
    import torch
    import torch.nn.functional as F

    student = student if isinstance(student, tuple) else (student,)
    losses = []
    for k in teacher.compared:
        s, t = student[k], teacher_out[k]
        if s.shape != t.shape:
            raise LeanOnnxError(f"{student_path or '<student>'} and {teacher.path}: output "
                                f"{teacher.output_names[k]!r} has shape {list(s.shape)} in the student and "
                                f"{list(t.shape)} in the teacher")
        s, t = s.float(), t.float()
        if k in teacher.parts:
            losses.append(parts_loss(s, t, *teacher.parts[k], mean_of))
        elif is_classes(t):
            if k in teacher.probabilities:
                s, t = torch.log(s.clamp_min(1e-12)), torch.log(t.clamp_min(1e-12))
            kl = F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1),
                          reduction="batchmean", log_target=True)
            losses.append(temperature * temperature * kl)
        else:
            if k in teacher.sigmoids:  # compared as logits: a saturated sigmoid passes no gradient back
                s, t = logit(s), logit(t).clamp(-LOGIT_MAX, LOGIT_MAX)
            square = t ** 2
            losses.append(((s - t) ** 2).mean() / ((mean_of(square) if mean_of else square.mean()) + EPS))
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


#: a float32 sigmoid rounds to 1 above about 16.6: the teacher's logits are known up to that
LOGIT_MAX = 16.0


def mixed_loss(student, teacher_out: tuple, target, teacher: Teacher, temperature: float, alpha: float,
               labelled, student_path: str = "", mean_of=None):
    """`alpha * labelled(student, target) + (1 - alpha) * distill`; alpha 0 is pure distillation (no
    target needed), alpha 1 the labelled loss alone."""
    if alpha >= 1:
        return labelled(student, target)
    distill = distill_loss(student, teacher_out, teacher, temperature, student_path, mean_of)
    if alpha <= 0:
        return distill
    return alpha * labelled(student, target) + (1 - alpha) * distill


class Agreement:
    """Student-teacher agreement over a validation pass, per compared output."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher
        #: output -> [classes?, agreeing rows, rows] or [classes?, sum |s - t|, sum |t|]
        self.sums: dict[int, list] = {}
        #: detector outputs (score_parts.py) -> [detections both make, the teacher's, the student's]
        self.detections: dict[int, list] = {}

    def add(self, student, teacher_out: tuple) -> None:
        student = student if isinstance(student, tuple) else (student,)
        for k in self.teacher.compared:
            s, t = student[k].float(), teacher_out[k].float()
            acc = self.sums.setdefault(k, [is_classes(t), 0.0, 0.0])
            if acc[0]:
                acc[1] += float((s.argmax(1) == t.argmax(1)).sum())
                acc[2] += t.shape[0]
            else:
                acc[1] += float((s - t).abs().sum())
                acc[2] += float(t.abs().sum())
            if k in self.teacher.parts:  # a detector's output: also its detections against the teacher's
                found = self.detections.setdefault(k, [0, 0, 0])
                for i, n in enumerate(detection_counts(s, t, *self.teacher.parts[k])):
                    found[i] += n

    def reduce(self, world) -> None:
        """Add up the sums of every rank (distributed.World) so each has the whole validation's."""
        if not world.parallel:
            return
        flat = []
        for k in self.teacher.compared:
            classes, num, den = self.sums.get(k, [False, 0.0, 0.0])
            flat += [float(k in self.sums), float(classes), num, den]
        for k in self.teacher.parts:
            flat += self.detections.get(k, [0, 0, 0])
        flat = world.all_sum(flat)
        self.sums = {k: [flat[4 * i + 1] > 0, flat[4 * i + 2], flat[4 * i + 3]]
                     for i, k in enumerate(self.teacher.compared) if flat[4 * i] > 0}
        start = 4 * len(self.teacher.compared)
        self.detections = {k: [int(v) for v in flat[start + 3 * i:start + 3 * i + 3]]
                           for i, k in enumerate(self.teacher.parts) if k in self.sums}

    def result(self) -> dict:
        """{"val_top1_agreement": mean over (N, classes) outputs, "val_relative_error": mean over the
        others, "val_detection_recall": mean over detector outputs (score_parts.py), "val_agreement":
        {output name: {"top1_agreement" | "relative_error" (+ "detection_recall", "detection_precision"): value}}}."""
        per, top1, relative = {}, [], []
        for k, (classes, num, den) in sorted(self.sums.items()):
            name = self.teacher.output_names[k]
            if classes:
                top1.append(num / max(den, 1))
                per[name] = {"top1_agreement": top1[-1]}
            else:
                relative.append(num / den if den > 0 else (0.0 if num == 0 else float("inf")))
                per[name] = {"relative_error": relative[-1]}
        recalls = []
        for k, (same, theirs, mine) in sorted(self.detections.items()):
            recalls.append(same / max(theirs, 1))
            per[self.teacher.output_names[k]].update(detection_recall=recalls[-1],
                                                      detection_precision=same / max(mine, 1))
        result = {"val_detection_recall": sum(recalls) / len(recalls)} if recalls else {}
        if top1:
            result["val_top1_agreement"] = sum(top1) / len(top1)
        if relative:
            result["val_relative_error"] = sum(relative) / len(relative)
        result["val_agreement"] = per
        return result


# ------------------------------------------------------------------------------------------- interface
def check_interface(student: onnx.ModelProto, teacher: onnx.ModelProto, student_path: str, teacher_path: str) -> None:
    """The teacher must take the student's inputs (names, ranks, static dims) and give its outputs
    (names, ranks): a pruned model keeps its original's interface. One LeanOnnxError naming both files."""
    mine, theirs = _interface(student), _interface(teacher)
    for what in ("inputs", "outputs"):
        names = [name for name, _ in mine[what]], [name for name, _ in theirs[what]]
        if names[0] != names[1]:
            raise LeanOnnxError(f"{teacher_path}: the teacher's {what} {names[1]} are not those of {student_path} "
                                f"{names[0]}: --teacher must be the model {student_path} was pruned from")
        for (name, dims), (_, other) in zip(mine[what], theirs[what]):
            if dims is None or other is None:
                continue
            static = what == "inputs" and any(a is not None and b is not None and a != b for a, b in zip(dims, other))
            if len(dims) != len(other) or static:
                raise LeanOnnxError(f"{teacher_path}: the teacher's {what[:-1]} {name!r} has shape {_shown(other)}, "
                                    f"{student_path} has {_shown(dims)}: --teacher must be the model "
                                    f"{student_path} was pruned from")


def _interface(model: onnx.ModelProto) -> dict:
    inits = {t.name for t in model.graph.initializer}

    def dims(value):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]

    return {"inputs": [(i.name, dims(i)) for i in model.graph.input if i.name not in inits],
            "outputs": [(o.name, dims(o)) for o in model.graph.output]}


def _shown(dims) -> str:
    return "[" + "x".join("?" if d is None else str(d) for d in dims) + "]"
