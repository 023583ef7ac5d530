"""`lean-onnx sweep --target-macs F1,F2,...` (issue 17): one graph build, one model per MACs budget."""

import json
import pathlib

from tests.cli.test_cli import cli
from tests.helpers import assert_one_line_error, zoo_path


def test_sweep_over_macs_budgets(zoo_cache, tmp_path):
    model = zoo_path("resnet18", True, zoo_cache)
    report = tmp_path / "sweep.json"
    code, out, err = cli("sweep", model, "--target-macs", "0.75,0.5", "--out-dir", tmp_path / "d", "--no-bench",
                         "--samples", "1", "--report", report)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["target_macs"] == [0.75, 0.5] and r["keeps_requested"] is None and r["graph_builds"] == 1
    for row, target in zip(r["rows"], (0.75, 0.5)):
        assert row["target_macs"] == target and abs(row["macs_ratio"] - target) <= 0.03
        assert pathlib.Path(row["path"]).name == f"{pathlib.Path(model).stem}_macs{target:g}.onnx"
        assert row["max_rel_err_vs_masked"] <= 1e-5 and row["inputs_reach_outputs"]
    assert "macs 0.75" in out


def test_sweep_refuses_keep_and_target_together(zoo_cache, tmp_path):
    model = zoo_path("resnet18", True, zoo_cache)
    code, _, err = cli("sweep", model, "--keep", "0.5", "--target-macs", "0.5", "--out-dir", tmp_path / "d")
    assert_one_line_error(code, err, 2, "not both")
    code, _, err = cli("sweep", model, "--target-macs", "0.5,1.5", "--out-dir", tmp_path / "d")
    assert_one_line_error(code, err, 2, "--target-macs")
