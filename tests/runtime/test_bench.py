"""`lean-onnx bench`: real ONNX Runtime sessions on CPU with few runs (this machine has no GPU)."""

import json
import pathlib
import subprocess
import sys

import onnxruntime as ort
import pytest

from lean_onnx.cli import main
from lean_onnx.errors import LeanOnnxError
from lean_onnx.runtime.bench import benchmark, paired_benchmark, random_inputs, time_on_device
from tests.helpers import CHAIN, assert_one_line_error, rand, save, text_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
FAST = ("--runs", "5", "--warmup", "1")
#: symbolic batch and spatial dims; 4*2*3*3 = 72 parameters
DYNAMIC = """
g (float[N,2,H,W] x) => (float[N,4,H,W] y) {
  y = Conv <pads = [1,1,1,1]> (x, w)
}"""
GPU_AVAILABLE = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    chain = save(text_model(CHAIN, {"w1": rand(3, 2, 3, 3), "w2": rand(4, 3, 1, 1)}), folder / "chain.onnx")
    dynamic = save(text_model(DYNAMIC, {"w": rand(4, 2, 3, 3)}), folder / "dynamic.onnx")
    return {"chain": chain, "dynamic": dynamic, "folder": folder}


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_has_the_documented_columns(capsys, models):
    code, out, err = run_cli(capsys, "bench", models["chain"], *FAST, "--provider", "cpu")
    assert code == 0, err
    header = out.splitlines()[0]
    for column in ("model", "provider", "median ms", "p90 ms", "min ms", "items/s", "session ms", "params",
                   "file", "speedup"):
        assert column in header
    assert "chain.onnx" in out and "CPU" in out and "1.00x" in out


def test_json_has_all_fields_and_sane_values(capsys, models):
    code, out, err = run_cli(capsys, "bench", models["chain"], *FAST, "--provider", "cpu", "--json",
                             "--threads", "1")
    assert code == 0, err
    report = json.loads(out)
    assert report["schema_version"] == 1 and report["provider_requested"] == "cpu"
    assert set(report["tool"]) == {"lean-onnx", "onnx", "onnxruntime"}
    (entry,) = report["models"]
    for key in ("path", "provider", "providers", "batch", "input_shapes", "threads", "runs", "warmup",
                "session_ms", "latency_ms", "throughput_per_s", "speedup_vs_first", "params", "file_bytes"):
        assert key in entry, key
    latency = entry["latency_ms"]
    assert 0 < latency["min"] <= latency["median"] <= latency["p90"]
    assert latency["min"] <= latency["mean"]
    assert entry["provider"] == "CPUExecutionProvider" and entry["providers"] == ["CPUExecutionProvider"]
    assert (entry["runs"], entry["warmup"], entry["threads"], entry["batch"]) == (5, 1, 1, 1)
    assert entry["input_shapes"] == {"x": [1, 2, 8, 8]}
    assert entry["throughput_per_s"] == pytest.approx(1e3 / latency["median"])
    assert entry["session_ms"] > 0 and entry["speedup_vs_first"] == 1.0
    assert entry["params"] == 3 * 2 * 9 + 4 * 3


def test_paired_bench_times_the_models_together(capsys, models):
    """`bench A B --paired`: both timed in paired rounds (blocks of at least 30 ms, so a microsecond model runs
    far more than --runs times), ratios from those medians, the batch still applied to every model."""
    code, out, err = run_cli(capsys, "bench", models["dynamic"], models["dynamic"], *FAST, "--json", "--paired",
                             "--batch", "2")
    assert code == 0, err
    first, second = json.loads(out)["models"]
    for entry in (first, second):
        assert entry["timing"] == "paired" and entry["runs"] > 5 and entry["batch"] == 2
        assert entry["throughput_per_s"] == pytest.approx(2e3 / entry["latency_ms"]["median"])
    assert second["speedup_vs_first"] == pytest.approx(first["latency_ms"]["median"] / second["latency_ms"]["median"])
    assert "paired rounds" in err


def test_two_models_get_ratios_against_the_first(capsys, models):
    code, out, err = run_cli(capsys, "bench", models["chain"], models["dynamic"], *FAST, "--json",
                             "--input-shape", "x=1x2x8x8", "-q")
    assert code == 0, err
    first, second = json.loads(out)["models"]
    assert first["speedup_vs_first"] == 1.0 and first["params_vs_first"] == 1.0
    assert second["speedup_vs_first"] == pytest.approx(first["latency_ms"]["median"] / second["latency_ms"]["median"])
    assert second["params_vs_first"] == pytest.approx(72 / 66)
    assert second["file_bytes_vs_first"] == pytest.approx(second["file_bytes"] / first["file_bytes"])
    assert "[I]" not in err  # -q
    code, out, err = run_cli(capsys, "bench", models["chain"], models["dynamic"], *FAST, "--input-shape", "x=1x2x8x8")
    assert code == 0 and len(out.splitlines()) == 4  # header, two rows, footnote
    assert "chain.onnx" in out.splitlines()[1] and "dynamic.onnx" in out.splitlines()[2]


@pytest.mark.skipif(GPU_AVAILABLE, reason="checks the fallback on a machine without CUDA")
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_request_without_gpu_warns_and_times_on_cpu(capsys, models, provider):
    code, out, err = run_cli(capsys, "bench", models["chain"], *FAST, "--provider", provider, "--json")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("[W]")]
    assert len(warnings) == 1 and "was requested" in warnings[0] and "CPUExecutionProvider" in warnings[0]
    report = json.loads(out)
    assert report["provider_requested"] == provider
    assert report["models"][0]["provider"] == "CPUExecutionProvider"
    code, out, err = run_cli(capsys, "bench", models["chain"], *FAST, "--provider", provider, "--strict")
    assert_one_line_error(code, err, 2, "chain.onnx", "--strict")
    assert out == ""


def test_auto_uses_cpu_here_without_a_warning(capsys, models):
    code, out, err = run_cli(capsys, "bench", models["chain"], *FAST, "--json", "--strict")
    assert code == 0, err
    assert "[W]" not in err
    expected = "CUDAExecutionProvider" if GPU_AVAILABLE else "CPUExecutionProvider"
    assert json.loads(out)["models"][0]["provider"] == expected


def test_batch_and_symbolic_dims(capsys, models):
    code, out, err = run_cli(capsys, "bench", models["dynamic"], *FAST, "--json", "--batch", "3",
                             "--provider", "cpu")
    assert code == 0, err
    entry = json.loads(out)["models"][0]
    assert entry["batch"] == 3 and entry["input_shapes"] == {"x": [3, 2, 224, 224]}
    assert "symbolic dims; assuming 3x2x224x224" in err
    assert entry["throughput_per_s"] == pytest.approx(3e3 / entry["latency_ms"]["median"])
    code, out, err = run_cli(capsys, "bench", models["dynamic"], *FAST, "--json", "--batch", "2",
                             "--input-shape", "1x2x5x7")
    assert code == 0, err
    assert json.loads(out)["models"][0]["input_shapes"] == {"x": [2, 2, 5, 7]}
    assert "[W]" not in err


@pytest.mark.parametrize("args, needles", [
    (("--batch", "3"), ("chain.onnx", "fixed batch of 1", "--batch 3")),
    (("--batch", "0"), ("--batch 0",)),
    (("--runs", "0"), ("--runs 0",)),
    (("--input-shape", "x=1x2x9x9"), ("does not fit",)),
    (("--input-shape", "nope=1x2x8x8"), ("not a graph input",)),
    (("--provider", "tpu"), ("--provider", "invalid choice")),
])
def test_bad_options_are_one_line_and_exit_2(capsys, models, args, needles):
    code, out, err = run_cli(capsys, "bench", models["chain"], *FAST, *args)
    assert_one_line_error(code, err, 2, *needles)


def test_missing_and_invalid_files_exit_2_without_traceback(models):
    not_onnx = models["folder"] / "notes.onnx"
    not_onnx.write_text("hello")
    for path, needle in ((models["folder"] / "missing.onnx", "no such file"), (not_onnx, "notes.onnx")):
        proc = subprocess.run([sys.executable, "-m", "lean_onnx", "bench", str(path), *FAST],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.stdout == ""
        assert_one_line_error(proc.returncode, proc.stderr, 2, str(path), needle)


def test_library_takes_protos_and_bytes(models):
    proto = text_model(DYNAMIC, {"w": rand(4, 2, 3, 3)})
    shapes = {"x": (2, 2, 6, 6)}
    from_proto = benchmark(proto, provider="cpu", input_shapes=shapes, runs=3, warmup=0)
    from_bytes = benchmark(proto.SerializeToString(), provider="cpu", input_shapes=shapes, runs=3, warmup=0)
    for entry in (from_proto, from_bytes):
        assert entry["batch"] == 2 and entry["runs"] == 3 and entry["warnings"] == []
        assert entry["file_bytes"] == len(proto.SerializeToString()) and entry["params"] == 72


def test_io_binding_timer_runs_on_a_cpu_session(models):
    """The CUDA timer's code (bound OrtValues, outputs left on the device, synchronised) on CPU memory."""
    proto = text_model(CHAIN, {"w1": rand(3, 2, 3, 3), "w2": rand(4, 3, 1, 1)})
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = random_inputs(proto, {"x": (1, 2, 8, 8)})
    times_ms = time_on_device(sess, feeds, runs=4, warmup=1, device="cpu")
    assert len(times_ms) == 4 and all(t > 0 for t in times_ms)


def test_random_inputs_are_fixed_and_typed():
    proto = text_model("""
g (float[2,3] a, int64[4] b, bool[2] c) => (float[2,3] y) {
  y = Identity (a)
}""")
    feeds = random_inputs(proto, {"a": (2, 3), "b": (4,), "c": (2,)})
    again = random_inputs(proto, {"a": (2, 3), "b": (4,), "c": (2,)})
    assert feeds["a"].dtype.name == "float32" and feeds["b"].dtype.name == "int64" and feeds["c"].dtype == bool
    assert set(feeds["b"].tolist()) <= {0, 1}
    assert all((feeds[k] == again[k]).all() for k in feeds)


HEAVY = """
g (float[1,32,64,64] x) => (float[1,32,64,64] y) {
  y = Conv <pads = [1,1,1,1]> (x, w)
}"""


def test_paired_rounds_time_every_model_in_order(models):
    """paired_benchmark (the --target-latency search's timer): one summary per model, in the order given; a
    conv of 37,748,736 MACs is slower than the 2-conv chain of 4,224, however busy the machine."""
    heavy = text_model(HEAVY, {"w": rand(32, 32, 3, 3)})
    tiny, big = paired_benchmark([models["chain"], heavy.SerializeToString()], provider="cpu", runs=7, warmup=1,
                                 threads=1, min_block_s=0)
    assert tiny["provider"] == big["provider"] == "CPUExecutionProvider"
    assert 0 < tiny["latency_ms"]["min"] <= tiny["latency_ms"]["median"]
    assert big["latency_ms"]["median"] > 5 * tiny["latency_ms"]["median"]
    assert tiny["latency_ms"]["runs"] == big["latency_ms"]["runs"] == 7  # 7 rounds of one run each


def test_paired_rounds_time_a_short_model_for_a_minimum_block(models):
    """A model whose run is far shorter than min_block_s runs more in each block (blocks of 3 runs of a 1 ms
    model timed the wake-up after the pause): 7 rounds of at least about 20 ms each, where 7 runs were asked."""
    (tiny,) = paired_benchmark([models["chain"]], provider="cpu", runs=7, warmup=3, threads=1, min_block_s=0.02)
    latency = tiny["latency_ms"]
    assert latency["runs"] > 7
    assert latency["runs"] * latency["mean"] >= 7 * 20 * 0.5, latency  # ms: each block near 20 ms of runs


def test_paired_rounds_split_the_runs_into_blocks(models):
    """23 timed runs per model in 10 rounds: blocks of 2 or 3, every run timed once."""
    timed = paired_benchmark([models["chain"], models["chain"]], provider="cpu", runs=23, warmup=0, threads=1,
                             min_block_s=0)
    assert [t["latency_ms"]["runs"] for t in timed] == [23, 23]


def test_paired_rounds_bad_runs_is_an_error(models):
    with pytest.raises(LeanOnnxError, match="--runs 0"):
        paired_benchmark([models["chain"]], runs=0)
