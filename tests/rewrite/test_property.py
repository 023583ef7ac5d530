"""Property test of the contract (DESIGN.md section 2) on random CNNs from tests/graphgen.py.

For any generated model, keep and method: a model without a conv is refused with NothingToPrune;
otherwise prune returns and check_contract holds (pruned(x) == masked(x), keep 1.0 changes nothing,
same interface, valid models, honest report). Derandomized, so CI sees the same 200 examples on every
run; replay a failure with the `@reproduce_failure` blob or the falsifying example hypothesis prints.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lean_onnx.errors import NothingToPrune
from lean_onnx.rewrite.contract import check_contract
from lean_onnx.rewrite.pruner import prune
from tests.graphgen import random_cnn

KEEPS = (1.0, 0.8, 0.5, 0.2, 0.05, 0.01)
METHODS = ("lean", "sv", "l1")
CONV_OPS = ("Conv", "ConvTranspose")

keeps = st.one_of(st.sampled_from(KEEPS), st.floats(0.01, 1.0, exclude_min=True, allow_nan=False))


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=random_cnn(), keep=keeps, method=st.sampled_from(METHODS), fold=st.booleans(),
       rounding=st.sampled_from((1, 1, 16)))
def test_pruned_equals_masked(case, keep, method, fold, rounding):
    model, input_shape = case
    shapes = {"input": tuple(input_shape)}
    if not any(node.op_type in CONV_OPS for node in model.graph.node):
        event("outcome: no conv, NothingToPrune")
        with pytest.raises(NothingToPrune):
            prune(model, keep, method, input_shapes=shapes)
        return
    try:
        result = prune(model, keep, method, input_shapes=shapes, fold_constants=fold,
                       round_channels=rounding)
    except NothingToPrune as e:  # every conv frozen (e.g. only grouped convs): a refusal with a reason
        assert "every conv layer is frozen" in str(e), str(e)
        event("outcome: every conv frozen, NothingToPrune")
        return
    check_contract(model, result, shapes, np.random.default_rng(0))
    channels = result.report["channels"]
    event("outcome: pruned, channels removed" if channels["after"] < channels["before"]
          else "outcome: pruned, no channel removed")
    if result.report["concat_reads_merged"]:
        event("repeated Concat reads merged")
    if result.report["head_channels_dropped"]:
        event("head columns dropped" + (" (constants folded)" if fold else ""))
