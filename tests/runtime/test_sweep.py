"""`lean-onnx sweep`: one graph build for many keeps, one valid model per keep equal to its masked model,
a Pareto table / JSON with one row per keep, and one-line errors for bad options."""

import json
import os

import numpy as np
import onnx
import pytest

import lean_onnx.rewrite.pruner as prune_module
from lean_onnx.cli import main
from lean_onnx.rewrite.contract import check_contract, max_rel_error, random_feeds, session
from lean_onnx.rewrite.pruner import Pruner
from lean_onnx.runtime.sweep import TimingOptions, mark_pareto, parse_keeps, sweep
from tests.helpers import assert_one_line_error, zoo_path

FAST = ("--runs", "2", "--warmup", "0", "--provider", "cpu", "--samples", "1")
ROW_FIELDS = ("keep_requested", "keep_achieved", "kernels", "params", "macs", "file_bytes", "path", "latency_ms",
              "speedup", "max_rel_err_vs_original", "max_rel_err_vs_masked", "pareto")


@pytest.fixture
def graph_builds(monkeypatch):
    """A spy on the graph builder: counts calls, behaves exactly as the real one."""
    calls = []
    real = prune_module.build_channel_graph

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_module, "build_channel_graph", spy)
    return calls


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_library_sweep_on_msd_builds_the_graph_once_and_keeps_the_contract(tmp_path, zoo_cache, graph_builds):
    path = zoo_path("msd", True, zoo_cache)
    keeps = [1.0, 0.5, 0.2]
    result = sweep(path, keeps, str(tmp_path / "out"), timing=TimingOptions("cpu", 1, 2, 0), samples=1,
                   keep_results=True)
    assert len(graph_builds) == 1
    report = result.report
    assert report["graph_builds"] == 1 and list(report["timings_s"]).count("graph") == 1
    original = onnx.load(path)
    rng = np.random.default_rng(0)
    for keep, row, pruned in zip(keeps, report["rows"], result.results):
        assert row["path"] == str(tmp_path / "out" / f"{os.path.splitext(os.path.basename(path))[0]}_keep{keep:g}.onnx")
        onnx.checker.check_model(row["path"], full_check=True)
        with open(row["path"], "rb") as f:
            assert f.read() == pruned.model_bytes
        check_contract(original, pruned, report["input_shapes"], rng, samples=1)
        assert row["max_rel_err_vs_masked"] <= 1e-5 and row["latency_ms"]["median"] > 0
    assert report["rows"][0]["max_rel_err_vs_original"] <= 1e-5  # keep 1.0 changes nothing
    assert report["failures"] == []


def test_cli_sweep_resnet18_json_report_and_written_models_equal_masked(tmp_path, capsys, zoo_cache, graph_builds):
    path = zoo_path("resnet18", True, zoo_cache)
    out_dir, report_path = tmp_path / "models", tmp_path / "sweep.json"
    code, out, err = run_cli(capsys, "sweep", path, "--keep", "0.5,0.05", "--out-dir", out_dir, *FAST, "--json",
                             "--report", report_path)
    assert code == 0, err
    assert len(graph_builds) == 1
    report = json.loads(out)
    assert report == json.loads(report_path.read_text()) and report["input"]["sha256"]
    assert report["graph_builds"] == 1 and [r["keep_requested"] for r in report["rows"]] == [0.5, 0.05]
    for row in report["rows"]:
        for field in ROW_FIELDS:
            assert field in row, field
        assert row["speedup"] > 0 and row["file_bytes"] == os.path.getsize(row["path"])
    assert report["original"]["latency_ms"]["median"] > 0
    assert sorted(os.listdir(out_dir)) == sorted(os.path.basename(r["path"]) for r in report["rows"])
    pruner = Pruner(path)  # rebuild the masked model independently and compare the written file with it
    feeds = random_feeds(pruner.loaded.original, pruner.loaded.input_shapes, np.random.default_rng(1))
    for row in report["rows"]:
        masked = pruner.prune(row["keep_requested"], masked=True).masked
        onnx.checker.check_model(row["path"], full_check=True)
        written = session(onnx.load(row["path"])).run(None, feeds)
        assert max_rel_error(session(masked).run(None, feeds), written) <= 1e-5


def test_cli_table_without_timing_has_one_row_per_keep(tmp_path, capsys, zoo_cache):
    path = zoo_path("msd", True, zoo_cache)
    code, out, err = run_cli(capsys, "sweep", path, "--keep", "0.5,0.2,0.05", "--out-dir", tmp_path, "--no-bench",
                             "--samples", "1")
    assert code == 0, err
    lines = out.strip().splitlines()
    header = lines[0]
    for column in ("keep", "achieved", "kernels", "params", "MACs", "file", "median ms", "speedup",
                   "err vs original", "pareto"):
        assert column in header, column
    assert lines[1].startswith("original")
    assert [line.split()[0] for line in lines[2:5]] == ["0.5", "0.2", "0.05"]
    assert "not timed" in lines[5] and "(macs, error)" in lines[5]
    assert err.count("[I] keep") == 3 and "Traceback" not in err


@pytest.mark.parametrize("keeps, needle", [("0.5,abc", "comma-separated"), ("0.5,1.5", "(0, 1]"),
                                           ("0,0.5", "(0, 1]"), ("", "comma-separated"),
                                           ("0.5,0.50", "appears twice"), ("nan", "finite")])
def test_bad_keep_list_is_one_line_and_exit_2(tmp_path, capsys, zoo_cache, keeps, needle):
    path = zoo_path("msd", True, zoo_cache)
    code, _, err = run_cli(capsys, "sweep", path, "--keep", keeps, "--out-dir", tmp_path / "d", "--no-bench")
    assert_one_line_error(code, err, 2, needle)
    assert not (tmp_path / "d").exists()


def test_refuses_to_overwrite_the_input_and_bad_options(tmp_path, capsys, zoo_cache):
    path = zoo_path("msd", True, zoo_cache)
    stem = os.path.splitext(os.path.basename(path))[0]
    os.symlink(path, tmp_path / f"{stem}_keep0.5.onnx")  # a name in D that *is* the input
    code, _, err = run_cli(capsys, "sweep", path, "--keep", "0.5", "--out-dir", tmp_path, "--no-bench")
    assert_one_line_error(code, err, 2, "overwrite the input")
    code, _, err = run_cli(capsys, "sweep", path, "--out-dir", tmp_path / "x", "--runs", "0")
    assert_one_line_error(code, err, 2, "--runs")
    code, _, err = run_cli(capsys, "sweep", path, "--keep", "0.5")
    assert_one_line_error(code, err, 2, "--out-dir")


def test_pruned_not_equal_masked_exits_1(tmp_path, capsys, zoo_cache, monkeypatch):
    from lean_onnx.runtime.sweep import Fidelity

    real = Fidelity.measure

    def broken(self, pruned_bytes, masked):  # the real measurement, then a contract violation on top
        return {**real(self, pruned_bytes, masked), "max_rel_err_vs_masked": 1e-3}

    monkeypatch.setattr(Fidelity, "measure", broken)
    path = zoo_path("msd", True, zoo_cache)
    code, _, err = run_cli(capsys, "sweep", path, "--keep", "0.5", "--out-dir", tmp_path, "--no-bench", "-q",
                           "--samples", "1")
    assert_one_line_error(code, err, 1, "pruned != masked", "keep 0.5")


def test_parse_keeps_and_pareto_marks():
    assert parse_keeps(" 0.5, 0.2 ,1") == [0.5, 0.2, 1.0]
    rows = [{"latency_ms": {"median": m}, "macs": 0, "max_rel_err_vs_original": e}
            for m, e in ((5.0, 0.1), (4.0, 0.2), (6.0, 0.15), (11.0, 0.01))]
    original = {"latency_ms": {"median": 10.0}, "macs": 0}
    mark_pareto(rows, original)
    # 6 ms / 0.15 is dominated by 5 ms / 0.1; 11 ms is slower than the original (10 ms, error 0)
    assert [r["pareto"] for r in rows] == [True, True, False, False] and original["pareto"]
