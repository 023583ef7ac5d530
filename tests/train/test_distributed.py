"""Data-parallel fine-tuning under torchrun (issue 20): real `torchrun` launches of 2 CPU processes on gloo.

What is checked, against a one-process run with the same arguments: the same model (within 1e-3 of the
output's scale), rank 0 alone writing files (an audit hook in every process logs each file it opens for
writing or renames under the test folder), the report's world size and backend, a resumed schedule with a
different number of processes, and a rank killed mid-run (non-zero exit, the existing OUT untouched).
The pieces that make N not matter (shares of a batch, random numbers drawn for the whole batch) are
unit-tested in-process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch.distributed.run")

from lean_onnx import cli  # noqa: E402
from lean_onnx.errors import LeanOnnxError  # noqa: E402
from lean_onnx.train.distributed import LOCAL, World  # noqa: E402
from lean_onnx.train.finetune import ArrayData  # noqa: E402
from lean_onnx.train.images import load_image_folder  # noqa: E402
from tests.train.test_distill import SIZE, export, inputs, model_with_input, photos  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[2]
MSD = ROOT / "models" / "msd_cs.onnx"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py

#: logs, from every process of a run, each file opened for writing or renamed into under $LEAN_TEST_WATCH
AUDIT_HOOK = '''
import os, sys
_watch, _log = os.environ.get("LEAN_TEST_WATCH"), os.environ.get("LEAN_TEST_AUDIT")
if _watch and _log:
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _rank = os.environ.get("RANK", "agent")
    _writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _writes)
        elif event == "os.rename":  # os.replace too
            path, writing = args[1], True
        else:
            return
        if writing and isinstance(path, (str, bytes)) and os.path.abspath(os.fsdecode(path)).startswith(_watch):
            os.write(_fd, f"{_rank}\\t{event}\\t{os.path.abspath(os.fsdecode(path))}\\n".encode())

    sys.addaudithook(_hook)
'''


# ----------------------------------------------------------------------------------------- in-process
@pytest.mark.parametrize("n, size", [(0, 2), (1, 2), (3, 2), (4, 2), (7, 3), (10, 4), (2, 5)])
def test_shares_cover_a_batch_once_in_order(n, size):
    parts = [World(rank, size).part(n) for rank in range(size)]
    covered = [i for part in parts for i in range(n)[part]]
    assert covered == list(range(n))
    lengths = [len(range(n)[part]) for part in parts]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)
    assert LOCAL.part(n) == slice(0, n)


def test_world_from_torchrun_environment(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert World.from_env() is LOCAL and LOCAL.main and not LOCAL.parallel
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert World.from_env() is LOCAL
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = World.from_env()
    assert (world.rank, world.size, world.local_rank, world.main, world.parallel) == (3, 4, 1, False, True)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(LeanOnnxError, match="outside WORLD_SIZE 4"):
        World.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(LeanOnnxError, match="integers"):
        World.from_env()


def test_a_share_of_a_batch_is_that_part_of_the_whole_batch_with_the_same_random_numbers(photos):  # noqa: F811
    """The data objects draw the crops of the whole batch whatever share they prepare, so every rank's
    generator stays in step and the shares put together are the one-process batch."""
    rng = np.random.default_rng(0)
    arrays = ArrayData(rng.standard_normal((9, 2, 12, 12)).astype(np.float32), rng.integers(0, 3, (9, 12, 12)), crop=5)
    folder = load_image_folder(str(photos), model_with_input(f"N,3,{SIZE},{SIZE}"), augment=True, samples_per_epoch=9)
    index = np.array([0, 2, 3, 5, 8])
    for data in (arrays, folder):
        whole_rng, share_rngs = np.random.default_rng(7), [np.random.default_rng(7) for _ in range(3)]
        whole = data.batch(index % len(data), whole_rng)
        shares = [data.batch(index % len(data), share_rngs[r], World(r, 3).part(len(index))) for r in range(3)]
        np.testing.assert_array_equal(np.concatenate([x for x, _ in shares]), whole[0])
        if whole[1] is not None:
            np.testing.assert_array_equal(np.concatenate([y for _, y in shares]), whole[1])
        after = whole_rng.random()
        assert all(r.random() == after for r in share_rngs)  # the same draws consumed by every share


@pytest.mark.parametrize("argv", [["inspect", str(MSD)], [str(MSD), "OUT.onnx", "--keep", "0.5"]])
def test_commands_that_do_not_train_refuse_to_run_under_torchrun(argv, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank 0/2: " in err and "only `finetune` and the prune schedule" in err


# ------------------------------------------------------------------------------------------- torchrun
def launch(argv: list[str], tmp_path: Path, processes: int | None, marker: str = "", wait: bool = True):
    """`lean-onnx argv` in one process (processes None) or under torchrun with N gloo processes, with the
    audit hook watching tmp_path/work; returns the CompletedProcess (or the Popen without `wait`)."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "LEAN_TEST_WATCH": str(tmp_path / "work"), "LEAN_TEST_AUDIT": str(tmp_path / "audit.log"),
           "LEAN_TEST_MARKER": marker or uuid.uuid4().hex}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    runner = [sys.executable, "-m", "lean_onnx"] if processes is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
         "-m", "lean_onnx"]
    if not wait:
        return subprocess.Popen(runner + argv, cwd=tmp_path / "work", env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(runner + argv, cwd=tmp_path / "work", env=env, capture_output=True, text=True,
                          timeout=600)


def audit(tmp_path: Path) -> list[tuple[str, str, str]]:
    log = tmp_path / "audit.log"
    return [tuple(line.split("\t")) for line in log.read_text().splitlines()] if log.exists() else []


def outputs(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def relative(a, b) -> float:
    return max(float(np.abs(p - q).max() / np.abs(q).max()) for p, q in zip(a, b))


@pytest.mark.parametrize("world_size", [None, "2"])
def test_a_torchrun_process_skips_the_interpreter_teardown(tmp_path, world_size):
    """`python -m lean_onnx` (cli.run) under torchrun's environment leaves with os._exit after flushing: atexit
    handlers (and the C++ teardown that aborted a finished rank now and then) do not run; the exit code and
    the last line still come through. Outside torchrun it exits normally."""
    hook = tmp_path / "hook"
    hook.mkdir()
    marker = tmp_path / "atexit-ran"
    (hook / "sitecustomize.py").write_text(f"import atexit, pathlib\n"
                                           f"atexit.register(pathlib.Path({str(marker)!r}).touch)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(hook), str(ROOT)])
    if world_size:
        env.update(WORLD_SIZE=world_size, RANK="1", LOCAL_RANK="1")
    done = subprocess.run([sys.executable, "-m", "lean_onnx", "inspect", str(tmp_path / "missing.onnx")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("[E]"), done.stderr
    assert marker.exists() == (world_size is None)


def test_finetune_on_two_processes_gives_the_one_process_model_and_only_rank_0_writes(tmp_path):
    """The issue's acceptance: MS-D, 16 random 1x64x64 images with labels 0..4, --epochs 1 --batch 4."""
    (tmp_path / "work").mkdir()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "work" / "seg.npz", inputs=rng.standard_normal((16, 1, 64, 64)).astype(np.float32),
             targets=rng.integers(0, 5, (16, 64, 64)))
    common = ["finetune", str(MSD), "OUT.onnx", "--data", "seg.npz", "--epochs", "1", "--batch", "4", "--seed", "0"]
    one = launch(common[:2] + ["ONE.onnx"] + common[3:] + ["--report", "ONE.json"], tmp_path, None)
    assert one.returncode == 0, one.stderr
    (tmp_path / "audit.log").unlink()
    two = launch(common + ["--report", "R.json"], tmp_path, 2)
    assert two.returncode == 0, two.stderr + two.stdout
    work = tmp_path / "work"
    writes = audit(tmp_path)
    assert writes and {rank for rank, _, _ in writes} == {"0"}, writes  # the other rank wrote nothing
    renamed = [path for _, event, path in writes if event == "os.rename"]
    assert sorted(renamed) == sorted([str(work / "OUT.onnx"), str(work / "R.json")])  # each written once
    assert sorted(p.name for p in work.iterdir()) == ["ONE.json", "ONE.onnx", "OUT.onnx", "R.json", "seg.npz"]
    report = json.loads((work / "R.json").read_text())
    assert report["settings"]["world_size"] == 2 and report["settings"]["backend"] == "gloo"
    assert json.loads((work / "ONE.json").read_text())["settings"]["world_size"] == 1
    assert report["epochs"][0]["seconds"] > 0
    assert report["epochs"][0]["train_loss"] == pytest.approx(
        json.loads((work / "ONE.json").read_text())["epochs"][0]["train_loss"], rel=1e-4)
    assert two.stderr.count("[I] epoch 1/1") == 1  # progress from rank 0 only
    x = rng.standard_normal((2, 1, 256, 256)).astype(np.float32)
    base, once, twice = (outputs(p, x) for p in (MSD, work / "ONE.onnx", work / "OUT.onnx"))
    assert relative(twice, once) < 1e-3
    assert relative(base, once) > 0.1 and relative(base, twice) > 0.1  # both trained
    assert [t.dims for t in onnx.load(str(work / "OUT.onnx")).graph.initializer] == \
        [t.dims for t in onnx.load(str(MSD)).graph.initializer]


@pytest.fixture(scope="module")
def distil_nets(tmp_path_factory):
    """A teacher with (N, 10) logits and a map output, and its student pruned to 0.4 of the MACs."""
    from lean_onnx import prune
    from tests.train.test_distill import Classifier

    folder = tmp_path_factory.mktemp("ddp_nets")
    torch.manual_seed(0)
    teacher = export(Classifier(maps=True), folder / "teacher.onnx", ["logits", "maps"])
    student = folder / "student.onnx"
    onnx.save(prune(teacher, target_macs=0.4, round_channels=1).model, str(student))
    return teacher, str(student)


def test_distilling_on_an_image_folder_with_uneven_shares_matches_one_process(tmp_path, photos, distil_nets):  # noqa: F811
    """KL and scale-normalised MSE, augmented crops, 7 samples in batches of 3 (the last batch leaves
    rank 1 without a sample), validation split over the ranks: the same model and figures as one process."""
    teacher, student = distil_nets
    (tmp_path / "work").mkdir()
    argv = ["finetune", student, "OUT.onnx", "--teacher", teacher, "--data", str(photos), "--val-data", str(photos),
            "--samples-per-epoch", "7", "--epochs", "2", "--batch", "3", "--lr", "1e-3", "--report", "R.json"]
    one = launch(argv, tmp_path, None)
    assert one.returncode == 0, one.stderr
    os.replace(tmp_path / "work" / "OUT.onnx", tmp_path / "ONE.onnx")
    os.replace(tmp_path / "work" / "R.json", tmp_path / "ONE.json")
    (tmp_path / "audit.log").unlink()
    two = launch(argv, tmp_path, 2)
    assert two.returncode == 0, two.stderr + two.stdout
    skipped = "bad.jpg: not a readable image"
    assert two.stderr.count(skipped) == one.stderr.count(skipped) == 2  # --data and --val-data, by rank 0 only
    x = inputs(4, 1)
    assert relative(outputs(tmp_path / "work" / "OUT.onnx", x), outputs(tmp_path / "ONE.onnx", x)) < 1e-3
    assert relative(outputs(student, x), outputs(tmp_path / "ONE.onnx", x)) > 1e-2
    rows = [json.loads(p.read_text())["epochs"] for p in (tmp_path / "ONE.json", tmp_path / "work" / "R.json")]
    for mine, theirs in zip(*rows):
        for key in ("train_loss", "val_loss", "val_top1_agreement", "val_relative_error"):
            if key in mine:
                assert theirs[key] == pytest.approx(mine[key], rel=1e-4, abs=1e-6), key
    assert {rank for rank, _, _ in audit(tmp_path)} == {"0"}


def test_schedule_resumes_with_another_number_of_processes(tmp_path, distil_nets):
    """Two distillation steps in one process; step 2 removed from the checkpoint folder and run again by
    2 processes: OUT equals the one-process OUT, rank 1 wrote nothing."""
    teacher, _ = distil_nets
    work = tmp_path / "work"
    work.mkdir()
    np.savez(work / "train.npz", inputs=inputs(10, 0))
    argv = [teacher, "OUT.onnx", "--target-macs", "0.5", "--steps", "2", "--finetune-data", "train.npz",
            "--teacher", teacher, "--epochs-per-step", "1", "--batch", "4", "--lr", "1e-3", "--round-channels", "1",
            "--carry-optimizer", "--checkpoint-dir", "steps", "--report", "R.json"]
    one = launch(argv, tmp_path, None)
    assert one.returncode == 0, one.stderr
    os.replace(work / "OUT.onnx", tmp_path / "ONE.onnx")
    state = json.loads((work / "steps" / "state.json").read_text())
    assert [row["finetune_world_size"] for row in state["steps"]] == [1, 1]
    state["steps"] = state["steps"][:1]
    (work / "steps" / "state.json").write_text(json.dumps(state))
    for name in ("step_02.onnx", "step_02.adam.pt"):
        (work / "steps" / name).unlink()
    (tmp_path / "audit.log").unlink()
    two = launch(argv, tmp_path, 2)
    assert two.returncode == 0, two.stderr + two.stdout
    assert "resuming after step 1/2" in two.stderr and two.stdout.count("step  MACs target") == 1
    x = inputs(4, 1)
    assert relative(outputs(work / "OUT.onnx", x), outputs(tmp_path / "ONE.onnx", x)) < 1e-3
    rows = json.loads((work / "R.json").read_text())["steps"]
    assert [(row["finetune_world_size"], row["finetune_backend"]) for row in rows] == [(1, None), (2, "gloo")]
    writes = audit(tmp_path)
    assert {rank for rank, _, _ in writes} == {"0"}, writes
    assert {Path(path).name for _, event, path in writes if event == "os.rename"} == \
        {"step_02.onnx", "step_02.adam.pt", "state.json", "OUT.onnx", "R.json"}


def _rank_process(marker: str, rank: str, timeout: float = 120) -> int:
    """The pid of the torchrun worker with this marker and RANK, once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            except OSError:
                continue
            if env.get("LEAN_TEST_MARKER") == marker and env.get("RANK") == rank:
                return int(entry.name)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} process appeared")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_rank_that_dies_fails_the_run_and_leaves_out_untouched(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    rng = np.random.default_rng(0)
    np.savez(work / "seg.npz", inputs=rng.standard_normal((16, 1, 32, 32)).astype(np.float32),
             targets=rng.integers(0, 5, (16, 32, 32)))
    shutil.copy(MSD, work / "OUT.onnx")  # an existing OUT from an earlier run
    before = (work / "OUT.onnx").read_bytes()
    marker = uuid.uuid4().hex
    run = launch(["finetune", str(MSD), "OUT.onnx", "--data", "seg.npz", "--epochs", "500", "--batch", "2",
                  "--report", "R.json"], tmp_path, 2, marker=marker, wait=False)
    try:
        victim = _rank_process(marker, "1")
        seen = ""
        while "epoch 1/500" not in seen:  # training under way: the ranks exchange gradients
            line = run.stdout.readline()
            assert line, seen
            seen += line
        os.kill(victim, signal.SIGKILL)
        rest, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    output = seen + rest
    assert run.returncode != 0
    assert "[E] rank 0/2: lost contact with the other processes" in output and "nothing written" in output
    assert (work / "OUT.onnx").read_bytes() == before
    assert sorted(p.name for p in work.iterdir()) == ["OUT.onnx", "seg.npz"]  # no report, no temporary files
