"""The masked model on the input's own graph (DESIGN.md section 2; issue 19).

The rewrite works on the normalised copy of the input (graph/normalise.py: Constant nodes become
initializers, constant arithmetic is folded, Identity in front of initializers is bypassed, functions are
inlined). For the pruned model that is right; the masked model, though, is "the original graph with the
same shapes" whose pruned kernels are zero, and a user who compares it with the input must find the
input's nodes, not a simplified graph. `on_original` therefore carries the values the masked rewrite
changed back onto a copy of the input:

* a changed tensor that is an initializer of the input is overwritten in place (the rewrite changes a
  shared initializer in place only when all its readers get the same values; readers that get other
  values read copies, which are added, and the reader points at its copy as in the masked rewrite);
* a changed tensor that the input computes (a Constant node, folded constant arithmetic) or reads through
  an Identity becomes a new initializer, and the node that reads it in the masked rewrite reads it in the
  copy too; the Constant / arithmetic / Identity nodes stay where they were (their output may then be read
  by no one), so the node list is the input's;
* node order and names are only made valid: sorted if the input was not (onnx.checker requires it), and
  duplicate names suffixed (ONNX Runtime refuses them).
A changed tensor read by a node that exists only in the normalised copy (a node of an inlined local
function) cannot be carried back; then `on_original` returns None and the caller keeps the masked model
of the normalised graph, saying so in the report.
"""

from __future__ import annotations

import copy

import onnx

from ..graph.normalise import all_inputs, order_and_name
from ..io.external_data import fill_stubs


def on_original(masked: onnx.ModelProto, changed: set[str], loaded) -> onnx.ModelProto | None:
    """The input model (`loaded`: graph.load.LoadedModel) with the `changed` initializers of `masked`
    (the masked rewrite of its normalised copy) carried over; None when a changed tensor has no place in
    the input's graph (see the module docstring)."""
    model = copy.deepcopy(loaded.skeleton)  # the input's graph; large weights are stubs until the end
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    computed = {name for node in graph.node for name in node.output} | {i.name for i in graph.input
                                                                          if i.name not in initializers}
    taken = computed | set(initializers) | {name for node in graph.node for name in all_inputs(node)}
    by_output = {node.output[0]: node for node in graph.node if node.output and node.output[0]}
    values = {t.name: t for t in masked.graph.initializer if t.name in changed}
    in_masked = {n.output[0] for n in masked.graph.node if n.output}
    kept = {name for node in graph.node if node.op_type != "Identity" and node.output
            and node.output[0] not in in_masked for name in all_inputs(node)}
    placed: dict[str, str] = {}  # name in the masked rewrite -> name in the copy of the input
    for node in masked.graph.node:
        slots = [(k, name) for k, name in enumerate(node.input) if name in values]
        if not slots:
            continue
        target = by_output.get(node.output[0]) if node.output else None
        if target is None or target.op_type != node.op_type:
            return None  # a node the normalisation made (an inlined function's)
        for k, name in slots:
            if name not in placed:
                placed[name] = _place(graph, initializers, values[name], name, computed, taken, kept)
            if k >= len(target.input):
                target.input.extend([""] * (k + 1 - len(target.input)))
            target.input[k] = placed[name]
    fill_stubs(model, loaded.source_tensors())
    order_and_name(graph, loaded.path)
    return model


def _place(graph: onnx.GraphProto, initializers: dict, tensor: onnx.TensorProto, name: str, computed: set[str],
           taken: set[str], kept: set[str]) -> str:
    """Put `tensor` into the copy: over the initializer `name`, or as a new initializer when the input
    computes `name`, has no such tensor, or folds it into something else (`kept`: initializers that a node
    the normalisation folded away reads; they keep their values); returns the name the readers read."""
    if name in initializers and name not in computed and name not in kept:
        initializers[name].CopyFrom(tensor)
        return name
    new = name if name not in taken else f"{name}__masked"
    while new in taken:
        new += "_"
    taken.add(new)
    added = copy.deepcopy(tensor)
    added.name = new
    graph.initializer.append(added)
    initializers[new] = graph.initializer[-1]
    return new
