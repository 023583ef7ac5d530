"""Write ``models/msd_untrained.onnx``: the zoo's MS-D (seed 0, random init, identity input scaler).

Input ``input`` of shape (batch, 1, 256, 256) with a dynamic batch dim named ``batch``, output ``output``
(logits, (batch, 5, 256, 256)), opset 17, legacy exporter with constant folding.

Run from the repository root:  python -m models.export_msd   (or  python models/export_msd.py)
"""
from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a plain script
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from models.zoo import build, export_module  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "msd_untrained.onnx"
IMAGE_SIZE = 256
SEED = 0


def main(argv=None) -> pathlib.Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=pathlib.Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    model = build("msd", seed=SEED)
    path = export_module(
        model, (1, 1, IMAGE_SIZE, IMAGE_SIZE), args.output, fold_bn=True, opset=17, dynamic_batch=True
    )
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return path


if __name__ == "__main__":
    main()
