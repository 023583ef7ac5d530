"""Fine-tune an ONNX model in torch and write it back: `lean-onnx finetune IN OUT --data train.npz`.

The library function `finetune(model, train, val, ...)` is what an iterative prune / fine-tune schedule
calls after every pruning step (lean-spec.md section 5: Adam with torch defaults, batch 5, shuffled,
cross-entropy on the logits). It is deterministic for a fixed seed: torch is seeded, a numpy Generator
draws the shuffles and crops, and torch's deterministic algorithms are on while it runs, so a schedule
that is stopped and restarted from the step's model reproduces it bit for bit (on CPU; on CUDA up to the
few kernels that have no deterministic CUDA version). `device="auto"` trains on CUDA when torch sees a GPU.

Pruned kernels stay pruned: `zero_kernel_masks` is taken from the input model, the masked gradients are
zeroed before each Adam step and the masked weights after it, so DESIGN.md's pruned == masked contract
still holds for the fine-tuned model. BatchNormalization keeps its running statistics (bridge.py).
Data: `.npz` files with `inputs` (N, ...) float32 and `targets`: integer class maps or labels for
cross-entropy, floats of the output's shape for MSE (lean_onnx.train.circle_square writes Circle-Square in this form).
The loop reads data through `len(data)`, `data.order(rng)` (the epoch's sample order) and
`data.batch(indices, rng)` -> (inputs, targets or None): `ArrayData` for such arrays, images.py's
`ImageFolder` for a folder of photos. With a `teacher` (distill.py) the loss is distillation from it,
mixed with the labelled loss by `alpha` when there are targets, and no targets are needed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time

import numpy as np
import onnx

from ..errors import LeanOnnxError

LOSSES = ("auto", "ce", "mse")


def finetune(model: onnx.ModelProto, train, val=None, epochs: int = 3, lr: float = 1e-3,
             batch: int = 5, seed: int = 0, crop: int | None = None, loss: str = "auto",
             keep_zero_kernels: bool = True, progress=None, path: str = "<model>", device: str = "auto",
             optimizer_state: dict | None = None, state_out: dict | None = None, *, teacher=None,
             temperature: float = 1.0, alpha: float | None = None, teacher_path: str = "<teacher>",
             world=None, split_scores: bool = True):
    """Train `model` on `train` ({"inputs", "targets"} arrays) for `epochs`; returns (trained ModelProto
    with the template's interface, history: one dict per epoch with train_loss, val_loss, val_accuracy
    (classification/segmentation), seconds). `crop`: random crops of crop x crop pixels for training
    (dense targets only); validation always runs on full inputs. `progress(str)` receives one line per
    epoch. `device`: "auto" (CUDA when torch sees a GPU, else CPU), "cpu", "cuda" or "cuda:N".
    `optimizer_state`: Adam's state ({initializer name: {"step", "exp_avg", "exp_avg_sq"}}) to start
    from, for the parameters whose name and shape match (the others start fresh); `state_out`, when
    given, receives the final state in that form (the reference keeps one Adam through its schedule).
    `train`/`val` may also be data objects (`ArrayData`, images.ImageFolder). `teacher` (an ONNX model
    with the same interface, or a distill.Teacher): distil from it (distill.py) with `temperature`;
    `alpha` mixes in the labelled loss, alpha * labelled + (1 - alpha) * distill (default 0 with a teacher:
    targets are then optional); the history then also has the validation agreement with the teacher,
    and a row for epoch 0 (before training) when there is validation data. `world` (distributed.World,
    inside distributed.process_group): train data-parallel under torchrun, `batch` being the global batch
    (distributed.py); every rank returns the same model and history. `split_scores=False`: a detector output
    of boxes and sigmoid scores is distilled as a whole, not part by part (score_parts.py)."""
    import torch

    from .bridge import export_onnx, to_torch, zero_kernel_masks
    from .distributed import LOCAL, wrap

    alpha = _alpha(alpha, teacher)
    train = as_data(train, "train", crop, path, need_targets=alpha > 0)
    val = as_data(val, "val", None, path, need_targets=alpha > 0) if val is not None else None
    labels = next((d.targets for d in (train, val) if d is not None and d.targets is not None), None)
    loss_kind = _loss_kind(loss, labels, path) if labels is not None else None  # None: distillation only
    world = world or LOCAL
    device = resolve_device(device) if not world.parallel else device  # process_group chose this rank's GPU
    with _deterministic(seed, device):
        module = to_torch(model, path).to(device)
        if len(module.input_names) != 1:
            raise LeanOnnxError(f"{path}: finetune needs a model with one input, not {module.input_names}")
        teacher = _teacher(teacher, teacher_path, device, model, path, split_scores)
        objective = _objective(loss_kind, teacher, temperature, alpha, path)
        masks = zero_kernel_masks(module) if keep_zero_kernels else {}
        if progress:
            parallel = f" x {world.size} processes ({world.backend}, global batch {batch})" if world.parallel else ""
            progress(_summary(module, masks) + f"; on {device}{parallel}" + (
                f"; distilling from {teacher.path} (temperature {temperature:g}, alpha {alpha:g})" if teacher else ""))
        net = wrap(module, world, device)  # DistributedDataParallel under torchrun, else the module itself
        optimizer = torch.optim.Adam(module.parameters(), lr=lr)
        for key, parameter in module.named_parameters():
            saved = (optimizer_state or {}).get(module.onnx_name[key])
            if saved is not None and saved["exp_avg"].shape == parameter.shape:
                optimizer.state[parameter] = {k: v.clone() if k == "step" else v.clone().to(device)  # step: CPU
                                              for k, v in saved.items()}
        rng = np.random.default_rng(seed)
        history = []
        if teacher is not None and val is not None:  # where the student starts from
            start = time.perf_counter()
            history.append({"epoch": 0, **evaluate(module, val, batch, loss_kind, teacher, temperature, alpha, world),
                            "seconds": time.perf_counter() - start})
            if progress:
                progress(_epoch_line(history[-1], epochs))
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            module.train()
            train_loss = _train_epoch(net, module, optimizer, masks, train, batch, objective, rng, world)
            row = {"epoch": epoch, "train_loss": train_loss}
            if val is not None:
                row.update(evaluate(module, val, batch, loss_kind, teacher, temperature, alpha, world))
            row["seconds"] = time.perf_counter() - start
            history.append(row)
            if progress:
                progress(_epoch_line(row, epochs))
        module.eval()
        if state_out is not None:
            state_out.update({module.onnx_name[key]: {k: v.detach().cpu().clone()
                                                      for k, v in optimizer.state[p].items()}
                              for key, p in module.named_parameters() if p in optimizer.state})
        return export_onnx(module, model), history


def _train_epoch(net, module, optimizer, masks, data, batch, objective, rng, world) -> float:
    """One shuffled pass; returns the training loss averaged over the samples. `net` is `module`, or it
    wrapped in DistributedDataParallel: each rank then trains on its share of every global batch, its loss
    weighted so that DDP's averaged gradient is the global batch's (distributed.py)."""
    from .bridge import apply_masks, mask_gradients

    order = data.order(rng)
    device = _device_of(module)
    total, count = 0.0, 0
    for first in range(0, len(order), batch):
        index = np.sort(order[first:first + batch])  # sorted: npz-backed arrays read faster
        (x, y), live = _share(data, index, rng, world, device)
        loss = objective(net(x), x, y, _mean_of(world, live))
        optimizer.zero_grad()
        if world.parallel:  # this share's weight in the global mean, times N (DDP divides the sum by N)
            (loss * ((len(x) if live else 0) * world.size / len(index))).backward()
        else:
            loss.backward()
        mask_gradients(module, masks)
        optimizer.step()
        apply_masks(module, masks)
        if live:
            total += loss.item() * len(x)
            count += len(x)
    total, count = world.all_sum([total, count])
    return total / max(count, 1)


def _share(data, index, rng, world, device):
    """((inputs, targets) tensors, live): this rank's share of the batch `index` (all of it in one process).
    A rank whose share is empty gets the batch's first sample with live False: it runs it with weight 0,
    as every rank must take part in each gradient all-reduce. The whole batch's random crops are drawn."""
    if not world.parallel:
        return _tensors(data.batch(index, rng), device), True
    part = world.part(len(index))
    live = part.stop > part.start
    return _tensors(data.batch(index, rng, part if live else slice(0, 1)), device), live


def _mean_of(world, live: bool):
    """How the loss takes a mean over the batch of a statistic (distill.py): over all ranks' shares."""
    if not world.parallel:
        return None
    from .distributed import global_mean

    return lambda values: global_mean(world, values, live)


def evaluate(module, data, batch: int = 5, loss_kind: str | None = "ce", teacher=None, temperature: float = 1.0,
             alpha: float = 0.0, world=None) -> dict:
    """Mean loss per element over `data` and, for cross-entropy, global accuracy (correct / total
    target elements: the paper's pixel accuracy for segmentation). With a `teacher` (distill.Teacher):
    the training objective's mean per sample as val_loss, the accuracy when there are targets, and the
    agreement with the teacher (distill.Agreement). Under torchrun (`world`) each rank evaluates its share
    of every batch and the sums are added over the ranks: every rank gets the whole data's figures."""
    import torch

    from .distill import Agreement, mixed_loss
    from .distributed import LOCAL

    world = world or LOCAL
    data = as_data(data, "val", None, getattr(module, "path", "<model>"), need_targets=teacher is None)
    module.eval()
    device = _device_of(module)
    loss_sum, correct, elements, samples = 0.0, 0, 0, 0
    agreement = Agreement(teacher) if teacher is not None else None
    with torch.no_grad():
        for first in range(0, len(data), batch):
            (x, y), live = _share(data, np.arange(first, min(first + batch, len(data))), None, world, device)
            full = module(x)
            out = _first_output(full)
            if teacher is not None:
                taught = teacher(x)
                loss = mixed_loss(full, taught, y, teacher, temperature, alpha,
                                  lambda s, t: _loss(s, t, loss_kind), module.path, _mean_of(world, live))
                if live:
                    agreement.add(full, taught)
                    loss_sum += loss.item() * len(x)
                    samples += len(x)
            if y is not None and live:
                n = y.numel()
                if teacher is None:
                    loss_sum += _loss(out, y, loss_kind).item() * n
                elements += n
                if loss_kind == "ce":
                    correct += int((out.argmax(1) == y).sum())
    loss_sum, correct, elements, samples = world.all_sum([loss_sum, correct, elements, samples])
    result = {"val_loss": loss_sum / max(samples if teacher is not None else elements, 1)}
    if loss_kind == "ce" and elements:
        result["val_accuracy"] = correct / elements
    if agreement is not None:
        agreement.reduce(world)
        result.update(agreement.result())
    return result


def _tensors(batch, device):
    """(inputs, targets or None) numpy -> torch on `device`."""
    import torch

    x, y = batch
    x = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return x, (torch.from_numpy(np.ascontiguousarray(y)).to(device) if y is not None else None)


def _alpha(alpha: float | None, teacher) -> float:
    """The labelled loss's weight: 1 without a teacher, default 0 with one."""
    if alpha is None:
        return 0.0 if teacher is not None else 1.0
    if teacher is None:
        raise LeanOnnxError("--alpha mixes the labelled and the distillation loss: it needs --teacher")
    if not 0 <= alpha <= 1:
        raise LeanOnnxError(f"--alpha {alpha:g}: expected a weight in [0, 1]")
    return float(alpha)


def _teacher(teacher, path: str, device: str, student: onnx.ModelProto, student_path: str, split: bool = True):
    """None, or a distill.Teacher on `device` (built from an ONNX model with the student's interface)."""
    from .distill import Teacher, check_interface

    if teacher is None:
        return None
    if isinstance(teacher, Teacher):
        return teacher.to(device)
    check_interface(student, teacher, student_path, path)
    return Teacher(teacher, path, device, split)


def _objective(loss_kind, teacher, temperature: float, alpha: float, path: str):
    """loss(student outputs, inputs, targets, mean_of=None): the labelled loss alone, or mixed with
    distillation (`mean_of`: how distill.py takes a batch statistic; None: over this batch)."""
    from .distill import mixed_loss

    if teacher is None:
        return lambda out, x, y, mean_of=None: _loss(out, y, loss_kind)
    if not temperature > 0:
        raise LeanOnnxError(f"--temperature {temperature:g}: expected a positive number")
    return lambda out, x, y, mean_of=None: mixed_loss(  # alpha 1: labels alone
        out, teacher(x) if alpha < 1 else None, y, teacher, temperature, alpha,
        lambda s, t: _loss(s, t, loss_kind), path, mean_of)


def _loss(output, target, loss_kind: str):
    import torch.nn.functional as F

    output = _first_output(output)
    if loss_kind == "ce":
        return F.cross_entropy(output, target.long())
    return F.mse_loss(output, target.to(output.dtype))


def _first_output(output):
    return output[0] if isinstance(output, tuple) else output


def _random_crops(x: np.ndarray, y: np.ndarray | None, crop: int, rng: np.random.Generator,
                  part: slice | None = None):
    """One random crop x crop window per sample, the same window in input and target (if any). `part`:
    the windows of every sample are drawn, those of x[part] (y[part]) returned."""
    height, width = x.shape[-2:]
    windows = [(rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)) for _ in range(len(x))]
    xs, ys = [], []
    for k in range(len(x))[part or slice(None)]:
        top, left = windows[k]
        xs.append(x[k, ..., top:top + crop, left:left + crop])
        if y is not None:
            ys.append(y[k, ..., top:top + crop, left:left + crop])
    return np.stack(xs), (np.stack(ys) if y is not None else None)


class ArrayData:
    """`inputs` (and `targets`, or None) arrays as the training loop reads them; `crop`: random
    crop x crop windows of both in training batches (`batch(indices, rng)` with an rng)."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray | None = None, crop: int | None = None):
        self.inputs, self.targets, self.crop = inputs, targets, crop

    def __len__(self) -> int:
        return len(self.inputs)

    def order(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(len(self.inputs))

    def batch(self, indices, rng: np.random.Generator | None, part: slice | None = None):
        """(inputs, targets or None) of `indices`, or of indices[part] only: a data-parallel rank's share
        (distributed.py), with the random crops of the whole batch drawn all the same."""
        if self.crop and rng is not None:
            x = self.inputs[indices]
            y = self.targets[indices] if self.targets is not None else None
            return _random_crops(x, y, self.crop, rng, part)
        indices = np.asarray(indices)[part or slice(None)]
        return self.inputs[indices], (self.targets[indices] if self.targets is not None else None)


def as_data(data, what: str, crop: int | None, path: str, need_targets: bool = True):
    """A data object for the loop: a {"inputs", "targets"} dict checked (_checked) into an ArrayData;
    a data object (ArrayData, images.ImageFolder) as it is, checked for targets and --crop."""
    if isinstance(data, dict):
        data = _checked(data, what, crop, path, need_targets)
        return ArrayData(data["inputs"], data.get("targets"), crop)
    if crop and not isinstance(data, ArrayData):
        raise LeanOnnxError(f"{path}: --crop applies to .npz data; image folders are cropped by --augment "
                            "and --input-size")
    if need_targets and data.targets is None:
        raise LeanOnnxError(f"{getattr(data, 'folder', path)}: {what} data has no targets (images carry no labels): "
                            "give --teacher ORIGINAL.onnx to distil from it")
    return data


def _loss_kind(loss: str, targets: np.ndarray, path: str) -> str:
    if loss not in LOSSES:
        raise LeanOnnxError(f"--loss {loss!r}: choose from {', '.join(LOSSES)}")
    if loss != "auto":
        return loss
    return "ce" if np.issubdtype(targets.dtype, np.integer) else "mse"


def _checked(data: dict, what: str, crop: int | None, path: str, need_targets: bool = True) -> dict:
    """The data with float32 inputs, or one LeanOnnxError saying what is wrong with it. Without
    `need_targets` (distillation) the targets may be missing; then "targets" is absent from the result."""
    for key in ("inputs", "targets") if need_targets else ("inputs",):
        if key not in data:
            hint = "; without targets, give --teacher ORIGINAL.onnx to distil from it" if key == "targets" else ""
            raise LeanOnnxError(f"{path}: {what} data has no {key!r} array (has {sorted(data)}){hint}")
    x, y = data["inputs"], data.get("targets")
    if len(x) == 0 or (y is not None and len(x) != len(y)):
        raise LeanOnnxError(f"{path}: {what} data: {len(x)} inputs but {len(y) if y is not None else 0} targets")
    if crop:
        if x.ndim < 3 or (y is not None and (y.ndim < 3 or x.shape[-2:] != y.shape[-2:])):
            raise LeanOnnxError(f"{path}: --crop needs targets with the inputs' spatial size "
                                f"(inputs {x.shape}, targets {None if y is None else y.shape})")
        if crop > min(x.shape[-2:]):
            raise LeanOnnxError(f"{path}: --crop {crop} is larger than the images {x.shape[-2:]}")
    checked = {"inputs": np.asarray(x, dtype=np.float32)}
    if y is not None:
        checked["targets"] = np.asarray(y)
    return checked


def resolve_device(name: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cpu", "cuda", "cuda:N" are checked, so a
    missing GPU is one LeanOnnxError before any work."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise LeanOnnxError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU here "
                                f"(use --device cpu or auto)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise LeanOnnxError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
        return name
    raise LeanOnnxError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")


def _device_of(module):
    """The device of the module's first parameter or buffer (CPU for a module with neither)."""
    import torch

    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def _deterministic(seed: int, device: str = "cpu"):
    """Seed torch, switch deterministic algorithms on; restore the caller's settings afterwards.
    On CUDA some kernels (cross-entropy over images among them) have no deterministic version; they only
    warn there, so a CUDA run is reproducible up to those (CPU runs are exact)."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:  # cuBLAS needs this set before its first use to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=cuda)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        torch.random.set_rng_state(state)


def _summary(module, masks: dict) -> str:
    params = sum(p.numel() for p in module.parameters())
    held = sum(int(mask.numel() - mask.sum()) for key, mask in masks.items() if mask.dim() > 1)
    return (f"{params:,} trainable parameters in {len(list(module.parameters()))} tensors; "
            f"{held:,} zero kernels held at zero")


def _epoch_line(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}" if row["epoch"] else "before training"]
    parts += [f"{k} {row[k]:.5f}" for k in ("train_loss", "val_loss", "val_accuracy", "val_top1_agreement",
                                            "val_relative_error", "val_detection_recall") if k in row]
    return " | ".join(parts) + f" | {row['seconds']:.1f} s"


# -------------------------------------------------------------------------------------------- data
def load_data(path: str, flag: str, need_targets: bool = True) -> dict:
    """An `.npz` with `inputs` and `targets` (optional without `need_targets`: distillation); every
    failure is one LeanOnnxError naming the file."""
    if not os.path.isfile(path):
        raise LeanOnnxError(f"{path}: {flag}: no such file")
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:
        raise LeanOnnxError(f"{path}: {flag}: not a readable .npz file ({str(exc).splitlines()[0][:200]})") from None
    return _checked(arrays, flag, None, path, need_targets)
