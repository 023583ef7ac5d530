"""The iterative schedule's options on the main command (`--steps`, `--finetune-data`, ...) and running it
(train/schedule.py does the work)."""

from __future__ import annotations

import json
import os

from ..errors import LeanOnnxError
from .options import check_distill_options


def add_arguments(p) -> None:
    """The schedule's options on the main command."""
    g = p.add_argument_group("iterative schedule (lean-spec section 5)")
    g.add_argument("--steps", type=int, default=1, help="prune in N steps of geometric keep, keep^(t/N) (default 1)")
    g.add_argument("--finetune-data", metavar="NPZ", help="fine-tune after each step on this .npz (inputs, targets)")
    g.add_argument("--val-data", metavar="NPZ", help="validation data, evaluated after each fine-tuning epoch")
    g.add_argument("--epochs-per-step", type=int, default=3, help="fine-tuning epochs after each step (default 3)")
    g.add_argument("--checkpoint-dir", metavar="DIR", help="step models and state (default OUT.steps/); a run "
                   "started again with the same settings resumes after the last finished step")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3; 1e-4 with --teacher)")
    g.add_argument("--batch", type=int, default=5, help="fine-tuning batch size (default 5)")
    g.add_argument("--crop", type=int, default=0, metavar="PIXELS", help="fine-tune on random crops (0: full inputs)")
    g.add_argument("--seed", type=int, default=0, help="step t fine-tunes with seed + t (default 0)")
    g.add_argument("--carry-optimizer", action="store_true", help="one Adam through the whole schedule, as the "
                   "reference: step t starts from step t-1's state, its moments cut like the weights "
                   "(default: a fresh Adam per step)")
    g.add_argument("--device", default="auto", help="fine-tune on: auto (default: CUDA when torch sees a GPU, "
                   "else CPU), cpu, cuda or cuda:N")
    g.add_argument("--teacher", metavar="ONNX", help="distil from this model after every step (usually IN "
                   "itself): --finetune-data then needs inputs only")
    g.add_argument("--temperature", type=float, default=1.0, help="with --teacher: softmax temperature of the "
                   "logits' KL divergence (default 1)")
    g.add_argument("--alpha", type=float, default=None, help="with --teacher and targets: weight of the labelled "
                   "loss, alpha * labelled + (1 - alpha) * distillation (default 0)")


def wants_schedule(args) -> bool:
    return args.steps > 1 or bool(args.finetune_data)


def cmd_schedule(args, info, warn) -> int:
    """`lean-onnx IN OUT --keep R | --target-macs F --steps N [--finetune-data ... [--teacher IN]]`: run or
    resume, then write OUT."""
    from ..graph.load import parse_input_shapes, read_model
    from ..io.save import save_model_atomic
    from ..train.distributed import World, process_group
    from ..train.schedule import ScheduleConfig, run_schedule, step_keeps

    world = World.from_env()  # under torchrun: fine-tune data-parallel; rank 0 writes (and alone prints, main.py)
    check_distill_options(args)
    if args.steps < 1 or args.epochs_per_step < 0 or args.batch < 1 or args.lr <= 0 or args.crop < 0:
        raise LeanOnnxError("--steps and --batch must be >= 1, --epochs-per-step and --crop >= 0, --lr > 0")
    if args.val_data and not args.finetune_data:
        raise LeanOnnxError("--val-data needs --finetune-data")
    if (args.teacher or args.alpha is not None) and not args.finetune_data:
        raise LeanOnnxError("--teacher / --alpha need --finetune-data (the inputs to distil on)")
    teacher = teacher_digest = None
    if args.teacher:
        from ..io.save import sha256

        teacher, teacher_digest = read_model(args.teacher), sha256(args.teacher)
    train = val = None
    if args.finetune_data:
        from ..train.finetune import load_data

        labelled = not args.teacher or bool(args.alpha)  # distillation alone needs inputs only
        train = load_data(args.finetune_data, "--finetune-data", need_targets=labelled)
        val = load_data(args.val_data, "--val-data", need_targets=labelled) if args.val_data else None
    else:
        warn("--steps without --finetune-data: pruning in steps without fine-tuning in between")
    shapes = parse_input_shapes(args.input_shape)
    infer_shape = not shapes and train is not None  # the data fix the input shape (one input, batch 1)
    model = read_model(args.model) if args.calibrate_data or infer_shape else None  # read once for both
    calibration = None
    if args.calibrate_data:  # every step calibrated on them before its fine-tuning (checked in cmd_prune)
        from .options import calibration_inputs

        calibration = calibration_inputs(args, model)
    if infer_shape:
        inits = {t.name for t in model.graph.initializer}
        name = next(i.name for i in model.graph.input if i.name not in inits)
        shapes = {name: (1,) + tuple(train["inputs"].shape[1:])}
    config = ScheduleConfig(keep=args.keep, target_macs=args.target_macs, min_channels=args.min_channels,
                            allocate=args.allocate if args.target_macs is not None else None,
                            drop_blocks=args.drop_blocks if args.target_macs is not None else None,
                            teacher=teacher_digest, temperature=args.temperature, alpha=args.alpha or 0.0,
                            steps=args.steps, method=args.method,
                            epochs_per_step=args.epochs_per_step if train is not None else 0, lr=args.lr,
                            batch=args.batch, crop=args.crop or None, seed=args.seed,
                            round_channels=args.round_channels, fold_constants=args.fold_constants,
                            gather_below=args.gather_below, exclude=list(args.exclude),
                            input_shapes={k: list(v) for k, v in shapes.items()} or None,
                            norm_grid=None if args.norm_grid == "auto" else int(args.norm_grid),
                            carry_optimizer=args.carry_optimizer, calibrate_method=args.calibrate_method)
    folder = args.checkpoint_dir or args.output + ".steps"
    goal, what = (args.target_macs, "MACs") if args.target_macs is not None else (args.keep, "keep")
    info(f"schedule: {args.steps} step(s) to {what} {goal:g} "
         f"({', '.join(f'{k:.4f}' for k in step_keeps(goal, args.steps))}); checkpoints in {folder}"
         + (f"; distilling from {args.teacher}" if teacher is not None else "")
         + (f"; calibrating every step on {len(calibration)} inputs" if calibration is not None else ""))
    if train is not None and config.epochs_per_step > 0:
        from ..train.finetune import resolve_device

        with process_group(world, resolve_device(args.device)) as (world, device):
            state = run_schedule(args.model, config, folder, train, val, progress=info, device=device,
                                 teacher=teacher, world=world, calibration=calibration)
    else:
        state = run_schedule(args.model, config, folder, train, val, progress=info, device=args.device,
                             teacher=teacher, calibration=calibration)
    if not world.main:
        return 0
    final = os.path.join(folder, state["steps"][-1]["model"])
    with open(final, "rb") as f:
        save_model_atomic(f.read(), args.output)
    state["output"] = args.output
    if args.report:
        save_model_atomic((json.dumps(state, indent=1) + "\n").encode(), args.report)
    print(f"{'step':>4}  {what + ' target':>11}  {'achieved':>8}  {'kernels':>9}  {'params':>9}  val metrics")
    for row in state["steps"]:
        last = row["finetune"][-1] if row["finetune"] else {}
        metrics = ", ".join(f"{k} {last[k]:.4f}" for k in ("train_loss", "val_loss", "val_accuracy") if k in last)
        print(f"{row['step']:>4}  {row['keep_target']:>11.4f}  {row['keep_achieved']:>8.4f}  "
              f"{row['kernels_kept']:>9,}  {row['params']:>9,}  {metrics or '-'}")
    return 0
