"""`tools/bench_recovery.py --only labelled`: distillation against labelled fine-tuning where labels exist.

The shipped MS-D trained on Circle-Square, pruned with `--keep`, recovered by labelled fine-tuning, by
distillation from the original on the inputs alone, and by both; results in docs/results.md.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from bench_budget import session
from bench_recovery import ROOT, log, macs_ratio

from lean_onnx.graph.cost import model_cost
from lean_onnx.graph.load import load_model
from lean_onnx.rewrite.pruner import Pruner


def labelled_rows(args) -> list[dict]:
    """With labels (`--only labelled`): the shipped MS-D trained on Circle-Square (models/msd_cs.onnx) pruned
    one-shot with `--keep` (LEAN, the reference's kernel granularity: MS-D's layers are one channel wide, so
    no budget can remove a channel), then recovered three ways with the same epochs, crops, batch and seed:
    labelled fine-tuning (cross-entropy on the masks), distillation from the original on the inputs alone,
    and both (`--alpha 0.5`). Pixel accuracy against the true masks on held-out Circle-Square images."""
    import torch

    from lean_onnx.train.circle_square import SEED, first_images
    from lean_onnx.train.finetune import finetune

    original = (ROOT / "models" / "msd_cs.onnx").read_bytes()
    train = first_images(args.labelled_images, seed=SEED)
    test = first_images(16, seed=SEED + 1)
    shape = (1, 1) + train["inputs"].shape[2:]
    before = model_cost(load_model(onnx.load_from_string(original), {None: shape}))["macs"]

    def accuracy(model: bytes) -> dict:
        sess = session(model)
        pred = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[None]})[0] for x in test["inputs"]])
        return {"pixel accuracy": float((pred.argmax(1) == test["targets"]).mean())}

    teacher = accuracy(original)
    log(f"MS-D (trained): pixel accuracy {teacher['pixel accuracy']:.4f} on {len(test['inputs'])} test images")
    model = onnx.load_from_string(original)
    pruner = Pruner(model, input_shapes={model.graph.input[0].name: shape}, exclude=["/final/*"])  # as the paper
    recipes = (("labelled fine-tuning", dict(teacher=None), train),
               ("distillation, inputs only", dict(teacher=model, alpha=0.0), {"inputs": train["inputs"]}),
               ("both, --alpha 0.5", dict(teacher=model, alpha=0.5), train))
    torch.set_num_threads(args.threads)
    rows = []
    for keep in args.keeps:
        pruned = pruner.prune(keep, "lean", masked=False).model_bytes
        one_shot = accuracy(pruned)
        for label, recipe, data in recipes:
            log(f"MS-D @ keep {keep:g}: {label}, {args.labelled_epochs} epoch(s)")
            start = time.perf_counter()
            trained, history = finetune(onnx.load_from_string(pruned), data, None, epochs=args.labelled_epochs,
                                        lr=args.labelled_lr, batch=args.batch, seed=0, crop=args.labelled_crop,
                                        device="cpu", progress=lambda line: log(f"  {line}"), **recipe)
            seconds = time.perf_counter() - start
            trained = trained.SerializeToString()
            rows.append({"network": "MS-D, Circle-Square (trained; labels)", "target": keep,
                         "pruner": f"lean-onnx --keep {keep:g}; {label}",
                         "macs_ratio": macs_ratio(pruned, shape, before),
                         "macs_ratio_after": macs_ratio(trained, shape, before), "epochs": args.labelled_epochs,
                         "one_shot": one_shot, "distilled": accuracy(trained), "seconds": seconds,
                         "teacher": teacher, "train_loss": [h["train_loss"] for h in history]})
            log(f"  {one_shot} -> {rows[-1]['distilled']} in {seconds:.0f} s")
    return rows
