"""Label-free recovery (issue 18): distillation from the original model, image folders, the CLI.

Tiny torch nets exported to ONNX, pruned by lean-onnx itself, trained for real (one torch thread)."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
Image = pytest.importorskip("PIL.Image")

from torch import nn  # noqa: E402

from lean_onnx import cli, prune  # noqa: E402
from lean_onnx.errors import LeanOnnxError  # noqa: E402
from lean_onnx.train.distill import Teacher, check_interface, distill_loss, mixed_loss  # noqa: E402
from lean_onnx.train.finetune import finetune  # noqa: E402
from lean_onnx.train.images import IMAGENET_MEAN, IMAGENET_STD, load_image_folder  # noqa: E402
from tests.helpers import assert_one_line_error, run_ort, text_model  # noqa: E402

SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


class Classifier(nn.Module):
    """conv 3->16, conv 16->16 stride 2, global mean, linear 16->10: (N, 10) logits."""

    def __init__(self, maps: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, stride=2),
                                  nn.ReLU())
        self.head = nn.Linear(16, 10)
        self.map = nn.Conv2d(16, 1, 1) if maps else None
        with torch.no_grad():  # a confident teacher whose top class depends on the input
            self.head.weight.mul_(30)
            self.head.bias.zero_()

    def forward(self, x):
        features = self.body(x)
        logits = self.head(features.mean((2, 3)))
        return (logits, self.map(features)) if self.map is not None else logits


class MapNet(nn.Module):
    """Conv-only: (N, 3, H, W) -> (N, 2, H, W) maps (a regression output)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 2, 1))

    def forward(self, x):
        return self.net(x) * 5.0 + 3.0  # an output scale far from 1: the loss must not care


def export(module: nn.Module, path, outputs: list[str]) -> str:
    torch.manual_seed(0)
    module.eval()
    axes = {"input": {0: "n"}, **{name: {0: "n"} for name in outputs}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=outputs, dynamic_axes=axes)
    return str(path)


def inputs(n: int, seed: int) -> np.ndarray:
    """Noise with a per-sample colour cast, so the teacher's top class varies between samples."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 3, SIZE, SIZE)) + 2 * rng.standard_normal((n, 3, 1, 1))).astype(np.float32)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """{name: (teacher path, pruned student path)}: channel-pruned to 0.3 of the MACs by lean-onnx."""
    folder = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    made = {}
    for name, module, outputs in (("cls", Classifier(), ["logits"]), ("map", MapNet(), ["maps"]),
                                  ("two", Classifier(maps=True), ["logits", "maps"])):
        teacher = export(module, folder / f"{name}.onnx", outputs)
        student = folder / f"{name}_pruned.onnx"
        onnx.save(prune(teacher, target_macs=0.3, round_channels=1).model, str(student))
        made[name] = (teacher, str(student))
    return made


def load(path: str) -> onnx.ModelProto:
    return onnx.load(path)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------------------------------- the loss
def test_kl_is_temperature_squared_times_kl_of_softened_distributions():
    teacher = Teacher(load_model_text("cls"), "t.onnx")
    s, t = torch.randn(6, 10), 3 * torch.randn(6, 10)
    T = 4.0
    p, q = torch.softmax(t / T, 1), torch.log_softmax(s / T, 1)
    expected = T * T * (p * (p.log() - q)).sum(1).mean()
    assert torch.allclose(distill_loss(s, (t,), teacher, T), expected, rtol=1e-5)
    assert float(distill_loss(t, (t,), teacher, T)) == pytest.approx(0, abs=1e-6)


def test_regression_loss_is_scale_normalised():
    teacher = Teacher(load_model_text("map"), "t.onnx")
    t = torch.randn(2, 2, 4, 4)
    for scale in (1e-2, 1.0, 1e3):  # a student that outputs zeros scores 1 whatever the units
        assert float(distill_loss(torch.zeros_like(t), (scale * t,), teacher)) == pytest.approx(1, rel=1e-3)
    assert float(distill_loss(1.1 * t, (t,), teacher)) == pytest.approx(0.01, rel=1e-3)


def test_several_outputs_average_and_alpha_mixes(nets):
    teacher = Teacher(load(nets["two"][0]), "two.onnx")
    x = torch.from_numpy(inputs(4, 1))
    t = teacher(x)
    s = (t[0] + torch.randn_like(t[0]), t[1] * 0.5)
    one = distill_loss((s[0],), (t[0],), Teacher(load(nets["cls"][0]), "cls.onnx"))
    two = float(((s[1] - t[1]) ** 2).mean() / ((t[1] ** 2).mean() + 1e-8))
    assert float(distill_loss(s, t, teacher)) == pytest.approx((float(one) + two) / 2, rel=1e-5)
    y = torch.tensor([0, 1, 2, 3])

    def labelled(out, target):
        return torch.nn.functional.cross_entropy(out[0], target)

    mixed = mixed_loss(s, t, y, teacher, 4.0, 0.25, labelled)
    want = 0.25 * float(labelled(s, y)) + 0.75 * float(distill_loss(s, t, teacher, 4.0))
    assert float(mixed) == pytest.approx(want, rel=1e-5)
    pure = mixed_loss(s, t, None, teacher, 4.0, 0.0, labelled)
    assert float(pure) == pytest.approx(float(distill_loss(s, t, teacher, 4.0)))
    assert float(mixed_loss(s, None, y, teacher, 4.0, 1.0, labelled)) == pytest.approx(float(labelled(s, y)))


def load_model_text(kind: str) -> onnx.ModelProto:
    """A one-node model with a (N, 10) or a (N, 2, 4, 4) output, for the loss's bookkeeping."""
    if kind == "cls":
        return text_model("g (float[N, 10] x) => (float[N, 10] y) { y = Identity (x) }")
    return text_model("g (float[N, 2, 4, 4] x) => (float[N, 2, 4, 4] y) { y = Identity (x) }")


# ------------------------------------------------------------------------------------------- training
def test_distillation_from_the_original_recovers_the_pruned_classifier(nets):
    teacher_path, student_path = nets["cls"]
    student, teacher = load(student_path), load(teacher_path)
    train, val = {"inputs": inputs(40, 1)}, {"inputs": inputs(40, 2)}  # inputs only: no labels
    trained, history = finetune(student, train, val, epochs=4, batch=8, lr=3e-3, teacher=teacher,
                                teacher_path=teacher_path)
    before, after = history[0], history[-1]
    assert [row["epoch"] for row in history] == [0, 1, 2, 3, 4]
    assert after["val_loss"] < 0.5 * before["val_loss"]  # the distillation loss falls
    assert history[-1]["train_loss"] < history[1]["train_loss"]
    assert before["val_top1_agreement"] < 0.9 and after["val_top1_agreement"] > before["val_top1_agreement"]
    assert set(after["val_agreement"]) == {"logits"}
    # OUT keeps the student's (pruned) shapes and the interface names
    assert {k: v.shape for k, v in weights(trained).items()} == {k: v.shape for k, v in weights(student).items()}
    assert [i.name for i in trained.graph.input] == ["input"] and [o.name for o in trained.graph.output] == ["logits"]
    onnx.checker.check_model(trained, full_check=True)
    assert run_ort(trained, {"input": val["inputs"][:3]})[0].shape == (3, 10)


def test_the_teacher_is_never_changed(nets):
    teacher_path, student_path = nets["cls"]
    proto = load(teacher_path)
    frozen = proto.SerializeToString()
    teacher = Teacher(proto, teacher_path)
    state = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    assert not any(p.requires_grad for p in teacher.module.parameters())
    finetune(load(student_path), {"inputs": inputs(16, 1)}, {"inputs": inputs(8, 2)}, epochs=2, batch=4, lr=1e-2,
             teacher=teacher)
    after = teacher.module.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert proto.SerializeToString() == frozen
    assert not teacher.module.training


def test_teacher_runs_on_every_batch_never_cached(nets):
    """Each batch (augmented ones included) gets the teacher's outputs of that very batch."""
    teacher_path, student_path = nets["cls"]

    class Counting(Teacher):
        calls = []

        def __call__(self, x):
            self.calls.append(x.clone())
            return super().__call__(x)

    teacher = Counting(load(teacher_path), teacher_path)
    finetune(load(student_path), {"inputs": inputs(12, 1)}, None, epochs=2, batch=4, crop=8, teacher=teacher)
    assert len(teacher.calls) == 2 * 3 and all(x.shape == (4, 3, 8, 8) for x in teacher.calls)
    assert not torch.equal(teacher.calls[0], teacher.calls[3])  # new crops in epoch 2, new teacher outputs


def test_pruned_kernels_stay_zero_while_distilling(nets):
    teacher_path, student_path = nets["cls"]
    student = load(student_path)
    name = next(n.input[1] for n in student.graph.node if n.op_type == "Conv")
    for k, t in enumerate(student.graph.initializer):
        if t.name == name:
            w = onnx.numpy_helper.to_array(t).copy()
            w.reshape(-1, 9)[::2] = 0
            student.graph.initializer[k].CopyFrom(onnx.numpy_helper.from_array(w, name))
    dead = weights(student)[name].reshape(-1, 9).any(1) == 0
    trained, _ = finetune(student, {"inputs": inputs(16, 1)}, None, epochs=2, batch=4, lr=1e-2,
                          teacher=load(teacher_path))
    after = weights(trained)[name].reshape(-1, 9)
    assert dead.sum() > 0 and np.all(after[dead] == 0) and np.all(after[~dead].any(1))
    assert not np.array_equal(after, weights(student)[name].reshape(-1, 9))


def test_map_output_regression_and_two_outputs(nets):
    for name, keys in (("map", {"val_relative_error"}), ("two", {"val_relative_error", "val_top1_agreement"})):
        teacher_path, student_path = nets[name]
        _, history = finetune(load(student_path), {"inputs": inputs(24, 1)}, {"inputs": inputs(12, 2)}, epochs=3,
                              batch=6, lr=3e-3, teacher=load(teacher_path))
        assert keys <= set(history[-1]) and history[-1]["val_loss"] < history[0]["val_loss"], name
        if name == "map":
            assert history[-1]["val_relative_error"] < 0.8 * history[0]["val_relative_error"]
    assert set(history[-1]["val_agreement"]) == {"logits", "maps"}  # the mean of both outputs' losses fell


def test_alpha_with_targets_and_its_errors(nets):
    teacher_path, student_path = nets["cls"]
    x = inputs(12, 1)
    data = {"inputs": x, "targets": np.arange(12) % 10}
    _, history = finetune(load(student_path), data, data, epochs=1, batch=6, teacher=load(teacher_path), alpha=0.5)
    assert {"val_accuracy", "val_top1_agreement"} <= set(history[-1])
    with pytest.raises(LeanOnnxError, match="needs --teacher"):
        finetune(load(student_path), data, epochs=1, alpha=0.5)
    with pytest.raises(LeanOnnxError, match="no 'targets'"):
        finetune(load(student_path), {"inputs": x}, epochs=1, teacher=load(teacher_path), alpha=0.5)
    with pytest.raises(LeanOnnxError, match="no 'targets'"):
        finetune(load(student_path), {"inputs": x}, epochs=1)


def test_interface_mismatch_names_both_files(nets):
    with pytest.raises(LeanOnnxError, match=r"map\.onnx.*cls_pruned\.onnx"):
        check_interface(load(nets["cls"][1]), load(nets["map"][0]), "cls_pruned.onnx", "map.onnx")
    check_interface(load(nets["cls"][1]), load(nets["cls"][0]), "a", "b")


# ----------------------------------------------------------------------------------------- image folders
def solid(colour, size=(40, 30)) -> "Image.Image":
    return Image.new("RGB", size, colour)


@pytest.fixture
def photos(tmp_path):
    """photos/a/{0,1}.png, photos/b/c/2.jpg, a large photos/big.jpeg, photos/small.bmp, a broken bad.jpg and
    a notes.txt."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "b" / "c").mkdir(parents=True)
    solid((255, 0, 0)).save(root / "a" / "0.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "a" / "1.png")
    solid((0, 128, 255)).save(root / "b" / "c" / "2.jpg", quality=95)
    solid((10, 200, 30), size=(300, 200)).save(root / "big.jpeg")
    solid((90, 90, 90), size=(20, 24)).save(root / "small.bmp")
    (root / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg " * 10)
    (root / "notes.txt").write_text("photos from the lab")
    return root


def model_with_input(shape: str) -> onnx.ModelProto:
    return text_model(f"g (float[{shape}] x) => (float[{shape}] y) {{ y = Relu (x) }}")


def test_folder_skips_broken_files_by_name_and_normalises(photos):
    folder = load_image_folder(str(photos), model_with_input(f"N,3,{SIZE},{SIZE}"))
    assert folder.names == ["a/0.png", "a/1.png", "b/c/2.jpg", "big.jpeg", "small.bmp"]  # sorted, recursive
    assert [name for name, _ in folder.skipped] == ["bad.jpg", "notes.txt"] and len(folder) == 5
    assert "not a readable image" in folder.skipped[0][1]
    assert min(folder.images[3].shape[:2]) == 2 * SIZE  # the 300 x 200 photo was downscaled on load
    assert folder.images[4].shape == (24, 20, 3) and folder.images[4].dtype == np.uint8
    x, y = folder.batch(np.arange(4), None)
    assert y is None and x.shape == (4, 3, SIZE, SIZE) and x.dtype == np.float32
    red = (np.array([1.0, 0.0, 0.0]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x[0].mean((1, 2)), red, rtol=1e-5)
    np.testing.assert_allclose(x[0], np.broadcast_to(red[:, None, None], x[0].shape), rtol=1e-5)


def test_layout_channel_order_and_grayscale(photos):
    kwargs = dict(input_size=None)
    nchw = load_image_folder(str(photos), model_with_input(f"N,3,{SIZE},{SIZE}"), **kwargs).batch(np.arange(4), None)[0]
    nhwc = load_image_folder(str(photos), model_with_input(f"N,{SIZE},{SIZE},3"), **kwargs)
    assert nhwc.layout == "NHWC"
    np.testing.assert_array_equal(nhwc.batch(np.arange(4), None)[0], nchw.transpose(0, 2, 3, 1))
    bgr = load_image_folder(str(photos), model_with_input(f"N,3,{SIZE},{SIZE}"), channel_order="bgr")
    np.testing.assert_array_equal(bgr.batch(np.arange(4), None)[0], nchw[:, ::-1])
    gray = load_image_folder(str(photos), model_with_input("1,1,8,12"))
    g = gray.batch([0], None)[0]
    assert g.shape == (1, 1, 8, 12)
    luma = np.asarray(solid((255, 0, 0)).convert("L"), np.float32)[0, 0] / 255
    np.testing.assert_allclose(g, (luma - np.mean(IMAGENET_MEAN)) / np.mean(IMAGENET_STD), rtol=1e-5)
    with pytest.raises(LeanOnnxError, match="--input-size"):
        load_image_folder(str(photos), model_with_input("N,3,H,W"))
    assert load_image_folder(str(photos), model_with_input("N,3,H,W"), input_size=(8, 10)).size == (8, 10)


def test_augmented_crops_are_seeded_and_many_per_epoch(photos):
    folder = load_image_folder(str(photos), model_with_input(f"N,3,{SIZE},{SIZE}"), augment=True,
                               samples_per_epoch=10)
    assert len(folder) == 10
    order = folder.order(np.random.default_rng(0))
    assert len(order) == 10 and set(order[:5]) == set(range(5))  # whole passes over the images first
    first, again = (folder.batch([1, 1, 1], np.random.default_rng(5))[0] for _ in range(2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], first[1])  # new crops each draw
    centre = folder.batch([1], None)[0]
    assert centre.shape == first[:1].shape and not np.array_equal(centre[0], first[0])


def test_distilling_on_a_folder_is_deterministic(photos, nets):
    teacher_path, student_path = nets["cls"]
    model = load(student_path)
    runs = []
    for _ in range(2):
        folder = load_image_folder(str(photos), model, augment=True, samples_per_epoch=8)
        runs.append(weights(finetune(model, folder, None, epochs=1, batch=4, teacher=load(teacher_path))[0]))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_distils_on_a_photo_folder(photos, nets, tmp_path, capsys):
    teacher_path, student_path = nets["cls"]
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = cli.main(["finetune", student_path, str(out), "--teacher", teacher_path, "--data", str(photos),
                     "--val-data", str(photos), "--epochs", "1", "--batch", "2", "--samples-per-epoch", "6",
                     "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"[W] {os.path.join(str(photos), 'bad.jpg')}: not a readable image" in err
    assert "val_top1_agreement" in err and "epoch 1/1" in err
    trained = onnx.load(str(out))
    shapes = {k: v.shape for k, v in weights(load(student_path)).items()}
    assert {k: v.shape for k, v in weights(trained).items()} == shapes
    data = json.loads(report.read_text())
    assert [row["epoch"] for row in data["epochs"]] == [0, 1]
    assert 0 <= data["epochs"][1]["val_top1_agreement"] <= 1 and data["epochs"][1]["seconds"] > 0
    settings = data["settings"]
    assert settings["teacher"] == teacher_path and settings["temperature"] == 1.0 and settings["alpha"] == 0.0
    # reconstructed first, on the first crops of the folder, then distilled at RECONSTRUCTED_LR
    assert data["calibration"]["method"] == "reconstruct" and data["calibration"]["samples"] == 6
    assert settings["lr"] == 5e-5
    assert settings["augment"] is True and settings["input_size"] == [SIZE, SIZE] and settings["layout"] == "NCHW"
    assert settings["samples_per_epoch"] == 6 and settings["channel_order"] == "rgb"
    assert settings["mean"] == pytest.approx(IMAGENET_MEAN) and settings["std"] == pytest.approx(IMAGENET_STD)
    assert [s["file"] for s in data["skipped"]["data"]] == ["bad.jpg", "notes.txt"]


@pytest.mark.parametrize("problem, needle", [
    ("missing_teacher", "--teacher"), ("broken_teacher", "not a readable ONNX model"),
    ("mismatch", "map.onnx"), ("alpha_range", "--alpha 1.5"), ("alpha_alone", "needs --teacher"),
    ("temperature", "--temperature"), ("mean_units", "--mean"), ("mean_text", "--mean"), ("std_zero", "--std"),
    ("size", "--input-size"), ("empty_folder", "no readable image"), ("no_targets", "targets"),
    ("folder_no_teacher", "--teacher"), ("mean_on_npz", "image folders")])
def test_cli_bad_input_is_one_error_line(nets, tmp_path, capsys, problem, needle):
    teacher_path, student_path = nets["cls"]
    npz = tmp_path / "x.npz"
    np.savez(npz, inputs=inputs(4, 0))
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.md").write_text("no photos yet")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    teach = ["--teacher", teacher_path]
    extra = {"missing_teacher": ["--teacher", str(tmp_path / "nope.onnx"), "--data", str(npz)],
             "broken_teacher": ["--teacher", str(broken), "--data", str(npz)],
             "mismatch": ["--teacher", nets["map"][0], "--data", str(npz)],
             "alpha_range": teach + ["--alpha", "1.5", "--data", str(npz)],
             "alpha_alone": ["--alpha", "0.5", "--data", str(npz)],
             "temperature": teach + ["--temperature", "0", "--data", str(npz)],
             "mean_units": teach + ["--mean", "124,117,104", "--data", str(empty)],
             "mean_text": teach + ["--mean", "a,b,c", "--data", str(empty)],
             "std_zero": teach + ["--std", "0,0.2,0.2", "--data", str(empty)],
             "size": teach + ["--input-size", "0,16", "--data", str(empty)],
             "empty_folder": teach + ["--data", str(empty)],
             "no_targets": ["--data", str(npz)],
             "folder_no_teacher": ["--data", str(empty)],
             "mean_on_npz": teach + ["--mean", "0.5,0.5,0.5", "--data", str(npz)]}[problem]
    code = cli.main(["finetune", student_path, str(tmp_path / "out.onnx")] + extra)
    assert_one_line_error(code, capsys.readouterr().err, 2, needle)
    assert not (tmp_path / "out.onnx").exists()


def test_a_saturated_sigmoid_output_still_learns(tmp_path):
    """A Sigmoid output is compared as logits: at pre-sigmoid -30 the gradient reaching the student's
    pre-sigmoid value is about 1 per element (an MSE on the probabilities would pass about e^-30)."""
    import onnx.helper as oh

    from lean_onnx.train.distill import Teacher, distill_loss

    graph = oh.make_graph([oh.make_node("Sigmoid", ["x"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 4, 4])])
    teacher = Teacher(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), "sigmoid.onnx")
    assert teacher.sigmoids == {0}
    z = torch.full((1, 1, 4, 4), -30.0, requires_grad=True)
    target = torch.sigmoid(torch.full((1, 1, 4, 4), 2.0))
    distill_loss((torch.sigmoid(z),), (target,), teacher).backward()
    # d/dz of mean((z - 2)^2) / mean(2^2) = 2 (z - 2) / (16 * 4) per element
    assert torch.allclose(z.grad, torch.full_like(z, 2 * (-32.0) / 64), rtol=1e-3)
