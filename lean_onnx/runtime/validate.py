"""`--validate`: does the pruned model still do its job, and how much faster is it really?

Fidelity is measured with ONNX Runtime on the same inputs (random normal, or `inputs` of an `.npz`):
per output the max absolute, max relative (to the reference's max |value|) and mean absolute error of
the pruned model against the masked model (the contract of DESIGN.md section 2: must be <= 1e-5; an output
a Sigmoid makes is measured on the Sigmoid's input, rewrite/contract.py) and
against the original (what pruning cost); for classifier outputs (N, classes) the top-1 agreement, for
segmentation outputs (N, classes, H, W) the pixel agreement of the argmax. Latency of original and
pruned comes from `bench.paired_benchmark` (same provider, same threads, fixed inputs; the two timed together
in alternating rounds, as `--target-latency` times them): timed one after the other, as until session 21,
a change of the shared machine's load between the two decided the ratio (PP-PicoDet at half its MACs measured
1.03x and then 1.44x in two runs of the same command; the budget benchmark's paired rounds give 1.72x). Gates follow
Polygraphy's convention: each gate is checked, the report says which failed, and the CLI exits 3.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import LeanOnnxError
from ..rewrite.contract import RTOL


def output_errors(reference: np.ndarray, other: np.ndarray) -> dict:
    """max_abs, max_rel (relative to max |reference|) and mean_abs of `other` against `reference`."""
    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if a.shape != b.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "mean_abs": float("inf")}
    diff = np.abs(a - b)
    scale = max(float(np.abs(a).max()) if a.size else 0.0, 1e-30)
    return {"max_abs": float(diff.max()) if a.size else 0.0, "max_rel": float(diff.max()) / scale if a.size else 0.0,
            "mean_abs": float(diff.mean()) if a.size else 0.0}


def task_of(output: np.ndarray) -> str | None:
    """classification: (N, classes); segmentation: (N, classes, H, W) with several classes."""
    if output.ndim == 2 and output.shape[1] > 1:
        return "classification"
    if output.ndim == 4 and output.shape[1] > 1:
        return "segmentation"
    return None


def argmax_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Fraction of items (classification) or pixels (segmentation) whose argmax over axis 1 agrees."""
    return float(np.mean(np.argmax(reference, axis=1) == np.argmax(other, axis=1)))


def read_inputs(data: str) -> np.ndarray:
    """The `inputs` array of an .npz (read before any work, so a bad file is refused early)."""
    try:
        with np.load(data, allow_pickle=False) as arrays:
            return arrays["inputs"]
    except KeyError:
        raise LeanOnnxError(f"{data}: no array named 'inputs'") from None
    except Exception as exc:
        raise LeanOnnxError(f"{data}: not a readable .npz file ({str(exc).strip().splitlines()[0][:200]})") from None


def validation_inputs(model: onnx.ModelProto, input_shapes: dict, samples: int, seed: int,
                      data: str | None, inputs: np.ndarray | None = None) -> list[dict]:
    """Feeds: `samples` random normal batches, or the `inputs` array of an .npz in batches of the
    model's batch size (one input models only)."""
    from ..rewrite.contract import random_feeds

    if data is None:
        rng = np.random.default_rng(seed)
        return [random_feeds(model, input_shapes, rng) for _ in range(samples)]
    inputs = read_inputs(data) if inputs is None else inputs
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(names) != 1:
        raise LeanOnnxError(f"{data}: --validate-data needs a model with one input, this one has {len(names)}")
    batch = input_shapes[names[0]][0]
    if inputs.shape[1:] != tuple(input_shapes[names[0]][1:]):
        raise LeanOnnxError(f"{data}: inputs have shape {inputs.shape[1:]} per item, the model reads "
                            f"{tuple(input_shapes[names[0]][1:])} (set --input-shape)")
    count = (min(len(inputs), samples * batch) // batch) * batch
    if count == 0:
        raise LeanOnnxError(f"{data}: fewer items ({len(inputs)}) than one batch ({batch})")
    return [{names[0]: inputs[k:k + batch].astype(np.float32)} for k in range(0, count, batch)]


def fidelity(original, pruned, masked, feeds: list[dict], threads: int = 2) -> dict:
    """Per-output errors of pruned vs masked and vs original, and the argmax agreement with the original."""
    from ..rewrite.contract import session, with_logits

    (pruned_view, logits), names = with_logits(pruned), [o.name for o in pruned.graph.output]
    sessions = {"original": session(original, threads), "pruned": session(pruned_view, threads)}
    if masked is not None:
        sessions["masked"] = session(with_logits(masked)[0], threads)
    outs = {k: [s.run(None, f) for f in feeds] for k, s in sessions.items()}

    def stacked(k: str, i: int) -> np.ndarray:
        v = outs[k]
        return np.concatenate([run[i] for run in v]) if v[0][i].ndim else np.stack([run[i] for run in v])

    per_output = []
    for i, name in enumerate(names):
        reference, out = stacked("original", i), stacked("pruned", i)
        entry = {"name": name, "vs_original": output_errors(reference, out)}
        if "masked" in outs:  # an output a Sigmoid makes: on the Sigmoid's input (rewrite/contract.py)
            j = logits.get(i, i)
            entry["vs_masked"] = output_errors(stacked("masked", j), out if j == i else stacked("pruned", j))
            if j != i:
                entry["vs_masked"]["measured_on"] = sessions["pruned"].get_outputs()[j].name
        task = task_of(reference)
        if task:
            key = "top1_agreement" if task == "classification" else "pixel_agreement"
            entry["task"], entry[key] = task, argmax_agreement(reference, out)
        per_output.append(entry)
    result = {"outputs": per_output,
              "max_rel_err_vs_original": max(o["vs_original"]["max_rel"] for o in per_output)}
    if masked is not None:
        result["max_rel_err_vs_masked"] = max(o["vs_masked"]["max_rel"] for o in per_output)
    return result


def validate(original: onnx.ModelProto | str, pruned, masked, input_shapes: dict, *, provider: str = "auto",
             threads: int = 2, runs: int = 20, warmup: int = 5, samples: int = 4, seed: int = 0,
             data: str | None = None, max_error: float | None = None,
             min_speedup: float | None = None, inputs: np.ndarray | None = None) -> dict:
    """Fidelity, latency and gates (DESIGN.md section 5 `validation`); `passed` is False when the
    contract or a gate fails, and `failures` says why, one line each."""
    from .bench import paired_benchmark

    proto = original if isinstance(original, onnx.ModelProto) else onnx.load(original, load_external_data=True)
    pruned_proto = pruned if isinstance(pruned, onnx.ModelProto) else onnx.load_from_string(pruned)
    feeds = validation_inputs(proto, input_shapes, samples, seed, data, inputs)
    result = {"inputs": data or f"{samples} random normal batches (seed {seed})", "threads": threads}
    result.update(fidelity(proto, pruned_proto, masked, feeds, threads))
    timed = paired_benchmark([original, pruned], provider=provider, input_shapes=input_shapes, threads=threads,
                             runs=runs, warmup=warmup)
    timing = dict(zip(("original", "pruned"), timed))
    result["provider"] = timing["pruned"]["provider"]
    result["latency_ms"] = {k: v["latency_ms"] for k, v in timing.items()}
    result["session_ms"] = {k: v["session_ms"] for k, v in timing.items()}
    result["speedup"] = timing["original"]["latency_ms"]["median"] / timing["pruned"]["latency_ms"]["median"]
    result["warnings"] = sorted({w for v in timing.values() for w in v["warnings"]})
    result["gates"], failures = {}, []
    if masked is not None and result["max_rel_err_vs_masked"] > RTOL:
        failures.append(f"pruned != masked: max relative error {result['max_rel_err_vs_masked']:.3g} > {RTOL:g} "
                        "(a lean-onnx bug: please report)")
    if max_error is not None:
        value = result["max_rel_err_vs_original"]
        result["gates"]["max_error"] = {"limit": max_error, "value": value, "passed": value <= max_error}
        if value > max_error:
            failures.append(f"--max-error: max relative error vs the original {value:.3g} > {max_error:g}")
    if min_speedup is not None:
        value = result["speedup"]
        result["gates"]["min_speedup"] = {"limit": min_speedup, "value": value, "passed": value >= min_speedup}
        if value < min_speedup:
            failures.append(f"--min-speedup: measured speedup {value:.2f}x < {min_speedup:g}x "
                            f"({result['provider']}, median of {timing['pruned']['runs']} runs in paired rounds)")
    result["failures"], result["passed"] = failures, not failures
    return result


def print_validation(v: dict) -> None:
    """The validation block of the terminal table; the caller prints the final PASSED/FAILED line."""
    print(f"\nvalidation on {v['provider']} ({v['inputs']}, {v['threads']} threads):")
    for o in v["outputs"]:
        parts = [f"vs original max rel {o['vs_original']['max_rel']:.3g}, mean abs {o['vs_original']['mean_abs']:.3g}"]
        if "vs_masked" in o:
            parts.insert(0, f"vs masked max rel {o['vs_masked']['max_rel']:.2g}")
        if "top1_agreement" in o:
            parts.append(f"top-1 agreement {100 * o['top1_agreement']:.1f} %")
        if "pixel_agreement" in o:
            parts.append(f"pixel agreement {100 * o['pixel_agreement']:.1f} %")
        print(f"  {o['name']}: " + "; ".join(parts))
    lat = v["latency_ms"]
    print(f"  latency median {lat['original']['median']:.3f} ms -> {lat['pruned']['median']:.3f} ms "
          f"(p90 {lat['original']['p90']:.3f} -> {lat['pruned']['p90']:.3f}): speedup {v['speedup']:.2f}x")
