"""TensorFlow/Keras models converted by tf2onnx, for the NHWC tests and benchmarks (issue 19).

TensorFlow and tf2onnx are not dependencies of lean-onnx (nor of its tests): this tool runs in an
environment of its own and writes the converted models, which the slow tests and the benchmark read.

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install "tensorflow-cpu==2.15.*" tf2onnx
    /tmp/tfvenv/bin/pip install "onnx==1.15.0"   # the newest onnx wants a newer ml_dtypes than TF 2.15's
    /tmp/tfvenv/bin/python tools/tf_models.py [--out .cache/tf] [--models resnet50,mobilenetv2] [--raw]

Keras applications are built with `weights=None` (random weights, nothing downloads) and an NHWC input of
1x224x224x3, converted with tf2onnx's defaults (opset 17; its transpose optimizer on, as a user gets it).
"""

from __future__ import annotations

import argparse
import os
import pathlib

MODELS = {"resnet50": "ResNet50", "mobilenetv2": "MobileNetV2"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent.parent / ".cache" / "tf"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--raw", action="store_true", help="also write NAME_tf2onnx_raw.onnx, converted with tf2onnx's "
                        "graph optimizers off (its transpose optimizer among them): every conv between a Transpose "
                        "to NCHW and one back to NHWC, as older converters and TFLite paths leave them")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        tf.keras.utils.set_random_seed(0)
        model = getattr(tf.keras.applications, MODELS[name])(weights=None, input_shape=(224, 224, 3))
        spec = (tf.TensorSpec((1, 224, 224, 3), tf.float32, name="input"),)
        path = out / f"{name}_tf2onnx.onnx"
        tf2onnx.convert.from_keras(model, input_signature=spec, opset=args.opset, output_path=str(path))
        print(f"wrote {path} (tensorflow {tf.__version__}, tf2onnx {tf2onnx.__version__})")
        if args.raw:
            raw = out / f"{name}_tf2onnx_raw.onnx"
            tf2onnx.convert.from_keras(model, input_signature=spec, opset=args.opset, output_path=str(raw),
                                       optimizers={})
            print(f"wrote {raw} (graph optimizers off)")


if __name__ == "__main__":
    main()
