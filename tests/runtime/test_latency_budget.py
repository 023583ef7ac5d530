"""The step rule of `--target-latency`'s search (runtime/latency_budget.py); the search itself, with real
timings, is tested through the CLI (tests/cli/test_budget_cli.py)."""

import pytest

from lean_onnx.runtime.latency_budget import MARGIN, interpolate


def test_interpolate_where_the_measured_ratios_cross_the_target():
    # 0.4 of the MACs measured 0.5 of the latency, 0.8 measured 0.9: a line crosses 0.6 at 0.5
    assert interpolate(0.4, 0.5, 0.8, 0.9, 0.6) == pytest.approx(0.5)
    # 0.5 measured 0.55, and 1.0 is 1.0 by definition: the line crosses 0.6 at 0.5 + 0.05 / 0.45 x 0.5
    assert interpolate(0.5, 0.55, 1.0, 1.0, 0.6) == pytest.approx(0.5 + 0.05 / 0.45 * 0.5)


def test_interpolate_always_narrows_the_bracket():
    # an end nearly on the target: the step keeps MARGIN of the bracket from it
    assert interpolate(0.4, 0.5999, 0.8, 0.9, 0.6) == pytest.approx(0.4 + MARGIN * 0.4)
    assert interpolate(0.4, 0.2, 0.8, 0.6001, 0.6) == pytest.approx(0.8 - MARGIN * 0.4)
    # MobileNetV2 at 0.6 (session 21): 0.604 measured 0.581; the line to (1, 1) crosses at 0.622, within MARGIN
    # of 0.604, so the step is 0.624 (bisection went to 0.802)
    assert interpolate(0.604, 0.581, 1.0, 1.0, 0.6) == pytest.approx(0.604 + MARGIN * 0.396)
