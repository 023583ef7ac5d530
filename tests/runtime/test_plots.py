"""Pictures: every plot function writes a real, non-blank PNG; `sweep --plot DIR` writes them all."""

import os
import sys

import numpy as np
import pytest

from lean_onnx.cli import main
from lean_onnx.errors import LeanOnnxError
from lean_onnx.rewrite.pruner import Pruner
from lean_onnx.runtime.plots import cap_edges, channel_positions, plot_chains, plot_channels, plot_prune, plot_sweep
from tests.helpers import zoo_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path, min_width=400, min_height=300):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, path
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= min_height, (path, pixels.shape)
    assert float(np.var(pixels[..., :3])) > 0, f"{path} is blank"


@pytest.fixture(scope="module")
def msd_result(zoo_cache):
    return Pruner(zoo_path("msd", True, zoo_cache)).prune(0.5)


def sweep_rows():
    return [{"keep_requested": k, "macs": 1e6 * k, "latency_ms": {"median": 10 * k + 1}, "max_rel_err_vs_original": e,
             "pareto": p} for k, e, p in ((0.5, 0.05, True), (0.2, 0.3, True), (0.05, 0.2, True), (0.01, 0.9, True))]


def test_plot_sweep_writes_latency_error_and_pareto_pictures(tmp_path):
    paths = plot_sweep(sweep_rows(), str(tmp_path), original={"latency_ms": {"median": 12.0}, "macs": 1e6})
    assert [os.path.basename(p) for p in paths] == ["sweep.png", "sweep_pareto.png"]
    for path in paths:
        assert_real_png(path)


def test_plot_sweep_without_timing_and_with_an_exact_zero_error(tmp_path):
    rows = [{**r, "latency_ms": None} for r in sweep_rows()] + [
        {"keep_requested": 1.0, "macs": 1e6, "latency_ms": None, "max_rel_err_vs_original": 0.0, "pareto": True}]
    for path in plot_sweep(rows, str(tmp_path / "new"), original={"latency_ms": None, "macs": 1e6}):
        assert_real_png(path)


def test_plot_channels_and_chains_on_msd(tmp_path, msd_result):
    (channels,) = plot_channels(msd_result.report, str(tmp_path))
    (chains,) = plot_chains(msd_result.graph, msd_result.selection, str(tmp_path))
    assert_real_png(channels)
    assert_real_png(chains, min_width=1000)  # MS-D's 51 layers get a wide picture
    assert plot_prune(msd_result, str(tmp_path), label="keep0.5") == [
        str(tmp_path / "channels_keep0.5.png"), str(tmp_path / "chains_keep0.5.png")]


def test_plot_chains_caps_the_edges_on_resnet18(tmp_path, zoo_cache):
    result = Pruner(zoo_path("resnet18", True, zoo_cache)).prune(0.2, masked=False)
    (path,) = plot_chains(result.graph, result.selection, str(tmp_path), max_layers=8, max_edges=3000)
    assert_real_png(path)


def test_channel_positions_put_each_conv_in_its_column(msd_result):
    graph = msd_result.graph
    x, y, layers = channel_positions(graph)
    assert len(layers) == len(graph.layers)
    for rank, layer in enumerate(graph.layers):
        assert (x[layer.out_nodes] == rank + 1).all()
        assert y[layer.out_nodes].mean() == pytest.approx(0.0)  # centred
    dst = graph.dst
    kernels = graph.edge_layer >= 0
    assert (x[graph.src[kernels]] < x[dst[kernels]]).all()  # every kernel points to the right


def test_cap_edges_keeps_chain_edges_first():
    categories = {"path": np.arange(5), "fallback": np.arange(100, 200), "frozen": np.arange(300, 400)}
    capped = cap_edges(categories, 50)
    assert list(capped["path"]) == list(range(5)) and capped["fallback"].size == 45 and capped["frozen"].size == 0
    assert set(capped["fallback"]) <= set(range(100, 200))


def test_sweep_plot_writes_the_pictures(tmp_path, capsys, zoo_cache):
    path = zoo_path("msd", True, zoo_cache)
    code = main(["sweep", path, "--keep", "0.5,0.2", "--out-dir", str(tmp_path / "m"), "--no-bench", "--samples",
                 "1", "--plot", str(tmp_path / "p"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    names = {"sweep.png", "sweep_pareto.png", "channels_keep0.5.png", "chains_keep0.5.png", "channels_keep0.2.png",
             "chains_keep0.2.png"}
    assert set(os.listdir(tmp_path / "p")) == names
    import json

    assert sorted(os.path.basename(p) for p in json.loads(out)["plots"]) == sorted(names)
    for name in names:
        assert_real_png(tmp_path / "p" / name)


def test_missing_matplotlib_is_one_line_exit_2(tmp_path, capsys, monkeypatch, zoo_cache):
    from lean_onnx.runtime.plots import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(LeanOnnxError, match="pip install 'lean-onnx\\[plot\\]'"):
        require_matplotlib()
    code = main(["sweep", zoo_path("msd", True, zoo_cache), "--keep", "0.5", "--out-dir", str(tmp_path / "m"),
                 "--no-bench", "--plot", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().startswith("[E] --plot needs matplotlib") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
