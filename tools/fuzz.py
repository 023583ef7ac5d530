"""Fuzz the pruner with random CNNs (tests/graphgen.py), mutated models and mutated bytes.

    python tools/fuzz.py --cases 200 --seed 0 [--keep 0.5] [--method lean] [--mutation all] [--dump DIR] [-v]

Case k is build_random_cnn(seed + k), changed by one mutation drawn from --mutation (`all`: one of
MUTATIONS per case, `none` the plain model), so `--cases 1 --seed S` replays one case. Mutations:
  none              the generated model as it is
  unknown-op        an activation becomes an op lean-onnx has no rule for (Sin: frozen) or one ONNX does
                    not know (refused: the checker fails)
  custom-domain     a com.microsoft Gelu (another domain: frozen; ONNX Runtime runs it) on a feature map
  group             a conv gets group=2 with its weight cut to fit (valid)
  group-raw         a conv gets group=2 and keeps its weight (invalid: must be refused)
  drop-value-info   shapes inferred into value_info, then one entry dropped
  names             every node name empty, or every node named the same (ONNX Runtime refuses duplicates)
  bytes             the serialised model with 1-4 bits flipped, a cut, or a run of random bytes, read from a
                    file like the command line reads it (hostile input)
Outcomes:
  pruned-and-equal     prune returned, both models are valid and the contract holds
  refused-with-reason  a LeanOnnxError with a message (nothing to prune, invalid input, ...)
  crash                any other exception (a traceback), an "internal:" LeanOnnxError, or the generator failed
  invalid-model        the pruned or masked model fails the ONNX checker or ONNX Runtime refuses it
                       (including prune's own "internal: ... fails onnx.checker" refusal)
  contract-violation   lean_onnx.rewrite.contract.check_contract raised AssertionError (DESIGN.md section 2)
Exit 1 when any of the last three occurred. A mutant that the checker accepts but ONNX Runtime refuses is
compared pruned vs masked only (there is no original output to compare with).
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
from onnx import helper, numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lean_onnx.errors import LeanOnnxError  # noqa: E402
from lean_onnx.rewrite.contract import check_contract, session  # noqa: E402
from lean_onnx.rewrite.pruner import prune  # noqa: E402  (not re-exported by lean_onnx/__init__.py; see docs/robustness.md)
from tests.graphgen import build_random_cnn  # noqa: E402

OUTCOMES = ("pruned-and-equal", "refused-with-reason", "crash", "invalid-model", "contract-violation")
FAILURES = OUTCOMES[2:]
KEEPS = (0.05, 0.2, 0.5, 0.8, 1.0)
METHODS = ("lean", "sv", "l1")
MUTATIONS = ("none", "unknown-op", "custom-domain", "group", "group-raw", "drop-value-info", "names", "bytes")
ACTIVATIONS = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSwish", "Tanh", "HardSigmoid"}


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


# -- mutations ----------------------------------------------------------------------------------------

def _feature_maps(model: onnx.ModelProto) -> list[str]:
    """Outputs of convs and activations (4-D feature maps) that are not graph outputs."""
    outputs = {o.name for o in model.graph.output}
    return [n.output[0] for n in model.graph.node if n.op_type in {"Conv"} | ACTIVATIONS and n.output[0] not in outputs]


def _mutate(model: onnx.ModelProto, kind: str, rng: np.random.Generator):
    """(the mutated model, or bytes for `bytes`; a note), or (None, why) when the model offers no place."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    if kind == "unknown-op":
        acts = [n for n in nodes if n.op_type in ACTIVATIONS]
        if not acts:
            return None, "no activation"
        node = acts[int(rng.integers(len(acts)))]
        op = str(rng.choice(["Sin", "NotAnOnnxOp"]))
        del node.input[1:]
        del node.attribute[:]
        node.op_type = op
        return m, f"{node.name}: {op}"
    if kind == "custom-domain":
        maps = _feature_maps(m)
        if not maps:
            return None, "no feature map"
        tensor = maps[int(rng.integers(len(maps)))]
        new = tensor + "__gelu"
        for n in m.graph.node:
            for k, name in enumerate(n.input):
                if name == tensor:
                    n.input[k] = new
        producer = next(k for k, n in enumerate(m.graph.node) if tensor in n.output)
        m.graph.node.insert(producer + 1, helper.make_node("Gelu", [tensor], [new], domain="com.microsoft",
                                                           name="fuzz/Gelu"))
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return m, f"Gelu after {tensor}"
    if kind in ("group", "group-raw"):
        inits = {t.name: t for t in m.graph.initializer}
        convs = [n for n in nodes if n.op_type == "Conv" and n.input[1] in inits
                 and not any(a.name == "group" and a.i != 1 for a in n.attribute)
                 and inits[n.input[1]].dims[0] % 2 == 0 and inits[n.input[1]].dims[1] % 2 == 0]
        if not convs:
            return None, "no conv with even channel counts"
        node = convs[int(rng.integers(len(convs)))]
        for a in list(node.attribute):
            if a.name == "group":
                node.attribute.remove(a)
        node.attribute.append(helper.make_attribute("group", 2))
        if kind == "group":
            w = numpy_helper.to_array(inits[node.input[1]])
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[:, : w.shape[1] // 2]),
                                                                  node.input[1]))
        return m, f"{node.name}: group 2"
    if kind == "drop-value-info":
        m = onnx.shape_inference.infer_shapes(m)
        if not m.graph.value_info:
            return None, "no value_info"
        k = int(rng.integers(len(m.graph.value_info)))
        name = m.graph.value_info[k].name
        del m.graph.value_info[k]
        return m, f"dropped {name}"
    if kind == "names":
        same = bool(rng.integers(2))
        for n in m.graph.node:
            n.name = "n" if same else ""
        return m, "all named 'n'" if same else "all unnamed"
    if kind == "bytes":
        data = bytearray(m.SerializeToString())
        how = int(rng.integers(3))
        if how == 0:
            positions = rng.integers(0, len(data), size=int(rng.integers(1, 5)))
            for p in positions:
                data[p] ^= 1 << int(rng.integers(8))
            return bytes(data), f"bits flipped at {sorted(positions.tolist())}"
        if how == 1:
            cut = int(rng.integers(1, len(data)))
            return bytes(data[:cut]), f"cut at {cut} of {len(data)}"
        start = int(rng.integers(len(data)))
        length = int(rng.integers(1, 64))
        data[start:start + length] = rng.bytes(min(length, len(data) - start))
        return bytes(data), f"random bytes at {start}..{start + length}"
    return m, ""


def _runnable(model: onnx.ModelProto | None):
    """An ONNX Runtime session of the model with node names made unique, or None when ORT refuses it."""
    if model is None:
        return None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for k, n in enumerate(m.graph.node):
        n.name = f"{n.name}#{k}"
    try:
        return _session(m)
    except Exception:
        return None


# -- one case -----------------------------------------------------------------------------------------

def check_case(model, input_shape, rng, keep: float | None = None, method: str | None = "lean",
               source=None) -> Outcome:
    """Prune one model at `keep` with `method` (each drawn from rng when None) and say which outcome it met.
    `source` (a path) is what prune reads when given (mutated bytes); `model` is then the parsed file, or None."""
    keep = float(rng.choice(KEEPS)) if keep is None else keep
    method = str(rng.choice(METHODS)) if method is None else method
    fold = bool(rng.integers(2))  # --fold-constants on half of the cases
    shapes = {"input": tuple(input_shape)}
    try:
        result = prune(source or model, keep=keep, method=method, input_shapes=shapes, fold_constants=fold,
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
    reference = _runnable(model)
    note = "" if reference is not None else " (ONNX Runtime refuses the input: pruned vs masked only)"
    try:
        check_contract(model if reference is not None else result.masked, result, shapes, rng,
                       original_session=reference or session(result.masked))
    except AssertionError as e:
        return Outcome("contract-violation", f"{method} keep={keep}: {e}")
    except Exception as e:
        return Outcome("crash", f"{method} keep={keep}: check_contract: " + _where(e))
    return Outcome("pruned-and-equal", f"{method} keep={keep}{note}")


def run_case(seed: int, mutation: str, keep=None, method=None, folder: str | None = None):
    """(outcome, mutation used, the model or bytes to dump) of case `seed`."""
    rng = np.random.default_rng(seed)
    try:
        model, input_shape = build_random_cnn(seed)
    except Exception as e:
        return Outcome("crash", "generator: " + _where(e)), mutation, None
    kind = str(rng.choice(MUTATIONS)) if mutation == "all" else mutation
    mutant, note = _mutate(model, kind, rng)
    if mutant is None:
        kind, mutant, note = "none", model, f"({note})"
    if isinstance(mutant, bytes):
        path = os.path.join(folder or tempfile.gettempdir(), f"fuzz_{seed}.onnx")
        with open(path, "wb") as f:
            f.write(mutant)
        try:
            parsed = onnx.load(path)
        except Exception:
            parsed = None
        try:
            outcome = check_case(parsed, input_shape, rng, keep, method, source=path)
        finally:
            os.unlink(path)
    else:
        outcome = check_case(mutant, input_shape, rng, keep, method)
    outcome.detail = f"[{kind}{' ' + note if note else ''}] {outcome.detail}"
    return outcome, kind, mutant


def fuzz(cases: int, seed: int = 0, keep=None, method: str | None = "lean", mutation: str = "all",
         dump: str | None = None, verbose: bool = False, out=sys.stderr) -> tuple[Counter, dict]:
    """Run `cases` cases from `seed`; returns (counts per outcome, {mutation: counts per outcome})."""
    counts, by_kind = Counter(), {}
    with tempfile.TemporaryDirectory(prefix="lean_onnx_fuzz_") as folder:
        for s in range(seed, seed + cases):
            outcome, kind, mutant = run_case(s, mutation, keep, method, folder)
            counts[str(outcome)] += 1
            by_kind.setdefault(kind, Counter())[str(outcome)] += 1
            if outcome in FAILURES or verbose:
                print(f"[{'E' if outcome in FAILURES else 'I'}] seed={s} {outcome}: {outcome.detail}", file=out)
            if outcome in FAILURES and dump and mutant is not None:
                os.makedirs(dump, exist_ok=True)
                with open(os.path.join(dump, f"seed_{s}.onnx"), "wb") as f:
                    f.write(mutant if isinstance(mutant, bytes) else mutant.SerializeToString())
    return counts, by_kind


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=float, default=None, help="default: drawn per case from %s" % (KEEPS,))
    ap.add_argument("--method", default="lean", choices=METHODS + ("any",),
                    help="'any': drawn per case from %s" % (METHODS,))
    ap.add_argument("--mutation", default="all", choices=MUTATIONS + ("all",),
                    help="'all' (default): drawn per case from %s" % (MUTATIONS,))
    ap.add_argument("--dump", metavar="DIR", help="write each failing case's model (or bytes) to DIR/seed_S.onnx")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case, not only failures")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    counts, by_kind = fuzz(args.cases, args.seed, args.keep, None if args.method == "any" else args.method,
                           args.mutation, args.dump, args.verbose)
    elapsed_s = time.perf_counter() - start
    kinds = [k for k in MUTATIONS if k in by_kind]
    print(f"{'outcome':<22}{'cases':>7}   " + " ".join(f"{k:>15}" for k in kinds))
    for outcome in OUTCOMES:
        print(f"{outcome:<22}{counts[outcome]:>7}   " + " ".join(f"{by_kind[k][outcome]:>15}" for k in kinds))
    print(f"{'total':<22}{sum(counts.values()):>7}   ({elapsed_s:.1f} s, "
          f"{1000 * elapsed_s / max(args.cases, 1):.1f} ms/case)")
    failed = sum(counts[k] for k in FAILURES)
    print("FAILED" if failed else "PASSED", f"({failed} failing case(s); replay: --cases 1 --seed S)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
