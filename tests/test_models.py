"""Tests for models/: MS-D definition, U-Net, and the ONNX test-model zoo."""
from __future__ import annotations

import collections
import os
import pathlib
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from models import zoo  # noqa: E402
from models.msd import MSD, symmetric_pad2d  # noqa: E402
from models.unet import UNet4  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
FAST_SIZE = 64


# ----------------------------------------------------------------------------------------------- MS-D
def test_msd_sizes():
    m = MSD()
    assert m.n_kernels_3x3() == 1275
    assert sum(p.numel() for p in m.parameters()) == 11785
    n3 = sum(l.conv.weight.numel() + l.conv.bias.numel() for l in m.layers)
    assert n3 == 1275 * 9 + 50
    assert m.final.weight.shape == (5, 51, 1, 1) and m.final.bias.shape == (5,)
    assert [l.dilation for l in m.layers[:12]] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]
    assert all(l.conv.weight.shape[1] == 1 + k for k, l in enumerate(m.layers))


def test_msd_init():
    torch.manual_seed(0)
    m = MSD()
    w = torch.cat([l.conv.weight.flatten() for l in m.layers])
    std = np.sqrt(2 / (9 * 50 + 5))
    assert abs(w.std().item() - std) < 0.1 * std
    assert all(torch.all(l.conv.bias == 0) for l in m.layers)
    assert m.final.weight.abs().sum() > 0 and torch.all(m.final.bias == 0)
    assert torch.all(MSD(final_init_std=0).final.weight == 0)


@pytest.mark.parametrize("p", [1, 2, 3, 5])
def test_symmetric_pad_matches_numpy(p):
    x = np.random.default_rng(p).standard_normal((2, 3, 5, 7)).astype(np.float32)
    got = symmetric_pad2d(torch.from_numpy(x), p).numpy()
    want = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="symmetric")
    np.testing.assert_array_equal(got, want)


def _np_valid_dilated_conv(x, w, b, d):
    """Cross-correlation without padding: x (C,H,W), w (O,C,3,3) -> (O, H-2d, W-2d)."""
    c, h, wd = x.shape
    ho, wo = h - 2 * d, wd - 2 * d
    out = np.zeros((w.shape[0], ho, wo), np.float64) + b[:, None, None]
    for i in range(3):
        for j in range(3):
            patch = x[:, i * d : i * d + ho, j * d : j * d + wo]
            out += np.einsum("oc,chw->ohw", w[:, :, i, j], patch)
    return out


@pytest.mark.parametrize("k", [0, 3, 9, 12])
def test_msd_layer_matches_numpy_reference(k):
    torch.manual_seed(1)
    m = MSD(depth=13)
    layer = m.layers[k]
    d = layer.dilation
    with torch.no_grad():  # non-trivial bias so the reference checks it
        layer.conv.bias.normal_()
    x = np.random.default_rng(k).standard_normal((1, 1 + k, 12, 11)).astype(np.float32)
    got = layer(torch.from_numpy(x)).detach().numpy()[0]
    xp = np.pad(x[0].astype(np.float64), ((0, 0), (d, d), (d, d)), mode="symmetric")
    ref = _np_valid_dilated_conv(xp, layer.conv.weight.detach().double().numpy(), layer.conv.bias.detach().double().numpy(), d)
    ref = np.maximum(ref, 0)
    assert got.shape == ref.shape == (1, 12, 11)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_msd_forward_dense_and_scaler():
    torch.manual_seed(2)
    m = MSD(depth=4, dilations=[1, 2], input_mean=0.5, input_std=2.0).eval()
    x = torch.randn(2, 1, 9, 10)
    with torch.no_grad():
        y = m(x)
        # manual forward
        feats = [(x - 0.5) / 2.0]
        for l in m.layers:
            feats.append(l(torch.cat(feats, 1)))
        ref = m.final(torch.cat(feats, 1))
    assert y.shape == (2, 5, 9, 10)
    torch.testing.assert_close(y, ref)
    assert y.std() > 0  # untrained model is not constant


@pytest.mark.parametrize("width", [1, 2])
def test_msd_forward_taps_equals_forward_with_gradients(width):
    torch.manual_seed(3)
    m = MSD(depth=12, width=width, dilations=range(1, 6), input_mean=0.2, input_std=1.3)
    x, y = torch.randn(2, 1, 13, 11), torch.randint(0, 5, (2, 13, 11))
    grads = []
    for forward in (m.forward, m.forward_taps):
        m.zero_grad()
        out = forward(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        grads.append((out.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    for k, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_unet4_shapes():
    for pool in ("max", "avg"):
        u = UNet4(pool=pool).eval()
        with torch.no_grad():
            assert u(torch.randn(2, 1, 32, 48)).shape == (2, 5, 32, 48)
    with pytest.raises(ValueError):
        UNet4(pool="min")


# ------------------------------------------------------------------------------------------------ zoo
def test_zoo_api():
    assert len(zoo.ZOO) == 13 and set(zoo.FAST) <= set(zoo.ZOO)
    assert zoo.input_shape("msd") == (1, 1, 64, 64)
    assert zoo.input_shape("unet4", 32) == (1, 1, 32, 32)
    assert zoo.input_shape("resnet18") == (1, 3, 224, 224)
    assert zoo.input_shape("resnet18", 64) == (1, 3, 64, 64)
    assert zoo.input_shape("vgg11_bn", 64) == (1, 3, 224, 224)  # exporter limitation, rounded up
    with pytest.raises(KeyError):
        zoo.build("nope")
    a, b = zoo.build("resnet18"), zoo.build("resnet18")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not a.training
    bn = a.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
    assert zoo.count_batchnorm("msd") == 0


def _bn_stats(model_proto):
    """(#BatchNormalization nodes, #BN nodes whose input comes straight from a Conv)."""
    producer = {o: n for n in model_proto.graph.node for o in n.output}
    bns = [n for n in model_proto.graph.node if n.op_type == "BatchNormalization"]
    after_conv = [n for n in bns if n.input[0] in producer and producer[n.input[0]].op_type in ("Conv", "ConvTranspose")]
    return len(bns), len(after_conv)


def _check_export(name, path, fold_bn, n_bn_modules, image_size=FAST_SIZE):
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["output"]
    n_bn, n_bn_after_conv = _bn_stats(m)
    if fold_bn:
        # every BN that follows a conv is folded; only pre-activation BNs (DenseNet: BN after Concat) remain
        assert n_bn_after_conv == 0
        if name != "densenet121":
            assert n_bn == 0
    else:
        assert n_bn == n_bn_modules
    model = zoo.build(name)
    shape = zoo.input_shape(name, image_size)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input": x.numpy()})
    assert out.shape == ref.shape
    scale = float(np.abs(ref).max())
    assert scale > 0
    err = float(np.abs(out - ref).max()) / scale
    assert err < 1e-4, f"{name} fold_bn={fold_bn}: relative max error {err:.2e}"
    return collections.Counter(n.op_type for n in m.graph.node)


@pytest.mark.parametrize("fold_bn", [False, True], ids=["bnkeep", "bnfold"])
@pytest.mark.parametrize("name", zoo.FAST)
def test_fast_zoo_export(name, fold_bn, tmp_path):
    path = zoo.export(name, tmp_path / f"{name}.onnx", fold_bn=fold_bn, image_size=FAST_SIZE)
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    n_bn = zoo.count_batchnorm(name)
    ops = _check_export(name, path, fold_bn, n_bn)
    if name != "msd":
        assert n_bn > 0
    if name == "msd":
        assert ops["Conv"] == 51 and ops["Relu"] == 50 and ops["Sub"] == 1 and ops["Div"] == 1


def test_cached_export(tmp_path, monkeypatch):
    p1 = zoo.cached_export("unet4", fold_bn=True, image_size=32, cache_dir=tmp_path)
    t1 = p1.stat().st_mtime_ns
    p2 = zoo.cached_export("unet4", fold_bn=True, image_size=32, cache_dir=tmp_path)
    assert p1 == p2 and p2.stat().st_mtime_ns == t1
    p3 = zoo.cached_export("unet4", fold_bn=False, image_size=32, cache_dir=tmp_path)
    assert p3 != p1 and p3.parent == tmp_path
    assert torch.__version__.replace("+", "_") in p1.name
    monkeypatch.setenv("LEAN_ONNX_ZOO_CACHE", str(tmp_path / "env"))
    assert zoo.default_cache_dir() == tmp_path / "env"
    p4 = zoo.cached_export("unet4", fold_bn=True, image_size=32)
    assert p4.parent == tmp_path / "env" and p4.exists()
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file() and f.suffix != ".onnx") == []


def test_export_is_atomic_on_failure(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    target = tmp_path / "bad.onnx"
    with pytest.raises(RuntimeError):
        zoo.export_module(Bad(), (1, 1, 4, 4), target, fold_bn=True)
    assert list(tmp_path.iterdir()) == []


def test_export_dynamic_batch(tmp_path):
    path = zoo.export("unet4", tmp_path / "u.onnx", fold_bn=True, image_size=32, dynamic_batch=True)
    m = onnx.load(str(path))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input": np.zeros((3, 1, 32, 32), np.float32)})
    assert out.shape == (3, 5, 32, 32)


def test_msd_untrained_onnx_is_current():
    path = REPO / "models" / "msd_untrained.onnx"
    assert path.exists(), "run: python -m models.export_msd"
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert m.opset_import[0].version == 17
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 256, 256]
    assert m.graph.output[0].name == "output"
    x = np.random.default_rng(0).standard_normal((2, 1, 256, 256)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input": x})
    with torch.no_grad():
        ref = zoo.build("msd", seed=0)(torch.from_numpy(x)).numpy()
    assert out.shape == (2, 5, 256, 256)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
def test_all_zoo_models_export_and_run(tmp_path):
    times = {}
    for name in zoo.ZOO:
        n_bn = zoo.count_batchnorm(name)
        for fold_bn in (False, True):
            path = tmp_path / f"{name}-{fold_bn}.onnx"
            t = time.perf_counter()
            zoo.export(name, path, fold_bn=fold_bn, image_size=FAST_SIZE)
            times[name, fold_bn] = time.perf_counter() - t
            _check_export(name, path, fold_bn, n_bn)
            os.unlink(path)  # vgg11_bn is ~0.5 GB per file
    print("export seconds:", {f"{k[0]}/{'fold' if k[1] else 'keep'}": round(v, 1) for k, v in times.items()})
    print(f"total export seconds: {sum(times.values()):.1f}")
