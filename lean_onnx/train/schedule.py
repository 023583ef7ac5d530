"""The paper's iterative schedule: prune in steps, fine-tune after each (lean-spec section 5).

`lean-onnx IN OUT --keep 0.05 --steps 15 --finetune-data train.npz --epochs-per-step 3`: step t keeps
r_t = keep^(t/T) of the ORIGINAL prunable kernels (0.8190, 0.6707, ... 0.05 for keep 0.05, T = 15).
Each step prunes the previous step's fine-tuned model (physically, so it gets faster as it goes), with
redundancy pruning; its zero kernels count as pruned already (never kept again, as in the reference). Fine-tuning holds every zero kernel (and dead channel) at zero
(finetune.py), so the contract pruned == masked holds at every step, which each step checks.

Every step's model and a `state.json` go to a checkpoint folder; a run that stops (interrupt, crash,
lost machine) resumes after the last finished step when started again with the same settings, and
gives the same result as an uninterrupted run: pruning is deterministic and step t fine-tunes with
seed `seed + t`.

`carry_optimizer` (`--carry-optimizer`): one Adam runs through the whole schedule, as in the reference
(its single msd_pytorch model object trains in every step): step t starts from Adam's state after step
t-1, its moments cut like the weights (`Pruner.slice_like`), and every step saves that state next to
its model (`step_NN.adam.pt`), so a resumed run stays exact. Off by default (a fresh Adam per step).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np

from ..errors import LeanOnnxError
from ..select.budget import DEFAULT_ALLOCATE

STATE = "state.json"
ADAM = "step_{:02d}.adam.pt"


@dataclass
class ScheduleConfig:
    """What defines a schedule's result; a checkpoint folder is resumed only with the same config."""

    keep: float | None  # None with target_macs
    steps: int
    method: str = "lean"
    epochs_per_step: int = 3
    lr: float = 1e-3
    batch: int = 5
    crop: int | None = None
    seed: int = 0
    round_channels: int = 16
    fold_constants: bool = False
    gather_below: float = 0.75
    exclude: list[str] = field(default_factory=list)
    input_shapes: dict | None = None
    norm_grid: int | None = None
    train_data: str | None = None  # sha256 of the training/validation arrays, not their paths
    val_data: str | None = None
    carry_optimizer: bool = False  # one Adam through the schedule (step t starts from step t-1's state)
    target_macs: float | None = None  # a MACs budget instead of keep: step t prunes to target^(t/steps) of the MACs
    min_channels: float = 0.1
    allocate: str | None = None  # with target_macs: "time" or "macs" (select/budget.py); None: a --keep run
    drop_blocks: float | None = None  # with target_macs: residual branches that may go whole (None: the default)
    teacher: str | None = None  # sha256 of the teacher model (distillation after every step)
    temperature: float = 1.0
    alpha: float = 0.0
    calibrate_data: str | None = None  # sha256 of the calibration inputs (every step calibrated before fine-tuning)
    calibrate_method: str = "statistics"  # or "reconstruct" (train/reconstruct.py)


def step_keeps(keep: float, steps: int) -> list[float]:
    """r_t = keep^(t / steps), t = 1..steps: a geometric schedule ending exactly at `keep`."""
    return [keep ** (t / steps) for t in range(1, steps)] + [keep]


def data_digest(arrays: dict | None) -> str | None:
    if arrays is None:
        return None
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(key.encode() + str(value.dtype).encode() + str(value.shape).encode() + value.tobytes())
    return digest.hexdigest()


def run_schedule(source: str, config: ScheduleConfig, checkpoint_dir: str, train: dict | None = None,
                 val: dict | None = None, progress=None, stop_after: int | None = None,
                 verify: bool = True, device: str = "auto", teacher=None, world=None,
                 calibration: np.ndarray | None = None) -> dict:
    """Run (or resume) the schedule; returns the state: config, original kernel count and one row per
    finished step (its checkpoint file, keep target/achieved, kernels, params, MACs, fine-tuning history,
    contract error). `stop_after` k stops after step k (as an interruption would). `device`: where to
    fine-tune (finetune.resolve_device); not part of the config, so a run can resume on another machine.
    `teacher` (an onnx.ModelProto, usually the original; `config.teacher` is its sha256): every step's
    fine-tuning distils from it (finetune.finetune's `teacher`); `config.target_macs`: step t prunes to
    target_macs^(t/steps) of the original's MACs at channel granularity instead of a kernel keep.
    `world` (distributed.World, inside distributed.process_group, with `device` this rank's): under
    torchrun every rank prunes alike and fine-tunes data-parallel; rank 0 alone writes the checkpoints.
    `calibration` (inputs; `config.calibrate_data` is their digest): every step's pruned model is calibrated
    on them against the step's input model (train/calibrate.py) before its fine-tuning."""
    from ..graph.load import read_model
    from ..io.save import save_model_atomic, sha256
    from .distributed import LOCAL

    world = world or LOCAL
    say = progress or (lambda line: None)
    if train is not None and config.epochs_per_step > 0:
        from .finetune import resolve_device

        if not world.parallel:
            device = resolve_device(device)  # once, so a missing GPU fails here, before any file or pruning
        say(f"fine-tuning on {device}" + (f" x {world.size} processes ({world.backend})" if world.parallel else ""))
    if world.main:
        os.makedirs(checkpoint_dir, exist_ok=True)
    config.train_data, config.val_data = data_digest(train), data_digest(val)
    config.calibrate_data = data_digest(None if calibration is None else {"inputs": calibration})
    state = _resume(checkpoint_dir, source, config, sha256(source), say)
    world.barrier()  # every rank has read the folder before rank 0 writes to it
    if state["steps"] and state.get("original_macs") is None:  # a folder written before MACs were recorded
        from ..graph.cost import model_cost
        from ..graph.load import load_model

        state["original_macs"] = model_cost(load_model(read_model(source), config.input_shapes))["macs"]
    current = read_model(os.path.join(checkpoint_dir, state["steps"][-1]["model"])) if state["steps"] \
        else read_model(source)
    carry = config.carry_optimizer and train is not None and config.epochs_per_step > 0
    adam = _load_adam(checkpoint_dir, len(state["steps"])) if carry and state["steps"] else None
    keeps = step_keeps(config.target_macs if config.target_macs is not None else config.keep, config.steps)
    for t in range(len(state["steps"]) + 1, config.steps + 1):
        if stop_after is not None and t > stop_after:
            break
        start = time.perf_counter()
        out = {} if carry else None
        row, current = _step(current, t, keeps[t - 1], state, config, train, val, verify, say, device,
                             optimizer_state=adam, state_out=out, teacher=teacher, world=world,
                             calibration=calibration)
        row["model"] = f"step_{t:02d}.onnx"
        if carry and world.main:  # before the model and state.json: a finished step has its Adam state
            _save_adam(out, os.path.join(checkpoint_dir, ADAM.format(t)))
        adam = out if carry else adam
        if world.main:
            save_model_atomic(current, os.path.join(checkpoint_dir, row["model"]))
        row["seconds"] = time.perf_counter() - start
        state["steps"].append(row)
        if world.main:
            save_model_atomic((json.dumps(state, indent=1) + "\n").encode(), os.path.join(checkpoint_dir, STATE))
        say(_step_line(row, config.steps))
    state["finished"] = len(state["steps"]) == config.steps
    return state


def settings_differ(state: dict, digest: str, config: ScheduleConfig) -> list[str]:
    """What differs between a saved schedule state and this input digest and config ("name saved (given
    now)"), empty when a checkpoint folder belongs to this run (resume) or describes it (reports)."""
    mine = {"input_sha256": digest, **json.loads(json.dumps(asdict(config)))}
    defaults = {f.name: f.default for f in fields(ScheduleConfig) if f.default is not MISSING}
    saved = {"input_sha256": state.get("input_sha256"), **defaults, **(state.get("config") or {})}
    missing = "<missing>"
    return [f"{k} {saved.get(k, missing)!r} (given {mine.get(k, missing)!r})"
            for k in sorted(mine.keys() | saved.keys()) if saved.get(k, missing) != mine.get(k, missing)]


def _resume(folder: str, source: str, config: ScheduleConfig, digest: str, say) -> dict:
    path = os.path.join(folder, STATE)
    fresh = {"schema_version": 1, "input": source, "input_sha256": digest, "config": asdict(config),
             "original_kernels": None, "steps": []}
    if not os.path.exists(path):
        return fresh
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        raise LeanOnnxError(f"{path}: unreadable schedule state; remove the folder to start again") from None
    if settings_differ(state, digest, config):
        raise LeanOnnxError(f"{folder}: holds a schedule with other settings or another input; use another "
                            "--checkpoint-dir, or remove it to start again")
    done = [row for row in state["steps"] if os.path.exists(os.path.join(folder, row["model"]))]
    if len(done) != len(state["steps"]):
        raise LeanOnnxError(f"{folder}: a step's checkpoint model is missing; remove the folder to start again")
    if done:
        say(f"resuming after step {len(done)}/{config.steps} from {folder}")
    return state


def _step(model, t: int, target: float, state: dict, config: ScheduleConfig, train, val, verify: bool, say,
          device: str, optimizer_state: dict | None = None, state_out: dict | None = None,
          finetune_masked: bool = False, teacher=None, world=None, calibration=None):
    """Prune `model` to `target` of the original kernels (of the original's MACs with
    `config.target_macs`), then fine-tune (distil from `teacher` when given); returns (row, new model).
    `optimizer_state`/`state_out`: Adam's state to start from / to fill (finetune.finetune); a state of
    `model`'s fine-tuning is cut like the weights (Pruner.slice_like) unless `finetune_masked`.
    `finetune_masked` (needs `verify`): fine-tune the masked model, which has `model`'s shapes (so a
    state from `model`'s fine-tuning maps one to one), instead of the pruned one: the same function.
    `calibration` (inputs): the pruned model's kept channels get `model`'s statistics on them first, or with
    `config.calibrate_method` "reconstruct" its convs and Gemms are refit to `model`'s outputs on them."""
    from ..rewrite.pruner import Pruner
    from .distributed import LOCAL

    world = world or LOCAL
    pruner = Pruner(model, exclude=config.exclude, input_shapes=config.input_shapes, norm_grid=config.norm_grid)
    prunable = int(pruner.graph.prunable_edges.sum())
    if state["original_kernels"] is None:  # step 1 prunes the original itself
        state["original_kernels"], state["original_macs"] = prunable, pruner.cost_before["macs"]
    options = {"masked": verify, "round_channels": config.round_channels, "fold_constants": config.fold_constants,
               "gather_below": config.gather_below, "method": config.method}
    if config.target_macs is not None:  # the step's MACs target, as a fraction of this step's input
        in_step = min(1.0, target * state["original_macs"] / pruner.cost_before["macs"])
        result = pruner.prune(target_macs=in_step, min_channels=config.min_channels,
                              allocate=config.allocate or DEFAULT_ALLOCATE, drop_blocks=config.drop_blocks,
                              **options)
    else:
        in_step = min(1.0, target * state["original_kernels"] / prunable)
        result = pruner.prune(in_step, zeros_are_pruned=True, **options)
    if calibration is not None and config.calibrate_method == "reconstruct":  # the masked model alike
        from .reconstruct import reconstruct

        result, _ = reconstruct(pruner, result, calibration)  # summary: report["calibration"]
    elif calibration is not None:  # the masked model is calibrated alike: the contract below checks both
        from .calibrate import calibrate

        result, _ = calibrate(pruner, result, calibration, batch=len(calibration))
    report = result.report
    row = {"step": t, "keep_target": target, "keep_in_step": in_step, "kernels_kept": report["kernels"]["kept"],
           "keep_achieved": report["kernels"]["kept"] / state["original_kernels"],
           "kernels_in_model": report["kernels"]["in_pruned_model"], "params": report["params"]["after"],
           "macs": report["flops"]["after"],
           "macs_ratio": report["flops"]["after"] / state["original_macs"] if state.get("original_macs") else None,
           "inputs_reach_outputs": report["inputs_reach_outputs"]}
    if "calibration" in report:
        row["calibration"] = report["calibration"]
    if config.target_macs is not None:  # the step's target is a MACs ratio, not a keep
        row.update(target_kind="macs", keep_achieved=row["macs_ratio"])
    if verify:
        from ..rewrite.contract import check_contract

        try:
            errors = check_contract(pruner.loaded.original, result, pruner.loaded.input_shapes,
                                    np.random.default_rng(t), samples=1)
        except AssertionError as exc:
            raise LeanOnnxError(f"step {t}: internal: {exc} (please report)") from None
        row["max_rel_err_vs_masked"] = errors["max_rel_err_vs_masked"]
    model = result.masked if finetune_masked else result.model
    if optimizer_state is not None and not finetune_masked:
        optimizer_state = _sliced_state(pruner, result, optimizer_state)
        row["optimizer_carried"] = len(optimizer_state)
    row["finetune"] = []
    if train is not None and config.epochs_per_step > 0:
        from .finetune import finetune

        row["finetune_device"] = device
        row.update(finetune_world_size=world.size, finetune_backend=world.backend)
        distil = {"teacher": teacher, "temperature": config.temperature, "alpha": config.alpha} if teacher else {}
        model, row["finetune"] = finetune(model, train, val, epochs=config.epochs_per_step, lr=config.lr,
                                          batch=config.batch, seed=config.seed + t, crop=config.crop,
                                          path=f"step {t}", device=device, optimizer_state=optimizer_state,
                                          state_out=state_out, world=world, **distil)
    return row, model


def _sliced_state(pruner, result, optimizer_state: dict) -> dict:
    """Adam's state of the pruner's model ({name: {"step", "exp_avg", "exp_avg_sq"}}) for result.model:
    the moments cut like the weights, the step count kept."""
    import torch

    moved = {key: pruner.slice_like(result, {name: s[key].numpy() for name, s in optimizer_state.items()})
             for key in ("exp_avg", "exp_avg_sq")}
    carried = {}
    for name, exp_avg in moved["exp_avg"].items():
        source = optimizer_state.get(name) or optimizer_state.get(name.partition("__")[0])
        if source is not None and name in moved["exp_avg_sq"]:
            carried[name] = {"step": source["step"].clone(), "exp_avg": torch.from_numpy(exp_avg.copy()),
                             "exp_avg_sq": torch.from_numpy(moved["exp_avg_sq"][name].copy())}
    return carried


def _save_adam(adam: dict, path: str) -> None:
    import io

    import torch

    from ..io.save import save_model_atomic

    buffer = io.BytesIO()
    torch.save(adam, buffer)
    save_model_atomic(buffer.getvalue(), path)


def _load_adam(folder: str, t: int) -> dict:
    import torch

    path = os.path.join(folder, ADAM.format(t))
    if not os.path.exists(path):
        raise LeanOnnxError(f"{folder}: step {t}'s optimizer state ({ADAM.format(t)}) is missing; remove the folder "
                            "to start again")
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise LeanOnnxError(f"{path}: unreadable optimizer state ({type(exc).__name__}); remove the folder "
                            "to start again") from None


def _step_line(row: dict, steps: int) -> str:
    what = "MACs" if row.get("target_kind") == "macs" else "keep"
    parts = [f"step {row['step']}/{steps}: {what} {row['keep_achieved']:.4f} (target {row['keep_target']:.4f})",
             f"{row['kernels_kept']:,} kernels", f"params {row['params']:,}"]
    if row.get("calibration", {}).get("method") == "reconstruct":
        parts.append(f"reconstructed {row['calibration']['convs']:,} convs/Gemms")
    elif row.get("calibration"):
        parts.append(f"calibrated {row['calibration']['channels']:,} channels")
    if row["finetune"]:
        last = row["finetune"][-1]
        parts += [f"{k} {last[k]:.4f}" for k in ("train_loss", "val_loss", "val_accuracy") if k in last]
    return " | ".join(parts) + f" | {row['seconds']:.1f} s"
