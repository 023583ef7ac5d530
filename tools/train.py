"""Train the paper's MS-D on Circle-Square from scratch and export `models/msd_cs.onnx`.

The reference trains 50 epochs on full 256x256 images with batch 5 on a GPU. On a CPU one full image
costs ~2 s forward+backward (~0.5 s tap-first), so this script trains on random crops (default 128x128, batch 4, random
flips/transposes, which leave every CS label unchanged) for a fixed number of steps, with Adam at the
reference's 1e-3 and a cosine decay over the last part of the run; it evaluates on *full* images. The
step-`k` batch is drawn from `np.random.default_rng([seed, k])`, so a run resumed from a checkpoint
continues exactly as if it had never stopped.

    python tools/train.py                                        # data in .cache/cs (generated if missing)
    python tools/train.py --resume --steps 8000 --decay-from 0.5 # continue from .cache/train/msd_cs.pt

(These two commands made the shipped models/msd_cs.onnx; see models/README.md.) Training runs
`MSD.forward_taps`, the same function as `forward` computed 3.9x faster on one CPU core.

The model is models/msd.py's MSD (depth 50, width 1, dilations 1..10) with the input scaler set to the
training inputs' mean and std, exported like models/export_msd.py (opset 17, dynamic batch, input
`input`, output `output`: logits). The checkpoint with the best validation loss is exported (as the
reference keeps its best-validation checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lean_onnx.train.circle_square import generate_circle_square, load_split  # noqa: E402
from models.msd import MSD  # noqa: E402
from models.zoo import export_module  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / ".cache" / "cs"), help="folder with train/val/test.npz")
    ap.add_argument("--out", default=str(ROOT / "models" / "msd_cs.onnx"))
    ap.add_argument("--checkpoint", default=str(ROOT / ".cache" / "train" / "msd_cs.pt"))
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps in total (models/msd_cs.onnx: 2000, then resumed to 8000)")
    ap.add_argument("--crop", type=int, default=128, help="training crop side (0 = full images)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-final", type=float, default=1e-5)
    ap.add_argument("--decay-from", type=float, default=0.6, help="fraction of --steps where cosine decay starts")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-images", type=int, default=20, help="val images per periodic evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def learning_rate(step: int, args) -> float:
    """Constant, then cosine from --lr to --lr-final over the last (1 - decay_from) of the steps."""
    start = int(args.decay_from * args.steps)
    if step < start:
        return args.lr
    t = (step - start) / max(1, args.steps - start)
    return args.lr_final + 0.5 * (args.lr - args.lr_final) * (1 + math.cos(math.pi * min(t, 1.0)))


def training_batch(train: dict, step: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images, crops and dihedral flips for `step`, reproducible from (seed, step) alone."""
    rng = np.random.default_rng([args.seed, step])
    inputs, targets = train["inputs"], train["targets"]
    n, size = inputs.shape[0], inputs.shape[-1]
    crop = args.crop or size
    xs, ys = [], []
    for k in rng.integers(0, n, args.batch):
        r, c = rng.integers(0, size - crop + 1, 2)
        x, y = inputs[k, 0, r:r + crop, c:c + crop], targets[k, r:r + crop, c:c + crop]
        flip_r, flip_c, swap = rng.integers(0, 2, 3)
        x, y = (x[::-1], y[::-1]) if flip_r else (x, y)
        x, y = (x[:, ::-1], y[:, ::-1]) if flip_c else (x, y)
        x, y = (x.T, y.T) if swap else (x, y)
        xs.append(np.ascontiguousarray(x)[None])
        ys.append(np.ascontiguousarray(y))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


@torch.no_grad()
def evaluate(model: MSD, split: dict, limit: int | None = None, batch: int = 5) -> dict:
    """Mean cross-entropy and global accuracy (correct / total pixels, the paper's metric) on full images."""
    model.eval()
    n = split["inputs"].shape[0] if limit is None else min(limit, split["inputs"].shape[0])
    loss_sum, correct, total = 0.0, 0, 0
    for start in range(0, n, batch):
        x = torch.from_numpy(split["inputs"][start:start + batch])
        y = torch.from_numpy(split["targets"][start:start + batch])
        logits = model.forward_taps(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
    model.train()
    return {"loss": loss_sum / total, "accuracy": correct / total}


def build_model(train: dict, seed: int) -> MSD:
    torch.manual_seed(seed)
    mean, std = float(train["inputs"].mean()), float(train["inputs"].std())
    return MSD(c_in=1, n_classes=5, depth=50, width=1, dilations=range(1, 11), input_mean=mean, input_std=std)


def save_checkpoint(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    if not os.path.exists(os.path.join(args.data, "test.npz")):
        generate_circle_square(args.data)
    train_set = load_split(os.path.join(args.data, "train.npz"))
    val_set = load_split(os.path.join(args.data, "val.npz"))
    model = build_model(train_set, args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    state = {"step": 0, "best": None, "history": [], "seconds": 0.0}
    if args.resume and os.path.exists(args.checkpoint):
        state = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        print(f"[I] resumed at step {state['step']}", file=sys.stderr)
    model.train()
    started, running = time.perf_counter() - state["seconds"], []
    while state["step"] < args.steps:
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        x, y = training_batch(train_set, step, args)
        loss = F.cross_entropy(model.forward_taps(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        state["step"] = step + 1
        if state["step"] % args.eval_every == 0 or state["step"] == args.steps:
            state["seconds"] = time.perf_counter() - started
            val = evaluate(model, val_set, args.val_images)
            row = {"step": state["step"], "train_loss": float(np.mean(running)), "val_loss": val["loss"],
                   "val_accuracy": val["accuracy"], "lr": learning_rate(step, args), "seconds": state["seconds"]}
            running = []
            state["history"].append(row)
            print(json.dumps(row), flush=True)
            if state["best"] is None or val["loss"] < state["best"]["val_loss"]:
                state["best"] = {"val_loss": val["loss"], "step": state["step"],
                                 "model": {k: v.clone() for k, v in model.state_dict().items()}}
            state["model"], state["optimizer"] = model.state_dict(), optimizer.state_dict()
            save_checkpoint(args.checkpoint, state)
    return state


def finish(args, state: dict) -> dict:
    """Best-validation weights -> full val and test accuracy -> ONNX export -> ORT re-check on test."""
    train_set = load_split(os.path.join(args.data, "train.npz"))
    model = build_model(train_set, args.seed)
    model.load_state_dict(state["best"]["model"])
    model.eval()
    test_set = load_split(os.path.join(args.data, "test.npz"))
    val = evaluate(model, load_split(os.path.join(args.data, "val.npz")))
    test = evaluate(model, test_set)
    export_module(model, (1, 1, 256, 256), args.out, fold_bn=True, opset=17, dynamic_batch=True)
    ort_accuracy = onnx_accuracy(args.out, test_set)
    result = {"best_step": state["best"]["step"], "steps": state["step"], "train_seconds": state["seconds"],
              "val": val, "test": test, "test_accuracy_onnxruntime": ort_accuracy, "out": args.out}
    print(json.dumps(result), flush=True)
    print(f"test global accuracy {test['accuracy']:.4f} (onnxruntime {ort_accuracy:.4f})")
    return result


def onnx_accuracy(path: str, split: dict) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    correct = 0
    for start in range(0, split["inputs"].shape[0], 5):
        logits = session.run(None, {"input": split["inputs"][start:start + 5]})[0]
        correct += int((logits.argmax(1) == split["targets"][start:start + 5]).sum())
    return correct / split["targets"].size


def main(argv=None) -> int:
    args = parse_args(argv)
    state = train(args)
    finish(args, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
