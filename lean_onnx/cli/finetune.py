"""`lean-onnx finetune IN OUT --data train.npz`: fine-tune in torch, pruned kernels held at zero
(train/finetune.py does the work; torch is imported only when the command runs)."""

from __future__ import annotations

import json
import os
import sys
import time

from ..errors import LeanOnnxError
from ..train.finetune import LOSSES


def register(sub) -> None:
    """Add `finetune` to the lean-onnx subcommands."""
    p = sub.add_parser("finetune", help="fine-tune IN on data (Adam, cross-entropy/MSE) and write OUT; "
                                        "pruned kernels stay zero")
    p.add_argument("model", metavar="IN", help="input .onnx file (never modified)")
    p.add_argument("output", metavar="OUT", help="fine-tuned .onnx file (written atomically; same interface)")
    p.add_argument("--data", required=True, metavar="NPZ", help="training data: .npz with inputs and targets")
    p.add_argument("--val-data", metavar="NPZ", help="validation data, evaluated on full inputs after each epoch")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training data (default 3, as the "
                                                         "paper's schedule per pruning step)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch", type=int, default=5, help="batch size (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of torch and of the shuffles/crops (default 0)")
    p.add_argument("--crop", type=int, default=0, metavar="PIXELS",
                   help="train on random PIXELS x PIXELS crops (dense targets; 0 = full inputs, the default)")
    p.add_argument("--loss", choices=LOSSES, default="auto",
                   help="ce: cross-entropy on logits (integer targets), mse: float targets; auto (default) "
                        "picks by the targets' dtype")
    p.add_argument("--train-zero-kernels", action="store_true",
                   help="let exactly-zero kernels train (default: they are pruned and stay zero)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when torch sees a GPU, else CPU), "
                                                    "cpu, cuda or cuda:N")
    p.add_argument("--report", metavar="PATH", help="write per-epoch metrics as JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="no extra detail yet (every lean-onnx command takes -v)")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from ..graph.load import read_model
    from ..io.save import save_model_atomic
    from ..train.finetune import finetune, load_data

    _check_args(args)
    model = read_model(args.model)
    train = load_data(args.data, "--data")
    val = load_data(args.val_data, "--val-data") if args.val_data else None
    try:
        import torch
    except ImportError:
        raise LeanOnnxError("torch is required for finetune (pip install 'lean-onnx[train]')") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda line: None) if args.quiet else (lambda line: print(f"[I] {line}", file=sys.stderr, flush=True))
    say(f"fine-tuning {args.model} on {len(train['inputs'])} samples for {args.epochs} epoch(s)")
    started = time.perf_counter()
    trained, history = finetune(model, train, val, epochs=args.epochs, lr=args.lr, batch=args.batch,
                                seed=args.seed, crop=args.crop or None, loss=args.loss,
                                keep_zero_kernels=not args.train_zero_kernels, progress=say, path=args.model,
                                device=args.device)
    save_model_atomic(trained, args.output)
    say(f"wrote {args.output}")
    if args.report:
        report = {"schema_version": 1, "command": "finetune", "input": args.model, "output": args.output,
                  "data": args.data, "val_data": args.val_data,
                  "settings": {k: getattr(args, k) for k in ("epochs", "lr", "batch", "seed", "crop", "loss",
                                                             "train_zero_kernels", "device")},
                  "epochs": history, "seconds": time.perf_counter() - started}
        save_model_atomic((json.dumps(report, indent=1) + "\n").encode(), args.report)
    return 0


def _check_args(args) -> None:
    """Refuse before any work (training can take hours): bad numbers, OUT equal to IN, no output folder."""
    if args.epochs < 0 or args.batch < 1 or args.lr <= 0 or args.crop < 0:
        raise LeanOnnxError("--epochs must be >= 0, --batch >= 1, --lr > 0 and --crop >= 0")
    for flag, path in (("OUT", args.output), ("--report", args.report)):
        if not path:
            continue
        if os.path.realpath(path) == os.path.realpath(args.model):
            raise LeanOnnxError(f"{path}: {flag} is the input file; lean-onnx never overwrites its input")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise LeanOnnxError(f"{path}: output folder {folder} does not exist or is not writable")
