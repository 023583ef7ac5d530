"""The command line as a pipeline sees it: exit codes, one-line errors, JSON output."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import CHAIN, assert_one_line_error, rand, save, text_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = str(ROOT / "models" / "msd_untrained.onnx")


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "lean_onnx", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return save(text_model(CHAIN, {"w1": rand(3, 2, 3, 3), "w2": rand(4, 3, 1, 1)}),
                tmp_path_factory.mktemp("m") / "chain.onnx")


def test_inspect_json_has_the_documented_fields(chain):
    code, out, err = cli("inspect", chain, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["kernels"] == {"total": 6 + 12, "prunable": 18} and s["coverage"] == 1.0
    assert s["params"] == 3 * 2 * 9 + 4 * 3 and s["flops"]["macs"] == 64 * (3 * 18 + 4 * 3)
    assert {"layers", "coupling_groups", "frozen", "flops"} <= set(s)
    assert [layer["c_out"] for layer in s["layers"]] == [3, 4]


def test_inspect_table_on_the_shipped_model():
    code, out, err = cli("inspect", SHIPPED)
    assert code == 0, err
    assert "1,530 (1,530 prunable)" in out  # 50 x (1..50 inputs) 3x3 kernels + the final 51 -> 5 1x1 layer
    assert "at input=1x1x256x256" in out
    assert "assuming 1x1x256x256" in err  # symbolic batch: the default is announced


def test_select_in_reference_mode_on_the_shipped_model():
    code, out, err = cli("select", SHIPPED, "--keep", "0.05", "--norm-grid", "128", "--exclude", "/final/*",
                         "--input-shape", "input=1x1x256x256", "--json")
    assert code == 0, err
    k = json.loads(out)["kernels"]
    assert (k["total"], k["requested"]) == (1275, 63)  # K = int(r * total), final layer excluded (lean-spec 4)
    assert k["selected"] >= 63 and k["kept"] == k["selected"] - sum(k["removed_by_redundancy"].values())


def test_select_reports_paths_and_fallback(chain):
    code, out, err = cli("select", chain, "--keep", "0.5", "--json")
    assert code == 0, err
    k = json.loads(out)["kernels"]
    assert k["requested"] == 9 and k["from_paths"] + k["from_fallback"] == k["kept"]
    assert k["kept"] <= 9 + k["paths"]["longest_edges"]


@pytest.mark.parametrize("args, needles", [
    (["inspect", "missing.onnx"], ["missing.onnx", "no such file"]),
    (["select", "{chain}", "--keep", "0"], ["--keep", "(0, 1]"]),
    (["select", "{chain}", "--keep", "1.5"], ["--keep"]),
    (["select", "{chain}", "--keep", "50"], ["did you mean 0.5"]),
    (["select", "{chain}", "--keep", "abc"], ["--keep"]),
    (["inspect", "{chain}", "--input-shape", "x=1x2xAx8"], ["--input-shape"]),
    (["inspect", "{chain}", "--input-shape", "y=1x2x8x8"], ["not a graph input"]),
    (["inspect", "{chain}", "--norm-grid", "-3"], ["--norm-grid"]),
    (["inspect"], ["model"]),
])
def test_bad_usage_is_one_line_and_exit_2(chain, args, needles):
    code, _, err = cli(*[a.format(chain=chain) for a in args])
    assert_one_line_error(code, err, 2, *needles)


def test_not_onnx_and_truncated_files(tmp_path, chain):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model\n" * 10)
    code, _, err = cli("inspect", junk)
    assert_one_line_error(code, err, 2, str(junk))
    data = pathlib.Path(chain).read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    code, _, err = cli("inspect", truncated)
    assert_one_line_error(code, err, 2, str(truncated))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    code, _, err = cli("inspect", empty)
    assert_one_line_error(code, err, 2, "empty")


def test_model_without_conv_exits_4(tmp_path):
    path = save(text_model("g (float[1,4] x) => (float[1,2] y) { y = Gemm (x, w) }", {"w": rand(4, 2)}),
                tmp_path / "mlp.onnx")
    code, _, err = cli("select", path, "--keep", "0.1")
    assert_one_line_error(code, err, 4, "mlp.onnx", "nothing to prune")


def test_everything_excluded_exits_4(chain):
    code, _, err = cli("select", chain, "--keep", "0.1", "--exclude", "*")
    assert_one_line_error(code, err, 4, "nothing to prune", "--exclude")


def test_readme_main_command_on_the_shipped_trained_model(tmp_path):
    """README's first command: the trained MS-D, half of its 3x3 kernels, the final 1x1 layer left out."""
    out, report = tmp_path / "msd_pruned.onnx", tmp_path / "report.json"
    code, stdout, err = cli(ROOT / "models" / "msd_cs.onnx", out, "--keep", "0.5", "--exclude", "/final/*",
                            "--report", report)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["inputs_reach_outputs"] and r["kernels"]["total"] == 1275  # the paper's count: 3x3 kernels only
    assert 0.4 < r["kernels"]["keep_achieved"] <= 0.5 and r["flops"]["after"] < 0.6 * r["flops"]["before"]
    assert "kernels in the model" in stdout
