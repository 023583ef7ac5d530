"""`lean-onnx bench MODEL [MODEL ...]`: latency of ONNX models under ONNX Runtime, side by side.

Figures are only comparable when every model runs on the same provider with the same threads, so
the session records the providers ONNX Runtime *actually* uses (`get_providers()` after creation):
onnxruntime-gpu falls back to CPU silently on a machine without a usable GPU. `benchmark()` is the
library entry point (`--validate` and `sweep` time original vs pruned with it); `open_session()` is
shared with `lean-onnx eval`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import LeanOnnxError

SCHEMA_VERSION = 1
DEFAULT_THREADS = 2
DEFAULT_RUNS = 50
DEFAULT_WARMUP = 10
#: paired_benchmark: rounds of blocks; before each block a pause (the other sessions' threads park) and
#: untimed runs (this session's threads wake up)
PAIRED_ROUNDS = 10
PAUSE_S = 0.05
UNTIMED_RUNS = 3
#: paired_benchmark: a model whose runs are short runs more per block, so that a block is timed for at least
#: this long, after untimed runs of at least a third of it
MIN_BLOCK_S = 0.03
FEED_SEED = 0
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
#: providers whose inputs live in GPU memory: timed through IO binding (no host copies in the loop)
DEVICE_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}


@dataclass
class Session:
    """An ORT session and what it really runs on (the request may have fallen back to CPU)."""

    ort_session: object
    provider: str
    providers: list[str]
    session_ms: float
    warnings: list[str] = field(default_factory=list)

    @property
    def on_device(self) -> bool:
        return self.provider in DEVICE_PROVIDERS


@dataclass
class ModelSource:
    """A model given as a path, a ModelProto or serialized bytes, read once."""

    label: str
    proto: onnx.ModelProto
    ort_source: str | bytes  # a path keeps external data and avoids copying the weights again
    file_bytes: int


def read_source(model: str | os.PathLike | onnx.ModelProto | bytes) -> ModelSource:
    from ..graph.load import read_model

    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
        return ModelSource(model.graph.name or "<model>", model, data, len(data))
    if isinstance(model, (bytes, bytearray)):
        try:
            proto = onnx.load_from_string(bytes(model))
        except Exception as exc:
            raise LeanOnnxError(f"<bytes>: not a readable ONNX model ({_first_line(exc)})") from None
        return ModelSource(proto.graph.name or "<model>", proto, bytes(model), len(model))
    path = os.fspath(model)
    return ModelSource(path, read_model(path), path, os.path.getsize(path))


def open_session(source: ModelSource, provider: str = "auto", threads: int = DEFAULT_THREADS,
                 strict: bool = False, spinning: bool = True) -> Session:
    """Create the session; inter-op threads are 1 and intra-op `threads` (0 = ORT's own choice) so that
    runs are comparable. A requested GPU provider that is missing or that ORT dropped gives a warning
    (CPU figures follow) or, with `strict`, a LeanOnnxError. `spinning=False` stops the intra-op threads
    from busy-waiting after a run (ORT's `session.intra_op.allow_spinning`; on by default, as deployed)."""
    import onnxruntime as ort

    if provider not in ("auto", *PROVIDERS):
        raise LeanOnnxError(f"--provider {provider!r}: expected auto, cuda, tensorrt or cpu")
    available = ort.get_available_providers()
    wanted = _wanted_providers(provider, available)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    start = time.perf_counter_ns()
    try:
        sess = ort.InferenceSession(source.ort_source, options,
                                    providers=[p for p in wanted if p in available] or ["CPUExecutionProvider"])
    except Exception as exc:
        raise LeanOnnxError(f"{source.label}: ONNX Runtime cannot load it ({_first_line(exc)})") from None
    session_ms = (time.perf_counter_ns() - start) / 1e6
    actual = sess.get_providers()
    warnings = []
    if provider != "auto" and actual[0] != wanted[0]:
        reason = (f"this onnxruntime only offers {', '.join(available)}" if wanted[0] not in available else
                  "the session dropped it (no usable GPU, or missing CUDA/cuDNN/TensorRT libraries?)")
        message = f"{source.label}: {wanted[0]} was requested but {reason}"
        if strict:
            raise LeanOnnxError(f"{message}; --strict refuses to run on {actual[0]}")
        warnings.append(f"{message}; running on {actual[0]} instead")
    return Session(sess, actual[0], list(actual), session_ms, warnings)


def _wanted_providers(provider: str, available: list[str]) -> list[str]:
    if provider == "auto":
        return PROVIDERS["cuda"] if "CUDAExecutionProvider" in available else PROVIDERS["cpu"]
    return PROVIDERS[provider]


def input_shapes_for(proto: onnx.ModelProto, requested: dict | None, batch: int | None,
                     label: str) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Concrete input shapes: `requested` (from --input-shape) and load.py's defaults for symbolic dims
    (batch 1, others 224, with a warning), then dim 0 set to `batch`. load.py's rules are reused on a
    stub graph holding only the inputs, so a large model's weights are not copied."""
    from ..graph.load import _fix_input_shapes

    stub = onnx.GraphProto()
    stub.input.extend(proto.graph.input)
    stub.initializer.extend(onnx.TensorProto(name=t.name) for t in proto.graph.initializer)
    requested = dict(requested or {})
    if batch is not None:
        _set_batch(stub, requested, batch, label)
    used, _, warnings = _fix_input_shapes(stub, requested, label)
    return used, warnings


def _set_batch(stub: onnx.GraphProto, requested: dict, batch: int, label: str) -> None:
    from ..graph.load import _fixed

    if batch < 1:
        raise LeanOnnxError(f"--batch {batch}: expected a positive integer")
    inits = {t.name for t in stub.initializer}
    inputs = [i for i in stub.input if i.name not in inits]
    if None in requested and len(inputs) == 1:
        requested[inputs[0].name] = requested.pop(None)
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        if not dims:
            continue
        if _fixed(dims[0]) and dims[0].dim_value != batch:
            raise LeanOnnxError(f"{label}: input {inp.name!r} has a fixed batch of {dims[0].dim_value}; "
                                f"--batch {batch} does not fit")
        dims[0].Clear()
        dims[0].dim_value = batch
        if inp.name in requested:
            requested[inp.name] = (batch, *requested[inp.name][1:])


def random_inputs(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = FEED_SEED) -> dict:
    """Standard-normal floats; integer inputs get 0 or 1 (always a valid index), booleans random."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in proto.graph.input:
        if inp.name not in shapes:
            continue
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
        shape = shapes[inp.name]
        if dtype.kind == "f":
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[inp.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def time_on_cpu(sess, feeds: dict, runs: int, warmup: int) -> list[float]:
    """Per-run wall time in ms of plain `run` (inputs and outputs in host memory)."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times_ms = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        sess.run(None, feeds)
        times_ms.append((time.perf_counter_ns() - start) / 1e6)
    return times_ms


def time_on_device(sess, feeds: dict, runs: int, warmup: int, device: str = "cuda",
                   device_id: int = 0) -> list[float]:
    """Per-run ms on CUDA/TensorRT: inputs copied to the GPU once and bound, outputs left on the GPU,
    so the loop times the kernels rather than host<->device copies; `synchronize_outputs()` makes each
    run finish on the GPU before the clock stops (CUDA launches are asynchronous). `device="cpu"` runs
    the same code on a CPU session (the tests use it on machines without a GPU)."""
    import onnxruntime as ort

    device_inputs = {name: ort.OrtValue.ortvalue_from_numpy(x, device, device_id) for name, x in feeds.items()}
    binding = sess.io_binding()
    for name, value in device_inputs.items():
        binding.bind_ortvalue_input(name, value)
    for out in sess.get_outputs():
        binding.bind_output(out.name, device, device_id)
    binding.synchronize_inputs()
    for _ in range(warmup):
        sess.run_with_iobinding(binding)
    binding.synchronize_outputs()
    times_ms = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        times_ms.append((time.perf_counter_ns() - start) / 1e6)
    del device_inputs  # kept alive until here: the binding points at their GPU buffers
    return times_ms


def latency_summary(times_ms: list[float]) -> dict:
    t = np.asarray(times_ms, dtype=np.float64)
    return {"median": float(np.median(t)), "p90": float(np.percentile(t, 90)), "min": float(t.min()),
            "mean": float(t.mean()), "runs": int(t.size)}


def benchmark(model: str | os.PathLike | onnx.ModelProto | bytes, *, provider: str = "auto",
              input_shapes: dict | None = None, batch: int | None = None, threads: int = DEFAULT_THREADS,
              runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP, strict: bool = False) -> dict:
    """Time one model; returns the dict of one `models` entry of `bench --json` (plus `warnings`,
    `params`, `file_bytes`). Raises LeanOnnxError for unreadable models or bad options."""
    if runs < 1 or warmup < 0 or threads < 0:
        raise LeanOnnxError(f"--runs {runs} / --warmup {warmup} / --threads {threads}: expected runs >= 1, "
                            "warmup >= 0, threads >= 0")
    source = read_source(model)
    shapes, warnings = input_shapes_for(source.proto, input_shapes, batch, source.label)
    session = open_session(source, provider, threads, strict)
    feeds = random_inputs(source.proto, shapes)
    timer = time_on_device if session.on_device else time_on_cpu
    try:
        times_ms = timer(session.ort_session, feeds, runs, warmup)
    except Exception as exc:
        raise LeanOnnxError(f"{source.label}: inference failed ({_first_line(exc)})") from None
    return _entry(source, session, shapes, threads, warmup, times_ms, warnings + session.warnings)


def _entry(source: ModelSource, session: Session, shapes: dict, threads: int, warmup: int, times_ms: list[float],
           warnings: list[str]) -> dict:
    """One model's figures: a `models` entry of `bench --json` plus `warnings`, `params`, `file_bytes`."""
    from ..graph.cost import float_params

    latency = latency_summary(times_ms)
    items = _batch_of(shapes)
    return {"path": source.label, "provider": session.provider, "providers": session.providers,
            "batch": items, "input_shapes": {k: list(v) for k, v in shapes.items()}, "threads": threads,
            "runs": len(times_ms), "warmup": warmup, "session_ms": session.session_ms, "latency_ms": latency,
            "throughput_per_s": items / (latency["median"] / 1e3) if latency["median"] > 0 else None,
            "params": float_params(source.proto), "file_bytes": source.file_bytes, "warnings": warnings}


def paired_benchmark(models: list, *, provider: str = "auto", input_shapes: dict | None = None,
                     threads: int = DEFAULT_THREADS, runs: int = DEFAULT_RUNS,
                     warmup: int = DEFAULT_WARMUP, rounds: int = PAIRED_ROUNDS, spinning: bool = True,
                     min_block_s: float = MIN_BLOCK_S, batch: int | None = None, strict: bool = False) -> list[dict]:
    """Time several models in paired rounds: every model warmed up, then `rounds` rounds (the order reversed
    every other round) in which each model runs a block of `runs / rounds` timed runs, so that what a shared,
    noisy machine does to one model's timings it does to the others' too (a drifting load moves all medians
    alike and their ratio stays). The sessions run as deployed, with ORT's default spinning threads; before
    its block a model pauses `PAUSE_S` and runs `UNTIMED_RUNS` times untimed, so the threads of the session
    before it have parked and its own are awake (with a 20 ms pause and one untimed run, a model listed
    second measured 0.90 and 0.94 of itself, always slower; with these, 0.91-1.02 either way on a busy
    machine, and 0.98-1.07 in tools/bench_budget.py's controls). Taking turns run by run, the idle
    sessions' spinning threads took the cores from the one running (4x slower on 2 cores); with spinning
    off instead, every op pays a thread wake-up that a deployment does not (PP-LCNet alone: 3.0-3.7 ms
    against 2.4-3.2 ms with spinning), a fixed cost that understates what pruning gains. `spinning=False`
    times that configuration instead.
    A block lasts at least `min_block_s`: a model whose runs are shorter (the median of runs timed for a third
    of it after the warm-up) runs more in each block, and more untimed before it (a third of that time), so
    `runs` is a least number. Blocks of
    3 runs of a 1 ms model timed the wake-up after the pause, not the model: PP-LCNet at a quarter of its
    MACs measured 0.37-0.64 of the MACs speed-up from one process to the next (and two identical models in
    one process 0.46 and 0.64), against 0.64-0.66 in every process with 30-run blocks (session 20).
    Returns per model what `benchmark` returns ("runs" the timed ones) and `"timing": "paired"`, in order."""
    if runs < 1 or warmup < 0 or threads < 0 or rounds < 1:
        raise LeanOnnxError(f"--runs {runs} / --warmup {warmup} / --threads {threads}: expected runs >= 1, "
                            "warmup >= 0, threads >= 0")
    opened, described = [], []
    for model in models:
        source = read_source(model)
        shapes, shape_warnings = input_shapes_for(source.proto, input_shapes, batch, source.label)
        session = open_session(source, provider, threads, strict, spinning=spinning)
        timer = time_on_device if session.on_device else time_on_cpu
        opened.append((source.label, session, random_inputs(source.proto, shapes), timer))
        described.append((source, shapes, shape_warnings + session.warnings))
    times: list[list[float]] = [[] for _ in opened]
    rounds = min(rounds, runs)
    try:
        least = []  # per model: (timed runs that last min_block_s, untimed runs before such a block)
        for label, session, feeds, timer in opened:
            label_now = label
            timer(session.ort_session, feeds, 0, warmup)
            if min_block_s > 0:
                per_run_s = _per_run_s(timer, session.ort_session, feeds, min_block_s / 3)
                least.append((math.ceil(min_block_s / per_run_s),
                              max(UNTIMED_RUNS, math.ceil(min_block_s / 3 / per_run_s))))
            else:
                least.append((0, UNTIMED_RUNS))
        for r in range(rounds):
            block = (runs * (r + 1)) // rounds - (runs * r) // rounds
            order = range(len(opened)) if r % 2 == 0 else reversed(range(len(opened)))
            for k in order:
                label_now, session, feeds, timer = opened[k]
                short = 0 < block < least[k][0]
                time.sleep(PAUSE_S)
                times[k] += timer(session.ort_session, feeds, least[k][0] if short else block,
                                  least[k][1] if short else UNTIMED_RUNS)
    except Exception as exc:
        raise LeanOnnxError(f"{label_now}: inference failed ({_first_line(exc)})") from None
    return [dict(_entry(source, session, shapes, threads, warmup, t, w), timing="paired")
            for (_, session, _, _), t, (source, shapes, w) in zip(opened, times, described)]


def _per_run_s(timer, sess, feeds: dict, seconds: float) -> float:
    """Median seconds of one run, over runs timed for at least `seconds` (one at the least): a few warm-up
    runs of a microsecond model are several times slower than its later runs, and an estimate from them made
    its blocks a third of `min_block_s`."""
    times, start = [], time.perf_counter()
    while not times or time.perf_counter() - start < seconds:
        times += timer(sess, feeds, 1, 0)
    return max(float(np.median(times)) / 1e3, 1e-6)


def _batch_of(shapes: dict[str, tuple[int, ...]]) -> int:
    """Items per run: dim 0 of the first input with a dim (1 for scalar-only models)."""
    return next((s[0] for s in shapes.values() if s), 1)


def add_ratios(entries: list[dict]) -> None:
    """speedup = median of the first / median of this one; params and file size as this / first."""
    first = entries[0]
    for e in entries:
        e["speedup_vs_first"] = _ratio(first["latency_ms"]["median"], e["latency_ms"]["median"])
        e["params_vs_first"] = _ratio(e["params"], first["params"])
        e["file_bytes_vs_first"] = _ratio(e["file_bytes"], first["file_bytes"])


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# ------------------------------------------------------------------------------------------ table

COLUMNS = (("model", lambda e: os.path.basename(e["path"])),
           ("provider", lambda e: e["provider"].replace("ExecutionProvider", "")),
           ("batch", lambda e: str(e["batch"])),
           ("median ms", lambda e: f"{e['latency_ms']['median']:.3f}"),
           ("p90 ms", lambda e: f"{e['latency_ms']['p90']:.3f}"),
           ("min ms", lambda e: f"{e['latency_ms']['min']:.3f}"),
           ("items/s", lambda e: _fmt(e["throughput_per_s"], ".1f")),
           ("session ms", lambda e: f"{e['session_ms']:.1f}"),
           ("params", lambda e: f"{e['params']:,}"),
           ("file", lambda e: _size(e["file_bytes"])),
           ("speedup", lambda e: _fmt(e["speedup_vs_first"], ".2f", "x")),
           ("params ratio", lambda e: _fmt(e["params_vs_first"], ".3f")),
           ("size ratio", lambda e: _fmt(e["file_bytes_vs_first"], ".3f")))


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def print_table(entries: list[dict]) -> None:
    rows = [[name for name, _ in COLUMNS]] + [[cell(e) for _, cell in COLUMNS] for e in entries]
    widths = [max(len(r[k]) for r in rows) for k in range(len(COLUMNS))]
    for r in rows:
        print("  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))))
    e = entries[0]
    print(f"(threads {e['threads']}, {e['runs']} runs after {e['warmup']} warm-up; speedup = median of "
          f"the first model / median of each)")
