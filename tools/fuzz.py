"""Fuzz the pruner with random CNNs (tests/graphgen.py) and count what happens to each.

    python tools/fuzz.py --cases 200 --seed 0 [--keep 0.5] [--method lean] [--dump DIR] [-v]

Case k is build_random_cnn(seed + k), so `--cases 1 --seed S` replays one case. Outcomes:
  pruned-and-equal     lean_onnx.prune.prune returned, both models are valid and the contract holds
  refused-with-reason  a LeanOnnxError with a message (e.g. nothing to prune)
  crash                any other exception, an "internal:" LeanOnnxError, or the generator failed
  invalid-model        the pruned or masked model fails the ONNX checker or ONNX Runtime refuses it
                       (including prune's own "internal: ... fails onnx.checker" refusal)
  contract-violation   lean_onnx.contract.check_contract raised AssertionError (DESIGN.md section 2)
Exit 1 when any of the last three occurred.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections import Counter

import numpy as np
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lean_onnx.contract import check_contract  # noqa: E402
from lean_onnx.errors import LeanOnnxError  # noqa: E402
from lean_onnx.prune import prune  # noqa: E402  (not re-exported by lean_onnx/__init__.py; see docs/robustness.md)
from tests.graphgen import build_random_cnn  # noqa: E402

OUTCOMES = ("pruned-and-equal", "refused-with-reason", "crash", "invalid-model", "contract-violation")
FAILURES = OUTCOMES[2:]
KEEPS = (0.05, 0.2, 0.5, 0.8, 1.0)
METHODS = ("lean", "sv", "l1")


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


def _where(e: Exception) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {str(e)[:200]} at {os.path.basename(frame.filename)}:{frame.lineno}"


def _refusal(e: LeanOnnxError) -> Outcome:
    """A LeanOnnxError is a refusal only when it explains itself; "internal:" ones are bugs."""
    msg = str(e).strip()
    if not msg:
        return Outcome("contract-violation", f"{type(e).__name__} without a message")
    if "internal:" in msg:
        kind = "invalid-model" if "fails onnx.checker" in msg else "crash"
        return Outcome(kind, f"{type(e).__name__}: {msg.splitlines()[0][:300]}")
    return Outcome("refused-with-reason", msg.splitlines()[0])


def check_case(model, input_shape, rng, keep: float | None = None, method: str | None = "lean") -> Outcome:
    """Prune one model at `keep` with `method` (each drawn from rng when None) and say which outcome it met."""
    keep = float(rng.choice(KEEPS)) if keep is None else keep
    method = str(rng.choice(METHODS)) if method is None else method
    fold = bool(rng.integers(2))  # --fold-constants on half of the cases
    shapes = {"input": tuple(input_shape)}
    try:
        result = prune(model, keep=keep, method=method, input_shapes=shapes, fold_constants=fold,
                       round_channels=int(rng.choice([1, 16])))
    except LeanOnnxError as e:
        return _refusal(e)
    except Exception as e:
        return Outcome("crash", f"{method} keep={keep}: " + _where(e))
    for tag, m in (("pruned", result.model), ("masked", result.masked)):
        try:
            onnx.checker.check_model(m, full_check=True)
            _session(m)
        except Exception as e:
            return Outcome("invalid-model", f"{method} keep={keep}: {tag}: {type(e).__name__}: "
                                            f"{str(e).splitlines()[0][:200]}")
    try:
        check_contract(model, result, shapes, rng)
    except AssertionError as e:
        return Outcome("contract-violation", f"{method} keep={keep}: {e}")
    except Exception as e:
        return Outcome("crash", f"{method} keep={keep}: check_contract: " + _where(e))
    return Outcome("pruned-and-equal", f"{method} keep={keep}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=float, default=None, help="default: drawn per case from %s" % (KEEPS,))
    ap.add_argument("--method", default="lean", choices=METHODS + ("any",),
                    help="'any': drawn per case from %s" % (METHODS,))
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
            outcome = check_case(model, input_shape, np.random.default_rng(seed), args.keep,
                                 None if args.method == "any" else args.method)
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
    print(f"{'total':<22}{sum(counts.values()):>7}   ({elapsed_s:.1f} s, {1000 * elapsed_s / max(args.cases, 1):.1f} ms/case)")
    failed = sum(counts[k] for k in FAILURES)
    print("FAILED" if failed else "PASSED", f"({failed} failing case(s); replay: --cases 1 --seed S)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
