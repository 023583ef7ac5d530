"""`--target-macs` / `--target-latency` on the command line (issue 17): bad budgets are one-line errors with
nothing written, a budget run reports its `budget` section and puts MACs first in the table."""

import json

import onnx
import pytest

from tests.cli.test_cli import cli
from tests.helpers import assert_one_line_error, zoo_path


@pytest.fixture(scope="module")
def resnet(zoo_cache):
    return zoo_path("resnet18", True, zoo_cache)


@pytest.mark.parametrize("args, needle", [
    (["--target-macs", "0"], "--target-macs is a fraction"),
    (["--target-macs", "-0.5"], "--target-macs is a fraction"),
    (["--target-macs", "50"], "did you mean 0.5"),
    (["--target-latency", "1.5"], "--target-latency is a fraction"),
    (["--keep", "0.5", "--target-macs", "0.5"], "exactly one of --keep, --target-macs or --target-latency"),
    (["--target-macs", "0.5", "--target-latency", "0.5"], "exactly one"),
    ([], "exactly one"),
    (["--target-macs", "0.5", "--granularity", "kernel"], "--granularity kernel cannot meet"),
    (["--keep", "0.5", "--granularity", "channel"], "--granularity channel goes with"),
    (["--target-macs", "0.5", "--min-channels", "2"], "--min-channels"),
    (["--target-macs", "0.01", "--drop-blocks", "0"], "smallest reachable MACs ratio is"),
    (["--keep", "0.5", "--drop-blocks", "0.5"], "--drop-blocks goes with a budget"),
    (["--target-macs", "0.5", "--drop-blocks", "2"], "--drop-blocks 2: expected a fraction"),
])
def test_bad_budgets_are_one_line_errors(resnet, tmp_path, args, needle):
    out = tmp_path / "out.onnx"
    code, _, err = cli(resnet, out, *args)
    assert_one_line_error(code, err, 2, needle)
    assert not out.exists()


def test_target_macs_report_and_table(resnet, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = cli(resnet, out, "--target-macs", "0.5", "--report", report, "--emit-masked",
                            tmp_path / "m.onnx")
    assert code == 0, err
    r = json.loads(report.read_text())
    budget = r["budget"]
    assert budget["kind"] == "macs" and budget["target"] == 0.5 and budget["granularity"] == "channel"
    assert budget["min_channels"] == 0.1 and abs(budget["achieved_macs_ratio"] - 0.5) <= 0.03
    assert budget["achieved_macs_ratio"] == pytest.approx(r["flops"]["after"] / r["flops"]["before"])
    rows = [line.split()[0] for line in stdout.splitlines() if line.strip()]
    assert rows[1] == "MACs"  # the budget's unit comes first in the before/after table
    onnx.checker.check_model(str(out), full_check=True)


def test_target_latency_searches_with_real_timings(resnet, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = cli(resnet, tmp_path / "out.onnx", "--target-latency", "0.7", "--runs", "5", "--warmup", "2",
                       "--provider", "cpu", "--report", report)
    assert code == 0, err
    budget = json.loads(report.read_text())["budget"]
    assert budget["kind"] == "latency" and budget["target"] == 0.7 and budget["search"]
    for step in budget["search"]:  # every step was timed: the ratio is the measured medians'
        assert step["latency_ratio"] == pytest.approx(step["latency_ms"]["pruned"] / step["latency_ms"]["original"],
                                                      abs=1e-4)
    chosen = [s for s in budget["search"] if s["target_macs"] == budget["target_macs"]]
    assert chosen and (not budget["met"] or chosen[0]["latency_ratio"] <= 0.7)
    assert "target-latency search" in err
