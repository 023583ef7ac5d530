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


def finetune(model: onnx.ModelProto, train: dict, val: dict | None = None, epochs: int = 3, lr: float = 1e-3,
             batch: int = 5, seed: int = 0, crop: int | None = None, loss: str = "auto",
             keep_zero_kernels: bool = True, progress=None, path: str = "<model>", device: str = "auto",
             optimizer_state: dict | None = None, state_out: dict | None = None):
    """Train `model` on `train` ({"inputs", "targets"} arrays) for `epochs`; returns (trained ModelProto
    with the template's interface, history: one dict per epoch with train_loss, val_loss, val_accuracy
    (classification/segmentation), seconds). `crop`: random crops of crop x crop pixels for training
    (dense targets only); validation always runs on full inputs. `progress(str)` receives one line per
    epoch. `device`: "auto" (CUDA when torch sees a GPU, else CPU), "cpu", "cuda" or "cuda:N".
    `optimizer_state`: Adam's state ({initializer name: {"step", "exp_avg", "exp_avg_sq"}}) to start
    from, for the parameters whose name and shape match (the others start fresh); `state_out`, when
    given, receives the final state in that form (the reference keeps one Adam through its schedule)."""
    import torch

    from .bridge import apply_masks, export_onnx, mask_gradients, to_torch, zero_kernel_masks

    train = _checked(train, "train", crop, path)
    val = _checked(val, "val", None, path) if val is not None else None
    loss_kind = _loss_kind(loss, train["targets"], path)
    device = resolve_device(device)
    with _deterministic(seed, device):
        module = to_torch(model, path).to(device)
        if len(module.input_names) != 1:
            raise LeanOnnxError(f"{path}: finetune needs a model with one input, not {module.input_names}")
        masks = zero_kernel_masks(module) if keep_zero_kernels else {}
        if progress:
            progress(_summary(module, masks) + f"; on {device}")
        optimizer = torch.optim.Adam(module.parameters(), lr=lr)
        for key, parameter in module.named_parameters():
            saved = (optimizer_state or {}).get(module.onnx_name[key])
            if saved is not None and saved["exp_avg"].shape == parameter.shape:
                optimizer.state[parameter] = {k: v.clone() if k == "step" else v.clone().to(device)  # step: CPU
                                              for k, v in saved.items()}
        rng = np.random.default_rng(seed)
        history = []
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            module.train()
            train_loss = _train_epoch(module, optimizer, masks, train, batch, crop, loss_kind, rng,
                                      apply_masks, mask_gradients)
            row = {"epoch": epoch, "train_loss": train_loss}
            if val is not None:
                row.update(evaluate(module, val, batch, loss_kind))
            row["seconds"] = time.perf_counter() - start
            history.append(row)
            if progress:
                progress(_epoch_line(row, epochs))
        module.eval()
        if state_out is not None:
            state_out.update({module.onnx_name[key]: {k: v.detach().cpu().clone() for k, v in optimizer.state[p].items()}
                              for key, p in module.named_parameters() if p in optimizer.state})
        return export_onnx(module, model), history


def _train_epoch(module, optimizer, masks, data, batch, crop, loss_kind, rng, apply_masks, mask_gradients) -> float:
    """One shuffled pass; returns the training loss averaged over the samples."""
    import torch

    order = rng.permutation(len(data["inputs"]))
    device = _device_of(module)
    total, count = 0.0, 0
    for first in range(0, len(order), batch):
        index = np.sort(order[first:first + batch])  # sorted: npz-backed arrays read faster
        x, y = data["inputs"][index], data["targets"][index]
        if crop:
            x, y = _random_crops(x, y, crop, rng)
        loss = _loss(module(torch.from_numpy(np.ascontiguousarray(x)).to(device)),
                     torch.from_numpy(np.ascontiguousarray(y)).to(device), loss_kind)
        optimizer.zero_grad()
        loss.backward()
        mask_gradients(module, masks)
        optimizer.step()
        apply_masks(module, masks)
        total += loss.item() * len(index)
        count += len(index)
    return total / max(count, 1)


def evaluate(module, data: dict, batch: int = 5, loss_kind: str = "ce") -> dict:
    """Mean loss per element over `data` and, for cross-entropy, global accuracy (correct / total
    target elements: the paper's pixel accuracy for segmentation)."""
    import torch

    module.eval()
    device = _device_of(module)
    loss_sum, correct, elements = 0.0, 0, 0
    with torch.no_grad():
        for first in range(0, len(data["inputs"]), batch):
            x = torch.from_numpy(np.ascontiguousarray(data["inputs"][first:first + batch])).to(device)
            y = torch.from_numpy(np.ascontiguousarray(data["targets"][first:first + batch])).to(device)
            out = _first_output(module(x))
            n = y.numel()
            loss_sum += _loss(out, y, loss_kind).item() * n
            elements += n
            if loss_kind == "ce":
                correct += int((out.argmax(1) == y).sum())
    result = {"val_loss": loss_sum / max(elements, 1)}
    if loss_kind == "ce":
        result["val_accuracy"] = correct / max(elements, 1)
    return result


def _loss(output, target, loss_kind: str):
    import torch.nn.functional as F

    output = _first_output(output)
    if loss_kind == "ce":
        return F.cross_entropy(output, target.long())
    return F.mse_loss(output, target.to(output.dtype))


def _first_output(output):
    return output[0] if isinstance(output, tuple) else output


def _random_crops(x: np.ndarray, y: np.ndarray, crop: int, rng: np.random.Generator):
    """One random crop x crop window per sample, the same window in input and target."""
    height, width = x.shape[-2:]
    xs, ys = [], []
    for k in range(len(x)):
        top, left = rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)
        xs.append(x[k, ..., top:top + crop, left:left + crop])
        ys.append(y[k, ..., top:top + crop, left:left + crop])
    return np.stack(xs), np.stack(ys)


def _loss_kind(loss: str, targets: np.ndarray, path: str) -> str:
    if loss not in LOSSES:
        raise LeanOnnxError(f"--loss {loss!r}: choose from {', '.join(LOSSES)}")
    if loss != "auto":
        return loss
    return "ce" if np.issubdtype(targets.dtype, np.integer) else "mse"


def _checked(data: dict, what: str, crop: int | None, path: str) -> dict:
    """The data with float32 inputs, or one LeanOnnxError saying what is wrong with it."""
    for key in ("inputs", "targets"):
        if key not in data:
            raise LeanOnnxError(f"{path}: {what} data has no {key!r} array (has {sorted(data)})")
    if len(data["inputs"]) != len(data["targets"]) or len(data["inputs"]) == 0:
        raise LeanOnnxError(f"{path}: {what} data: {len(data['inputs'])} inputs but {len(data['targets'])} targets")
    if crop:
        x, y = data["inputs"], data["targets"]
        if x.ndim < 3 or y.ndim < 3 or x.shape[-2:] != y.shape[-2:]:
            raise LeanOnnxError(f"{path}: --crop needs targets with the inputs' spatial size "
                                f"(inputs {x.shape}, targets {y.shape})")
        if crop > min(x.shape[-2:]):
            raise LeanOnnxError(f"{path}: --crop {crop} is larger than the images {x.shape[-2:]}")
    return {"inputs": np.asarray(data["inputs"], dtype=np.float32), "targets": np.asarray(data["targets"])}


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
    parts = [f"epoch {row['epoch']}/{epochs}", f"train_loss {row['train_loss']:.5f}"]
    parts += [f"{k} {row[k]:.5f}" for k in ("val_loss", "val_accuracy") if k in row]
    return " | ".join(parts) + f" | {row['seconds']:.1f} s"


# -------------------------------------------------------------------------------------------- data
def load_data(path: str, flag: str) -> dict:
    """An `.npz` with `inputs` and `targets`; every failure is one LeanOnnxError naming the file."""
    if not os.path.isfile(path):
        raise LeanOnnxError(f"{path}: {flag}: no such file")
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:
        raise LeanOnnxError(f"{path}: {flag}: not a readable .npz file ({str(exc).splitlines()[0][:200]})") from None
    return _checked(arrays, flag, None, path)
