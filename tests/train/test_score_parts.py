"""Detector outputs of boxes and sigmoid scores, distilled part by part (train/score_parts.py)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from lean_onnx import prune  # noqa: E402
from lean_onnx.train.distill import Teacher, distill_loss  # noqa: E402
from lean_onnx.train.finetune import finetune  # noqa: E402
from lean_onnx.train.score_parts import ANCHOR_FLOOR, DETECTION_SCORE, SCORE_WEIGHT, parts_loss, score_parts  # noqa: E402
from tests.helpers import run_ort  # noqa: E402

SIZE = 16
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


class Detector(nn.Module):
    """A YOLO-shaped head: (N, 3, 16, 16) -> (N, 4 + 3, 64) = Concat(boxes in pixels, Sigmoid(class scores))
    over the 8 x 8 anchors, the scores mostly near 0 (a bias of -4)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, stride=2),
                                  nn.ReLU())
        self.box = nn.Conv2d(32, 4, 1)
        self.cls = nn.Conv2d(32, 3, 1)
        with torch.no_grad():
            self.cls.weight.mul_(20)
            self.cls.bias.fill_(-4.0)

    def forward(self, x):
        f = self.body(x)
        boxes = self.box(f).flatten(2) * 40 + 100
        return torch.cat([boxes, torch.sigmoid(self.cls(f).flatten(2))], 1)


def inputs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 3, SIZE, SIZE)) + 2 * rng.standard_normal((n, 3, 1, 1))).astype(np.float32)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """(teacher path, student pruned by lean-onnx to 0.3 of the MACs)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("det") / "det.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Detector().eval(), (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["output0"],
                          dynamic_axes={"images": {0: "n"}, "output0": {0: "n"}})
    return str(path), prune(str(path), target_macs=0.3, round_channels=1).model


def test_the_split_is_found_on_the_teachers_graph(detector):
    teacher = onnx.load(detector[0])
    assert score_parts(teacher) == {0: (1, [(0, 4, False), (4, 7, True)])}
    assert Teacher(teacher, "det.onnx").parts == {0: (1, [(0, 4, False), (4, 7, True)])}
    plain = onnx.load(detector[0])  # the same graph without the Sigmoid: nothing to split
    for node in plain.graph.node:
        if node.op_type == "Sigmoid":
            node.op_type = "Relu"
    assert score_parts(plain) == {}


def test_the_loss_is_score_weighted_box_error_and_bernoulli_kl_over_the_teachers_entropy(detector):
    teacher = Teacher(onnx.load(detector[0]), "det.onnx")
    gen = torch.Generator().manual_seed(0)
    t = torch.cat([100 + 40 * torch.randn(2, 4, 64, generator=gen), torch.rand(2, 3, 64, generator=gen) ** 4], 1)
    s = torch.cat([t[:, :4] * 1.1, torch.rand(2, 3, 64, generator=gen).clamp(0.01, 0.99)], 1)
    sure = t[:, 4:].amax(1, keepdim=True) + ANCHOR_FLOOR  # per anchor: the teacher's best score
    boxes = (sure * (s[:, :4] - t[:, :4]) ** 2).mean() / (sure * t[:, :4] ** 2).mean()
    p, q = s[:, 4:].double(), t[:, 4:].double().clamp(1e-7, 1 - 1e-7)
    kl = (q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()).mean()
    entropy = -(q * q.log() + (1 - q) * (1 - q).log()).mean()
    expected = (boxes + SCORE_WEIGHT * kl / entropy) / (1 + SCORE_WEIGHT)
    assert float(distill_loss(s, (t,), teacher)) == pytest.approx(float(expected), rel=1e-4)
    assert float(parts_loss(t, t, 1, [(0, 4, False), (4, 7, True)])) == pytest.approx(0, abs=1e-5)


def test_a_saturated_score_still_learns():
    """The student's score at pre-sigmoid -30 against a teacher's 0.9: the gradient at its logit is
    (p - q) / (elements x the teacher's mean entropy) / (1 + SCORE_WEIGHT), not e^-30."""
    z = torch.full((1, 1, 8), -30.0, requires_grad=True)
    t = torch.cat([torch.ones(1, 2, 8), torch.full((1, 1, 8), 0.9)], 1)
    s = torch.cat([torch.ones(1, 2, 8), torch.sigmoid(z)], 1)
    parts_loss(s, t, 1, [(0, 2, False), (2, 3, True)]).backward()
    q = torch.tensor(0.9)
    entropy = -(q * q.log() + (1 - q) * (1 - q).log())
    expected = (torch.sigmoid(torch.tensor(-30.0)) - q) / 8 / entropy / (1 + SCORE_WEIGHT)
    assert torch.allclose(z.grad, torch.full_like(z, float(expected)), rtol=1e-3)


def _recall(model: onnx.ModelProto, reference: np.ndarray, x: np.ndarray, score: float = 0.5) -> float:
    """Of the teacher's detections (score >= `score`), the share the model also makes with the same class."""
    out = run_ort(model, {"images": x})[0]
    theirs = reference[:, 4:].max(1) >= score
    same = theirs & (out[:, 4:].max(1) >= score) & (out[:, 4:].argmax(1) == reference[:, 4:].argmax(1))
    return float(same.sum() / max(theirs.sum(), 1))


def test_distilling_the_pruned_detector_brings_its_detections_back(detector, monkeypatch):
    """Pruned to 0.3 of the MACs the tiny detector keeps almost none of the teacher's detections; the split
    loss brings most back, where the whole-output squared error (the boxes' error, in effect) does not."""
    from lean_onnx.train import distill

    teacher_path, student = detector
    teacher = onnx.load(teacher_path)
    held_out = inputs(32, 1)
    reference = run_ort(teacher, {"images": held_out})[0]
    assert (reference[:, 4:].max(1) >= 0.5).sum() >= 100  # the teacher detects things
    before = _recall(student, reference, held_out)
    assert before < 0.1

    def distilled():
        trained, history = finetune(student, {"inputs": inputs(128, 0)}, {"inputs": held_out}, epochs=4, lr=1e-3,
                                    batch=8, seed=0, teacher=teacher)
        assert history[-1]["train_loss"] < history[1]["train_loss"]
        return _recall(trained, reference, held_out), history, trained

    split, history, trained = distilled()
    # the validation rows count the detections too (at DETECTION_SCORE), before training and after each epoch
    assert history[0]["val_detection_recall"] == pytest.approx(_recall(student, reference, held_out, DETECTION_SCORE),
                                                               abs=0.02)
    assert history[-1]["val_detection_recall"] == pytest.approx(
        _recall(trained, reference, held_out, DETECTION_SCORE), abs=0.02)
    assert set(history[-1]["val_agreement"]["output0"]) == {"relative_error", "detection_recall",
                                                            "detection_precision"}
    monkeypatch.setattr(distill, "score_parts", lambda model: {})  # the output compared as a whole
    whole = distilled()[0]
    assert split >= 0.5 and split >= whole + 0.3, (split, whole)

