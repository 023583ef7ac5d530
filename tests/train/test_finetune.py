"""Fine-tuning: the loss goes down, pruned kernels stay zero, a seed fixes the result, the CLI behaves."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from lean_onnx import cli  # noqa: E402
from lean_onnx.errors import LeanOnnxError  # noqa: E402
from lean_onnx.train.bridge import to_torch  # noqa: E402
from lean_onnx.train.circle_square import first_images  # noqa: E402
from lean_onnx.train.finetune import evaluate, finetune, resolve_device  # noqa: E402
from tests.helpers import rand, run_ort, text_model, zoo_path  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


@pytest.fixture(scope="module")
def tiny_cs():
    """Four Circle-Square images cut to 64x64 (the stream's first images, labels 0-4)."""
    data = first_images(4)
    return {"inputs": data["inputs"][:, :, 96:160, 96:160].copy(), "targets": data["targets"][:, 96:160, 96:160].copy()}


@pytest.fixture(scope="module")
def msd(zoo_cache):
    return onnx.load(zoo_path("msd", True, zoo_cache))


def conv_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    convs = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name in convs}


def test_one_epoch_lowers_the_training_loss(msd, tiny_cs):
    before = evaluate(to_torch(msd), tiny_cs)["val_loss"]
    trained, history = finetune(msd, tiny_cs, tiny_cs, epochs=1, batch=2, crop=32, seed=0)
    assert len(history) == 1 and history[0]["val_loss"] < before
    assert 0 <= history[0]["val_accuracy"] <= 1
    onnx.checker.check_model(trained, full_check=True)
    x = tiny_cs["inputs"][:1, :, :32, :32]
    assert run_ort(trained, {"input": x})[0].shape == (1, 5, 32, 32)


def test_pruned_kernels_stay_exactly_zero(msd, tiny_cs):
    """Zero every other kernel of every 3x3 layer (a masked model); training must not revive them."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(msd)
    zeroed = {}
    for k, t in enumerate(pruned.graph.initializer):
        w = onnx.numpy_helper.to_array(t)
        if w.ndim == 4 and w.shape[-1] == 3:
            w = w.copy()
            w.reshape(-1, 9)[1::2] = 0  # odd kernels: every layer still reads the input image
            zeroed[t.name] = w.reshape(w.shape[0], w.shape[1], -1).any(-1)
            pruned.graph.initializer[k].CopyFrom(onnx.numpy_helper.from_array(w, t.name))
    trained, _ = finetune(pruned, tiny_cs, None, epochs=1, batch=2, crop=32, seed=0)
    after, before = conv_weights(trained), conv_weights(pruned)
    for name, alive in zeroed.items():
        kernels = after[name].reshape(alive.shape + (-1,))
        assert np.all(kernels[~alive] == 0), name
    changed = [name for name in zeroed if not np.array_equal(after[name], before[name])]
    assert len(changed) == len(zeroed)


def test_same_seed_same_weights(msd, tiny_cs):
    runs = [finetune(msd, tiny_cs, None, epochs=1, batch=2, crop=32, seed=seed)[0] for seed in (3, 3, 4)]
    first, again, other = (conv_weights(m) for m in runs)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first)


def test_carried_adam_state_continues_the_same_training(msd, tiny_cs):
    """One batch of all samples and no crops make the shuffle irrelevant: 2 epochs in one call equal 1
    epoch and then 1 more started from the first call's Adam state (step count and moments, by
    initializer name); a fresh Adam for the second epoch gives other weights."""
    data = {"inputs": tiny_cs["inputs"][:, :, :32, :32].copy(), "targets": tiny_cs["targets"][:, :32, :32].copy()}
    both, _ = finetune(msd, data, epochs=2, batch=4, seed=3)
    state = {}
    first, _ = finetune(msd, data, epochs=1, batch=4, seed=3, state_out=state)
    assert state and all(int(s["step"]) == 1 for s in state.values())
    second, _ = finetune(first, data, epochs=1, batch=4, seed=3, optimizer_state=state)
    fresh, _ = finetune(first, data, epochs=1, batch=4, seed=3)
    want = conv_weights(both)
    assert conv_weights(second).keys() == want.keys()
    assert all(np.array_equal(a, want[k]) for k, a in conv_weights(second).items())
    assert not all(np.array_equal(a, want[k]) for k, a in conv_weights(fresh).items())


def test_float_targets_use_mse():
    model = text_model("g (float[1, 1, 8, 8] x) => (float[1, 1, 8, 8] y) { y = Conv <pads = [1, 1, 1, 1]> (x, w, b) }",
                       {"w": rand(1, 1, 3, 3), "b": rand(1)})
    x = rand(6, 1, 8, 8)
    data = {"inputs": x, "targets": 2 * x}
    trained, history = finetune(model, data, data, epochs=3, batch=3, lr=1e-2, seed=0)
    assert "val_accuracy" not in history[0] and history[-1]["val_loss"] < history[0]["val_loss"]


def test_crop_needs_dense_targets(msd):
    data = {"inputs": rand(2, 1, 32, 32), "targets": np.zeros(2, np.int64)}
    with pytest.raises(LeanOnnxError, match="--crop"):
        finetune(msd, data, None, epochs=1, crop=16)


def test_cli_writes_a_valid_model_and_report(msd, tiny_cs, tmp_path, capsys):
    model_path = tmp_path / "msd.onnx"
    onnx.save(msd, str(model_path))
    data = tmp_path / "train.npz"
    np.savez(data, inputs=tiny_cs["inputs"][:, :, :32, :32], targets=tiny_cs["targets"][:, :32, :32])
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = cli.main(["finetune", str(model_path), str(out), "--data", str(data), "--val-data", str(data),
                     "--epochs", "2", "--batch", "2", "--report", str(report)])
    assert code == 0
    trained = onnx.load(str(out))
    onnx.checker.check_model(trained, full_check=True)
    assert [i.name for i in trained.graph.input] == ["input"] and trained.opset_import == msd.opset_import
    epochs = json.loads(report.read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and "val_accuracy" in epochs[0]
    assert "epoch 2/2" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["missing", "not_npz", "no_targets"])
def test_cli_bad_data_is_one_error_line(msd, tmp_path, capsys, problem):
    model_path = tmp_path / "msd.onnx"
    onnx.save(msd, str(model_path))
    data = tmp_path / "data.npz"
    if problem == "not_npz":
        data.write_text("not an archive")
    elif problem == "no_targets":
        np.savez(data, inputs=rand(2, 1, 32, 32))
    code = cli.main(["finetune", str(model_path), str(tmp_path / "out.onnx"), "--data", str(data)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("[E] ") and "data" in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_device_auto_is_cuda_only_when_torch_sees_a_gpu():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(LeanOnnxError, match="choose auto, cpu, cuda"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == "cuda:0"
        with pytest.raises(LeanOnnxError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(LeanOnnxError, match="sees no CUDA GPU"):
            resolve_device("cuda")


def test_explicit_cpu_equals_auto_here(msd, tiny_cs):
    """On a machine without a GPU, --device auto is the CPU run, bit for bit."""
    if torch.cuda.is_available():
        pytest.skip("auto means CUDA on this machine")
    runs = [finetune(msd, tiny_cs, None, epochs=1, batch=2, crop=32, seed=1, device=d)[0] for d in ("auto", "cpu")]
    first, second = (conv_weights(m) for m in runs)
    assert all(np.array_equal(first[k], second[k]) for k in first)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_missing_gpu_is_one_error_line_and_no_output(msd, tiny_cs, tmp_path, capsys):
    model_path = tmp_path / "msd.onnx"
    onnx.save(msd, str(model_path))
    data = tmp_path / "train.npz"
    np.savez(data, inputs=tiny_cs["inputs"][:, :, :32, :32], targets=tiny_cs["targets"][:, :32, :32])
    code = cli.main(["finetune", str(model_path), str(tmp_path / "out.onnx"), "--data", str(data),
                     "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("[E] ") and "--device cuda" in err[-1] and "no CUDA" in err[-1]
    assert not (tmp_path / "out.onnx").exists()
