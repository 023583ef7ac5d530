"""Data-parallel fine-tuning under torchrun: `torchrun --nproc-per-node N -m lean_onnx finetune ...`.

torchrun starts N processes with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their
environment; `World.from_env()` reads them (a plain `lean-onnx` run is the one-process world, `LOCAL`,
and nothing here touches torch.distributed). `process_group(world, device)` joins the group for the
length of the training: gloo on CPU, nccl on CUDA (each process on `cuda:LOCAL_RANK`).

How a run stays independent of N (finetune.py's loop does this with the pieces here):
* every rank draws the same shuffle and the same augmentation of every *global* batch (`--batch` is the
  global batch size) from the same seeded generator, and prepares only its own contiguous share of it
  (`World.part`): the data objects consume their random numbers for the whole batch either way;
* each rank's loss is the mean over its share, weighted by share / (batch / N); DistributedDataParallel
  averages the gradients over the N ranks, which gives the gradient of the global batch's mean loss;
* a batch smaller than N leaves a rank without samples: it runs one sample with weight 0 (every rank
  must take part in every gradient all-reduce), which adds nothing;
* statistics taken over the batch inside the loss (the teacher's mean square in distill.py's
  scale-normalised MSE) are summed over the ranks (`global_mean`), as are the epoch's loss and the
  validation metrics (each rank evaluates its share of every validation batch).
Pruned kernels stay zero on every rank: each applies the same masks after the same averaged step. Only
rank 0 writes files and progress (the commands check `World.main`).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import signal
import threading
import warnings
from dataclasses import dataclass

from ..errors import LeanOnnxError, PeerFailed

#: how long a rank waits for the others in one collective before the run fails (a rank that died makes
#: the others fail at once through the closed connection; this bounds a rank that hangs)
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """Where this process stands in a data-parallel run (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" / "nccl" once the process group is up; None in one process

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes outputs and shows progress."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @staticmethod
    def from_env() -> World:
        """The world torchrun describes in the environment; `LOCAL` without torchrun (or with one process)."""
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            raise LeanOnnxError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them)") from None
        if size <= 1:
            return LOCAL
        if not 0 <= rank < size:
            raise LeanOnnxError(f"RANK {rank} is outside WORLD_SIZE {size}")
        return World(rank, size, local)

    def part(self, n: int) -> slice:
        """This rank's contiguous share of n items (the first n % size ranks get one more)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def all_sum(self, values):
        """The element-wise sum of a float64 tensor (or list of floats) over the ranks (as a list)."""
        import torch

        tensor = torch.as_tensor(values, dtype=torch.float64)
        if self.parallel:
            import torch.distributed as dist

            moved = tensor.to(_collective_device(self))
            _checked_collective(lambda: dist.all_reduce(moved))
            tensor = moved.cpu()
        return tensor.tolist()

    def barrier(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            _checked_collective(dist.barrier)


LOCAL = World()


def _collective_device(world: World):
    """nccl reduces CUDA tensors, gloo CPU ones."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else torch.device("cpu")


def _checked_collective(call):
    """Run a collective; a peer that died or hung is one PeerFailed error, not a gloo/nccl traceback."""
    try:
        return call()
    except RuntimeError as exc:  # DistBackendError and gloo's connection errors are RuntimeErrors
        raise _peer_failed(exc) from None


def _peer_failed(exc: BaseException) -> PeerFailed:
    return PeerFailed(f"lost contact with the other processes ({str(exc).splitlines()[0][:200]}): another rank "
                      "failed or stopped; nothing written")


def _is_collective_failure(exc: BaseException) -> bool:
    """A RuntimeError raised by a collective (DDP's gradient all-reduce inside backward included)."""
    import torch.distributed as dist

    error_types = tuple(t for t in (getattr(dist, "DistError", None),) if t is not None)
    text = str(exc)
    return isinstance(exc, error_types) or any(key in text for key in ("gloo", "NCCL", "nccl", "Connection closed",
                                                                       "Connection reset", "c10d"))


def global_mean(world: World, values, live: bool = True):
    """The mean of `values` (a detached tensor) over the elements of all ranks' shares of the batch; a
    rank without samples (`live` False) contributes nothing. One process: values.mean()."""
    if not world.parallel:
        return values.mean()
    mine = [float(values.detach().double().sum()), float(values.numel())] if live else [0.0, 0.0]
    total, count = world.all_sum(mine)
    return values.new_tensor(total / max(count, 1.0))


@contextlib.contextmanager
def process_group(world: World, device: str):
    """Join torchrun's process group for the training; yields (world with its backend, this rank's device).
    One process: yields (world, device) unchanged. `device` is finetune.resolve_device's answer: "cuda"
    becomes cuda:LOCAL_RANK; a fixed "cuda:N" cannot be shared by N processes and is refused."""
    if not world.parallel:
        yield world, device
        return
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        if ":" in device:
            raise LeanOnnxError(f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK; "
                                "give --device cuda or auto")
        if world.local_rank >= torch.cuda.device_count():
            raise LeanOnnxError(f"LOCAL_RANK {world.local_rank}: torch sees {torch.cuda.device_count()} CUDA "
                                "device(s); start at most that many processes per node")
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend, timeout=TIMEOUT, **({"device_id": torch.device(device)}
                                                              if backend == "nccl" else {}))
    except (RuntimeError, ValueError) as exc:
        raise LeanOnnxError(f"cannot join the {backend} process group "
                            f"({str(exc).splitlines()[0][:160]})") from None
    joined = World(world.rank, world.size, world.local_rank, backend)
    # when a rank dies, torchrun stops the others with SIGTERM, often before they reach a collective and
    # notice: they say so in one line too (the default handler would end them without a word)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stopped) if in_main else None
    try:
        yield joined, device
        # every rank finished its last collective before any closes its connections: a peer whose socket
        # closes while it still reads can abort in gloo's I/O thread instead of raising
        joined.barrier()
    except RuntimeError as exc:
        if _is_collective_failure(exc):
            raise _peer_failed(exc) from None
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _stopped(signum, frame):
    raise PeerFailed("lost contact with the other processes (torchrun stopped this one with SIGTERM): another "
                     "rank failed or stopped; nothing written")


def wrap(module, world: World, device: str):
    """`module` inside DistributedDataParallel (the same module in one process). Parameters that cannot
    reach a model output get no gradient; they are frozen first, as DDP expects every trainable parameter
    to take part in every step."""
    if not world.parallel:
        return module
    from torch.nn.parallel import DistributedDataParallel

    for key in module.dead_parameters():
        module.get_parameter(key).requires_grad_(False)
    ids = [int(device.split(":")[1])] if device.startswith("cuda") else None
    # the buffers (BatchNormalization's running statistics, which the bridge never updates) are the same on
    # every rank: no syncing before each forward (torch >= 2.14 names the option forward_sync_buffers)
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    # conv backward may lay out the gradient of a (C, 1, k, k) weight like channels-last; DDP then copies it
    # into its bucket and says so once per process: a note on speed, not on results
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(module, device_ids=ids, **{sync: False})
