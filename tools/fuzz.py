"""Fuzz the pruner with random CNNs (tests/graphgen.py) and count what happens to each.

    python tools/fuzz.py --cases 200 --seed 0 [--keep 0.5] [--method lean] [--dump DIR] [-v]

Case k is build_random_cnn(seed + k), so `--cases 1 --seed S` replays one case. Outcomes:
  pruned-and-equal     lean_onnx.prune returned, both models are valid and the contract holds
  refused-with-reason  a LeanOnnxError with a message (e.g. nothing to prune)
  inspected-only       no lean_onnx.prune yet: load + build_channel_graph succeeded, nothing pruned
  crash                any other exception (or the generator failed)
  invalid-model        the pruned or masked model fails the ONNX checker or ONNX Runtime refuses it
  contract-violation   check_contract (lean_onnx.contract, else the basic one below) raised AssertionError
Exit 1 when any of the last three occurred.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections import Counter

import numpy as np
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lean_onnx  # noqa: E402
from lean_onnx.errors import LeanOnnxError  # noqa: E402
from tests.graphgen import build_random_cnn  # noqa: E402

OUTCOMES = ("pruned-and-equal", "refused-with-reason", "inspected-only", "crash", "invalid-model", "contract-violation")
FAILURES = OUTCOMES[3:]
KEEPS = (0.05, 0.2, 0.5, 0.8, 1.0)
PRUNE = getattr(lean_onnx, "prune", None)  # being written; until then cases are only inspected


class Outcome(str):
    """An outcome string that also carries a one-line detail."""

    def __new__(cls, kind: str, detail: str = ""):
        obj = super().__new__(cls, kind)
        obj.detail = detail
        return obj


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def basic_contract(original, result, input_shape, rng) -> None:
    """DESIGN.md section 2 in short: pruned(x) == masked(x); same output names and shapes; keep 1.0
    changes nothing. Used until lean_onnx.contract exists."""
    x = {"input": rng.standard_normal(input_shape).astype(np.float32)}
    names = [o.name for o in original.graph.output]
    assert [o.name for o in result.model.graph.output] == names, "graph output names changed"
    runs = {tag: _session(m).run(names, x) for tag, m in
            (("original", original), ("masked", result.masked), ("pruned", result.model))}
    keep = result.report.get("keep_requested") if isinstance(result.report, dict) else None
    for i, name in enumerate(names):
        ref = runs["masked"][i]
        for tag, tol in (("pruned", 1e-5),) + ((("original", 1e-5),) if keep == 1.0 else ()):
            got = runs[tag][i]
            assert got.shape == ref.shape, f"{name}: {tag} shape {got.shape} != masked {ref.shape}"
            err = float(np.abs(got - ref).max()) / max(float(np.abs(ref).max()), 1e-30)
            assert err <= tol, f"{name}: {tag} vs masked relative error {err:.2e} > {tol:g}"


try:
    from lean_onnx.contract import check_contract
except ImportError:
    check_contract = basic_contract


def _where(e: Exception) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {str(e)[:200]} at {os.path.basename(frame.filename)}:{frame.lineno}"


def _inspect_only(model, input_shape) -> Outcome:
    from lean_onnx import build_channel_graph, load_model

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "case.onnx")
        onnx.save(model, path)
        build_channel_graph(load_model(path, {"input": tuple(input_shape)}))
    return Outcome("inspected-only")


def check_case(model, input_shape, rng, keep: float | None = None, method: str = "lean") -> Outcome:
    """Prune one model at `keep` (drawn from rng when None) and say which outcome it met."""
    keep = float(rng.choice(KEEPS)) if keep is None else keep
    try:
        if PRUNE is None:
            return _inspect_only(model, input_shape)
        result = PRUNE(model, keep=keep, method=method, input_shapes={"input": tuple(input_shape)})
    except LeanOnnxError as e:
        if not str(e).strip():
            return Outcome("contract-violation", f"{type(e).__name__} without a message")
        return Outcome("refused-with-reason", str(e))
    except Exception as e:
        return Outcome("crash", _where(e))
    for tag, m in (("pruned", result.model), ("masked", result.masked)):
        try:
            onnx.checker.check_model(m, full_check=True)
            _session(m)
        except Exception as e:
            return Outcome("invalid-model", f"{tag}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    try:
        check_contract(model, result, input_shape, rng)
    except AssertionError as e:
        return Outcome("contract-violation", f"keep={keep}: {e}")
    except Exception as e:
        return Outcome("crash", "check_contract: " + _where(e))
    return Outcome("pruned-and-equal", f"keep={keep}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=float, default=None, help="default: drawn per case from %s" % (KEEPS,))
    ap.add_argument("--method", default="lean")
    ap.add_argument("--dump", metavar="DIR", help="write each failing case's model to DIR/seed_S.onnx")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case, not only failures")
    args = ap.parse_args(argv)
    counts, start = Counter(), time.perf_counter()
    for seed in range(args.seed, args.seed + args.cases):
        try:
            model, input_shape = build_random_cnn(seed)
        except Exception as e:
            model, outcome = None, Outcome("crash", "generator: " + _where(e))
        else:
            outcome = check_case(model, input_shape, np.random.default_rng(seed), args.keep, args.method)
        counts[str(outcome)] += 1
        if outcome in FAILURES or args.verbose:
            print(f"[{'E' if outcome in FAILURES else 'I'}] seed={seed} {outcome}: {outcome.detail}", file=sys.stderr)
        if outcome in FAILURES and args.dump and model is not None:
            os.makedirs(args.dump, exist_ok=True)
            onnx.save(model, os.path.join(args.dump, f"seed_{seed}.onnx"))
    elapsed_s = time.perf_counter() - start
    print(f"{'outcome':<22}{'cases':>7}")
    for kind in OUTCOMES:
        print(f"{kind:<22}{counts[kind]:>7}")
    print(f"{'total':<22}{sum(counts.values()):>7}   ({1000 * elapsed_s / max(args.cases, 1):.1f} ms/case,"
          f" prune API {'present' if PRUNE else 'absent: inspect only'})")
    failed = sum(counts[k] for k in FAILURES)
    print("FAILED" if failed else "PASSED", f"({failed} failing case(s); replay: --cases 1 --seed S)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
