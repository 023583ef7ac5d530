"""NHWC stretches made NCHW in the normalised copy: transposes sunk and cancelled (issue 19).

TensorFlow/Keras models converted by tf2onnx (and TFLite converters) keep the convolutions in ONNX's NCHW
but leave stretches of the graph in NHWC between `Transpose(perm=[0,2,3,1])` and
`Transpose(perm=[0,3,1,2])`: padding, batch-norm-like `Mul`/`Add` by a `[C]` vector on the last axis,
activations, `Cast` wrappers, residual sums, reductions over the spatial axes. The channel graph reads
channels on axis 1, so such a stretch froze every channel it touched ("Transpose moves the channel
axis", "Pad pads the batch or channel axis").

`sink_transposes` rewrites each stretch into NCHW, exactly: starting at a `Transpose([0,2,3,1])` of an
NCHW tensor X (its output Y = transpose(X, p)), it collects the nodes that read Y (and what they compute)
as long as each can run on X instead:
* element-wise ops (activations, Cast, Clip, Add/Sub/Mul/Div/Max/Min/Pow/Sum...) whose other
  operands are in the stretch too, small constants (a `[C]` vector becomes `[1, C, 1, 1]`, i.e. the
  constant transposed like the data) or other `Transpose([0,2,3,1])` outputs (merged into the stretch);
* `Pad` (its pads permuted), `Concat` / `Split` (their axis mapped), reductions (axes mapped; with
  keepdims=0 only when the remaining axes keep their order, e.g. a mean over H and W gives (N, C) either
  way, and the stretch ends there);
* a `Transpose([0,3,1,2])` ends the stretch and disappears; another Transpose gets the composed perm.
Every other reader, and a graph output, reads the stretch through a new `Transpose([0,2,3,1])`. A
stretch is rewritten only when that removes more Transposes than it adds, or as many when the ones it
adds feed graph outputs only (the layout change then sits at the output, where it freezes nothing).
Node outputs keep their names (their layout is now NCHW), so the masked model, carried back to the
input's own graph by name (rewrite/masked.py), is unaffected; the pruned model is built from this copy
and loses the transposes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..io.external_data import is_stub

TO_NHWC = (0, 2, 3, 1)
#: one input in the stretch, the others scalars or absent (Clip's bounds, Cast has none)
UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
         "Softplus", "Softsign", "Cast", "Identity", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Erf",
         "Floor", "Ceil", "Round", "Sign", "Gelu", "Mish", "ThresholdedRelu", "Dropout"}
#: PRelu is not here: its slope is a trained parameter for fine-tuning (train/bridge.py), which writes it
#: back by name into the input's graph, where a transposed copy would have no place
BROADCAST = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "Where", "Equal", "Greater",
             "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSumExp", "ReduceSumSquare"}
SMALL = 1 << 16  # constants up to this many elements are transposed; larger ones end the stretch


def sink_transposes(model: onnx.ModelProto) -> int:
    """Rewrite every NHWC stretch of `model` (normalised: constants are initializers) into NCHW, in place;
    returns how many were rewritten."""
    done = 0
    tried: set[str] = set()
    while True:
        start = next((n for n in model.graph.node if n.op_type == "Transpose" and _perm(n) == TO_NHWC
                      and n.output[0] not in tried), None)
        if start is None:
            return done
        tried.add(start.output[0])
        if _Stretch(model, start).rewrite():
            done += 1
            tried.clear()  # the graph changed: earlier failures may go through now


def _perm(node) -> tuple | None:
    for a in node.attribute:
        if a.name == "perm":
            return tuple(a.ints)
    return None


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _set_ints(node, name: str, values) -> None:
    for a in node.attribute:
        if a.name == name:
            del a.ints[:]
            a.ints.extend(int(v) for v in values)
            return
    node.attribute.append(onnx.helper.make_attribute(name, [int(v) for v in values]))


def _set_int(node, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = int(value)
            return
    node.attribute.append(onnx.helper.make_attribute(name, int(value)))


class _Stretch:
    """One NHWC stretch, grown from `start` (see the module docstring); `rewrite()` applies it when it
    pays (fewer Transposes) and returns whether it did."""

    def __init__(self, model: onnx.ModelProto, start):
        self.graph = graph = model.graph
        self.p = np.array(TO_NHWC)
        self.inv = np.argsort(self.p)
        self.inits = {t.name: t for t in self.graph.initializer}
        self.readers: dict[str, list] = {}
        for node in self.graph.node:
            for k, name in enumerate(node.input):
                if name:
                    self.readers.setdefault(name, []).append((node, k))
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.outputs = {o.name for o in self.graph.output}
        #: every name in use, so the tensors and nodes this adds get new ones (_fresh)
        self.taken = ({t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
                      | {i for n in graph.node for i in n.input} | {i.name for i in graph.input})
        self.starts = [start]
        self.alias = {start.output[0]: start.input[0]}  # a start's output -> the NCHW tensor it came from
        self.members: list = []  # nodes that now run on NCHW, in the order found
        self.member_ids: set[int] = set()
        self.tensors = {start.output[0]}  # NHWC tensors of the stretch (now NCHW, same names but aliases)
        self.ends: list = []  # (Transpose node, kind): "cancel" (inverse perm) or "compose"
        self.closers: list = []  # reductions that end the stretch: (node, new axes)
        self.exits: list = []  # (node, slot) readers that get a Transpose back to NHWC

    # ------------------------------------------------------------------------------------------ grow
    def _grow(self) -> None:
        """Breadth-first over the readers of the stretch's tensors; a reader whose other operands are not in
        (yet) waits, and exits when they never come."""
        queue, seen, waiting = [self.starts[0].output[0]], set(), []
        while True:
            while queue:
                tensor = queue.pop(0)
                if tensor in self.outputs:
                    self.exits.append((None, tensor))
                for node, slot in self.readers.get(tensor, []):
                    if (id(node), slot) in seen or id(node) in self.member_ids:
                        continue
                    seen.add((id(node), slot))
                    verdict = self._classify(node, slot, queue)
                    if verdict == "member":
                        self._join(node, queue)
                    elif verdict == "wait":
                        waiting.append((node, slot))
                    elif verdict == "exit":
                        self.exits.append((node, slot))
            ready = [(n, s) for n, s in waiting if id(n) not in self.member_ids and self._ready(n, queue)]
            for node, _ in ready:
                if id(node) not in self.member_ids:
                    self._join(node, queue)
            waiting = [(n, s) for n, s in waiting if id(n) not in self.member_ids]
            if not ready:
                self.exits.extend(waiting)
                return

    def _join(self, node, queue: list) -> None:
        self.members.append(node)
        self.member_ids.add(id(node))
        for out in node.output:
            if out:
                self.tensors.add(out)
                queue.append(out)

    def _classify(self, node, slot, queue: list) -> str:
        """'member', 'end' (recorded), 'wait' (other operands not in yet) or 'exit' for a reader."""
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            return "exit"
        if op == "Transpose":
            perm = _perm(node)
            if perm is None or len(perm) != 4:
                return "exit"
            self.ends.append((node, "cancel" if tuple(perm) == (0, 3, 1, 2) else "compose"))
            return "end"
        if op in UNARY:
            ok = slot == 0 and all(self._scalar_or_absent(name) for name in node.input[1:])
            return "member" if ok else "exit"
        if op in BROADCAST or op == "Concat":
            if any(name and name not in self.tensors and self._const(name) is not None
                   and (op == "Concat" or self._const(name).size > SMALL or self._const(name).ndim > 4)
                   for name in node.input):
                return "exit"
            return "member" if self._ready(node, queue) else "wait"
        if op == "Pad":
            extra_ok = all(self._scalar_or_absent(name) for name in node.input[2:3])
            if slot != 0 or len(node.input) > 3 and node.input[3] or not extra_ok or self._pads(node) is None:
                return "exit"
            return "member"
        if op == "Split":
            ok = slot == 0 and all(self._const(name) is not None for name in node.input[1:] if name)
            return "member" if ok else "exit"
        if op in REDUCE:
            axes = self._axes(node)
            if axes is None or slot != 0:
                return "exit"
            if _attr(node, "keepdims", 1):
                return "member"
            gone = {a % 4 for a in axes}
            rest = [int(self.p[a]) for a in range(4) if a not in gone]
            if rest != sorted(rest):
                return "exit"
            self.closers.append((node, sorted(int(self.p[a]) for a in gone)))
            return "end"
        return "exit"

    def _ready(self, node, queue: list) -> bool:
        """Every data operand is in the stretch or a small constant; an operand that is another
        Transpose([0,2,3,1])'s output joins the stretch with that Transpose (its tensor goes to `queue`)."""
        ready = True
        for name in node.input:
            if not name or name in self.tensors or self._const(name) is not None:
                continue
            producer = self.producer.get(name)
            if producer is not None and producer.op_type == "Transpose" and _perm(producer) == TO_NHWC:
                self.starts.append(producer)
                self.alias[name] = producer.input[0]
                self.tensors.add(name)
                queue.append(name)
                continue
            ready = False
        return ready

    def _const(self, name):
        tensor = self.inits.get(name)
        if tensor is None or is_stub(tensor):
            return None
        return numpy_helper.to_array(tensor)

    def _scalar_or_absent(self, name) -> bool | None:
        if not name:
            return True
        value = self._const(name)
        return None if value is None else value.size == 1

    def _pads(self, node):
        if len(node.input) > 1 and node.input[1]:
            value = self._const(node.input[1])
            return None if value is None or value.size != 8 else [int(v) for v in value]
        pads = _attr(node, "pads")
        return None if pads is None or len(pads) != 8 else list(pads)

    def _axes(self, node):
        if len(node.input) > 1 and node.input[1]:
            value = self._const(node.input[1])
            return None if value is None else [int(v) for v in value.reshape(-1)]
        axes = _attr(node, "axes")
        return list(axes) if axes is not None else None

    # ----------------------------------------------------------------------------------------- apply
    def rewrite(self) -> bool:
        self._grow()
        outputs = {t for n, t in self.exits if n is None}
        exit_tensors = outputs | {n.input[s] for n, s in self.exits if n is not None}
        removed = len(self.starts) + sum(kind == "cancel" for _, kind in self.ends)
        # fewer Transposes, or as many with the last one right before the graph output (where the channel
        # graph reads it as an NHWC output, graph/routing.py) instead of inside the network
        pays = len(exit_tensors) < removed or len(exit_tensors) == removed and exit_tensors == outputs
        if not pays or not self.members and not self.ends and not self.closers:
            return False
        new_nodes = []
        nhwc: dict[str, str] = {}  # a stretch tensor -> its NHWC copy for the readers that stay outside

        def back(tensor: str) -> str:
            if tensor not in nhwc:
                name = self._fresh(f"{tensor}__nhwc")
                new_nodes.append(onnx.helper.make_node("Transpose", [self._nchw(tensor)], [name], perm=list(TO_NHWC),
                                                       name=name))
                nhwc[tensor] = name
            return nhwc[tensor]

        for node, slot in self.exits:
            if node is not None:
                node.input[slot] = back(node.input[slot])
        for node in self.members:
            self._member(node)
        for node, axes in self.closers:
            self._reading_nchw(node)
            self._set_axes(node, axes)
        dropped, bypass = [], {}
        for node, kind in self.ends:
            self._reading_nchw(node)
            if kind == "compose":
                _set_ints(node, "perm", [int(self.p[q]) for q in _perm(node)])
            elif node.output[0] in self.outputs:  # the graph output keeps its name
                node.op_type = "Identity"
                del node.attribute[:]
            else:  # its readers read the NCHW tensor itself
                bypass[node.output[0]] = node.input[0]
                dropped.append(node)
        for node in dropped:
            self.graph.node.remove(node)
        for node in self.graph.node:
            for k, name in enumerate(node.input):
                if name in bypass:
                    node.input[k] = bypass[name]
        renamed = {}
        for output in [t for n, t in self.exits if n is None]:  # graph outputs keep their names, in NHWC
            inner = self._fresh(f"{output}__nchw")
            renamed[output] = inner
        for node in self.graph.node:
            for k, name in enumerate(node.output):
                if name in renamed:
                    node.output[k] = renamed[name]
            for k, name in enumerate(node.input):
                if name in renamed:
                    node.input[k] = renamed[name]
        for output, inner in renamed.items():
            new_nodes.append(onnx.helper.make_node("Transpose", [inner], [output], perm=list(TO_NHWC),
                                                   name=self._fresh(f"{output}__to_nhwc")))
        for start in self.starts:  # every reader now reads the NCHW input
            self.graph.node.remove(start)
        self.graph.node.extend(new_nodes)
        changed = self.tensors | set(renamed.values())
        keep = [v for v in self.graph.value_info if v.name not in changed]
        del self.graph.value_info[:]
        self.graph.value_info.extend(keep)
        return True

    def _nchw(self, tensor: str) -> str:
        return self.alias.get(tensor, tensor)

    def _reading_nchw(self, node) -> None:
        for k, name in enumerate(node.input):
            if name in self.alias:
                node.input[k] = self.alias[name]

    def _member(self, node) -> None:
        self._reading_nchw(node)
        op = node.op_type
        if op in BROADCAST or op in UNARY:
            for k, name in enumerate(node.input):
                value = self._const(name) if name not in self.tensors else None
                if value is None or value.size <= 1 or (op in UNARY and k > 0):
                    continue
                if value.ndim > 4:
                    continue
                full = value.reshape((1,) * (4 - value.ndim) + value.shape)
                node.input[k] = self._initializer(name, np.ascontiguousarray(np.transpose(full, self.inv)))
        elif op == "Concat" or op == "Split":
            _set_int(node, "axis", int(self.p[int(_attr(node, "axis", 0)) % 4]))
        elif op == "Pad":
            pads = self._pads(node)
            begin, end = [0] * 4, [0] * 4
            for k in range(4):
                begin[int(self.p[k])], end[int(self.p[k])] = pads[k], pads[k + 4]
            if len(node.input) > 1 and node.input[1]:
                node.input[1] = self._initializer(node.input[1], np.array(begin + end, np.int64))
            else:
                _set_ints(node, "pads", begin + end)
        elif op in REDUCE:
            self._set_axes(node, sorted(int(self.p[a % 4]) for a in self._axes(node)))

    def _set_axes(self, node, axes) -> None:
        if len(node.input) > 1 and node.input[1]:
            node.input[1] = self._initializer(node.input[1], np.array(axes, np.int64))
        else:
            _set_ints(node, "axes", axes)

    def _initializer(self, name: str, value: np.ndarray) -> str:
        """A new initializer `<name>__nchw` holding `value` (the original may have other readers); its name."""
        new = self._fresh(f"{name}__nchw")
        self.graph.initializer.append(numpy_helper.from_array(value, new))
        self.inits[new] = self.graph.initializer[-1]
        return new

    def _fresh(self, name: str) -> str:
        while name in self.taken:
            name += "_"
        self.taken.add(name)
        return name
